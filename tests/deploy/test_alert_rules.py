"""deploy/k8s/base/prometheusrule.yaml: the alerts, checked and exercised by
promtool against the metric names the server really exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from imago.server.metrics import Metrics

RULES = Path(__file__).resolve().parents[2] / "deploy/k8s/base/prometheusrule.yaml"
PROMTOOL_MISSING = "promtool is not installed (Debian/Ubuntu: apt-get install prometheus)"


@pytest.fixture(scope="module")
def rule_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rule file."""
    if shutil.which("promtool") is None:
        pytest.skip(PROMTOOL_MISSING)
    path = tmp_path_factory.mktemp("rules") / "imago.rules.yml"
    path.write_text(yaml.safe_dump({"groups": prometheus_rule()["spec"]["groups"]}))
    return path


@pytest.fixture(scope="module")
def expressions_file(rule_file: Path) -> Path:
    """The rules without their annotations: promtool's alert tests compare
    annotations too, and these tests are about when an alert fires."""
    groups = prometheus_rule()["spec"]["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    path = rule_file.with_name("imago.expressions.yml")
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def prometheus_rule() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def alerts() -> dict[str, dict[str, Any]]:
    rules = [rule for group in prometheus_rule()["spec"]["groups"] for rule in group["rules"]]
    return {rule["alert"]: rule for rule in rules}


def exported_series() -> set[str]:
    """Every series name the server's registry can expose, suffixes included."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, []))
    return names


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_the_prometheus_rule_is_a_prometheus_operator_resource():
    rule = prometheus_rule()
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert set(rule["spec"]) == {"groups"}
    for alert in alerts().values():
        assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}
        assert alert["labels"]["severity"] in {"critical", "warning"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def test_promtool_accepts_the_alert_rules(rule_file: Path):
    result = promtool("check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_the_alerts_use_only_series_the_server_exports():
    exported = exported_series()
    for name, alert in alerts().items():
        used = set(re.findall(r"\bimago_[a-z_]+", alert["expr"]))
        assert used, f"{name} uses no imago series"
        assert used <= exported, f"{name} uses {sorted(used - exported)}"


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    """A promtool input series: ``name{labels}`` taking ``values`` (expanding notation)."""
    inner = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


POD = {"namespace": "ml", "pod": "imago-0"}


def alert_test(
    inputs: list[dict[str, str]], eval_time: str, name: str, firing: list[dict[str, str]]
) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": inputs,
        "alert_rule_test": [
            {
                "eval_time": eval_time,
                "alertname": name,
                "exp_alerts": [{"exp_labels": labels} for labels in firing],
            }
        ],
    }


ALERT_CASES = {
    "a worker down for ten minutes": alert_test(
        [series("imago_worker_up", "0x15", worker="0", device="cuda:0", **POD)],
        "12m",
        "ImagoWorkerDown",
        [{"severity": "critical", "worker": "0", "device": "cuda:0", **POD}],
    ),
    "a worker down for five minutes is not yet an alert": alert_test(
        [series("imago_worker_up", "1x5 0x5", worker="0", device="cuda:0", **POD)],
        "10m",
        "ImagoWorkerDown",
        [],
    ),
    "a backlog held for a quarter of an hour": alert_test(
        [
            series("imago_queue_depth", "30x20", model="sd-tiny", **POD),
            series("imago_queue_depth", "10x20", model="blip2-tiny", **POD),
        ],
        "17m",
        "ImagoQueueBacklog",
        [{"severity": "warning", **POD}],
    ),
    "a queue the autoscaler is meant for raises nothing": alert_test(
        [series("imago_queue_depth", "20x20", model="sd-tiny", **POD)],
        "17m",
        "ImagoQueueBacklog",
        [],
    ),
    "one call in ten failing on the server side": alert_test(
        [
            series("imago_requests_total", "0+90x20", code="OK", **POD),
            series("imago_requests_total", "0+10x20", code="UNAVAILABLE", **POD),
        ],
        "16m",
        "ImagoErrorRate",
        [{"severity": "critical", "namespace": "ml"}],
    ),
    "callers' invalid requests are not server errors": alert_test(
        [
            series("imago_requests_total", "0+50x20", code="OK", **POD),
            series("imago_requests_total", "0+50x20", code="INVALID_ARGUMENT", **POD),
        ],
        "16m",
        "ImagoErrorRate",
        [],
    ),
    "a call refused for want of memory": alert_test(
        [series("imago_requests_total", "0 0 0 1 1 1", code="RESOURCE_EXHAUSTED", **POD)],
        "5m",
        "ImagoOutOfMemory",
        [{"severity": "warning", **POD}],
    ),
}


@pytest.mark.parametrize("case", ALERT_CASES, ids=list(ALERT_CASES))
def test_the_alert_fires_exactly_when_described(case: str, expressions_file: Path, tmp_path: Path):
    tests = tmp_path / "tests.yml"
    tests.write_text(
        yaml.safe_dump({"rule_files": [str(expressions_file)], "tests": [ALERT_CASES[case]]})
    )
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
