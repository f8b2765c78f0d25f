"""deploy/k8s/: the Kubernetes manifests, checked offline.

kustomize (built into kubectl) renders each overlay once per module; checkov,
kubernetes-validate and the semantic tests read that rendering, the way a
cluster would get it. The semantic tests hold the manifests to the server
they run: container arguments go through the real ``imago serve`` parser,
and the autoscaling metric is looked up in the server's own metric registry.
No cluster or network is needed. The helpers are in deploy_tools.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_tools import (
    OVERLAYS,
    SKIP_ANNOTATION,
    Overlay,
    checkov,
    dockerfile,
    failed_checks,
    render_overlays,
    run,
    suppressions,
    tool,
)

from imago.server.metrics import Metrics
from imago.server.supervisor import RestartPolicy

# The image each overlay runs.
IMAGE_OF_OVERLAY = {"cpu-dev": "cpu", "gpu": "gpu"}
# Oldest and newest Kubernetes the manifests must be valid for: 1.30 is the
# first release with the preStop sleep action on by default.
KUBERNETES_VERSIONS = ("1.30", "1.37")
# Kinds from CRDs, which kubernetes-validate has no schema for.
CUSTOM_KINDS = {"PodMonitor", "PrometheusRule"}
GPU = "nvidia.com/gpu"
# Seconds, beyond the preStop sleep and the drain grace, that the workers get
# to stop before the kubelet's SIGKILL.
STOP_MARGIN_S = 10


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Overlay]:
    """Every overlay rendered by `kubectl kustomize`, once for the module."""
    return render_overlays(tmp_path_factory.mktemp("rendered"))


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, Overlay]) -> Overlay:
    return rendered[request.param]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def test_checkov_finds_no_failed_check_in_the_overlay(overlay: Overlay) -> None:
    report = checkov(overlay.path, "kubernetes")
    assert not report["results"]["failed_checks"], failed_checks(report)
    assert report["summary"]["skipped"] == len(suppressions(overlay))


def test_every_checkov_suppression_in_the_overlay_silences_a_real_finding(
    overlay: Overlay, tmp_path: Path
) -> None:
    # The same documents without their suppressions: checkov must fail exactly
    # the suppressed checks, so that none is stale (checkov counts a skip
    # whether or not the check would have failed).
    docs = json.loads(json.dumps(overlay.docs))
    suppressed = set()
    for doc in docs:
        annotations = doc["metadata"].get("annotations") or {}
        for key in [k for k in annotations if SKIP_ANNOTATION.fullmatch(k)]:
            check = annotations.pop(key).partition("=")[0]
            suppressed.add(
                f"{check} {doc['kind']}.{doc['metadata']['namespace']}.{doc['metadata']['name']}"
            )
    bare = tmp_path / f"{overlay.name}-unsuppressed.yaml"
    bare.write_text(yaml.safe_dump_all(docs))
    report = checkov(bare, "kubernetes")
    failed = {f"{c['check_id']} {c['resource']}" for c in report["results"]["failed_checks"]}
    assert failed == suppressed


def test_every_checkov_suppression_in_the_overlay_gives_a_reason(overlay: Overlay) -> None:
    for where, value in suppressions(overlay):
        # checkov splits the value at "=": exactly one, between check and reason.
        check, _, reason = value.partition("=")
        assert re.fullmatch(r"CKV2?_K8S_\d+", check), f"{where}: {value!r}"
        assert reason.strip() and "=" not in reason, f"{where}: no usable reason in {value!r}"


def test_kubernetes_validate_accepts_every_built_in_kind_strictly(overlay: Overlay) -> None:
    # --strict rejects fields the schema does not know (a misspelled or
    # misplaced key), not only wrong types. kubernetes-validate ships schemas
    # for the built-in kinds only: a CRD's kind (the PodMonitor) gets "Couldn't
    # find schema", a warning with exit status 0, and is checked by the
    # PodMonitor test below and, for the PrometheusRule, in test_alert_rules.py.
    versions = [arg for v in KUBERNETES_VERSIONS for arg in ("-k", v)]
    result = run(tool("kubernetes-validate"), "--strict", *versions, overlay.path)
    lines = result.stdout.splitlines()
    problems = [line for line in lines if not line.startswith("INFO")]
    assert result.returncode == 0, "\n".join([*problems, result.stderr])
    built_in = {
        f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        for doc in overlay.docs
        if doc["kind"] not in CUSTOM_KINDS
    }
    for version in KUBERNETES_VERSIONS:
        passed = {
            match.group(1)
            for line in lines
            if (match := re.search(rf"passed for resource (\S+) against version {version}$", line))
        }
        assert passed == built_in, f"Kubernetes {version}:\n{result.stdout}"
    warnings = [line for line in lines if line.startswith("WARN")]
    custom = [doc for doc in overlay.docs if doc["kind"] in CUSTOM_KINDS]
    assert len(warnings) == len(custom) * len(KUBERNETES_VERSIONS), result.stdout
    for kind in CUSTOM_KINDS:
        expected = f"Couldn't find schema for kind {kind}"
        assert sum(expected in w for w in warnings) == len(KUBERNETES_VERSIONS), warnings


def test_the_pod_monitor_scrapes_the_metrics_port_the_server_serves(overlay: Overlay) -> None:
    monitor = overlay.one("PodMonitor", "imago")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert selects(spec["selector"]["matchLabels"], overlay.pod_labels)
    assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
    # A port *name* of the container, which serves --metrics-port.
    assert overlay.ports[endpoint["port"]] == overlay.config.metrics_port
    assert endpoint.get("path", "/metrics") == "/metrics"
    assert endpoint.get("scheme", "http") == "http"
    assert re.fullmatch(r"\d+(ms|s|m)", endpoint["interval"])


def test_the_container_args_parse_as_imago_serve_and_match_its_ports(overlay: Overlay) -> None:
    config = overlay.config
    assert overlay.ports == {"grpc": config.port, "metrics": config.metrics_port}
    assert config.log_format == "json"
    assert overlay.volume_at(config.cache_dir)["name"] == "model-cache"


def test_the_gpu_overlay_gives_each_pod_one_gpu(rendered: dict[str, Overlay]) -> None:
    gpu = rendered["gpu"]
    resources = gpu.container["resources"]
    assert str(resources["limits"][GPU]) == "1"
    assert str(resources.get("requests", {}).get(GPU, "1")) == "1"
    # So the server starts exactly one worker, on that GPU.
    assert not gpu.config.cpu_only
    assert gpu.config.preset == "default"
    assert gpu.pod["nodeSelector"] or gpu.pod.get("affinity")
    assert any(t["key"] == GPU for t in gpu.pod["tolerations"])


def test_the_cpu_dev_overlay_runs_one_tiny_cpu_worker_in_one_pod(
    rendered: dict[str, Overlay],
) -> None:
    dev = rendered["cpu-dev"]
    resources = dev.container["resources"]
    assert GPU not in resources.get("limits", {}) and GPU not in resources.get("requests", {})
    config = dev.config
    assert (config.preset, config.workers, config.cpu_only) == ("tiny", 1, True)
    assert dev.deployment["spec"]["replicas"] == 1
    assert dev.one("HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 1


def test_probes_are_native_grpc_health_checks_on_the_grpc_port(overlay: Overlay) -> None:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = overlay.container[kind]
        assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set(), kind
        # The overall status (""), which turns NOT_SERVING while draining.
        assert probe["grpc"].get("service", "") == "", kind
        assert probe["grpc"]["port"] == overlay.ports["grpc"] == overlay.config.port, kind


def window(probe: dict[str, Any]) -> int:
    """Seconds of failures before a probe gives up (Kubernetes' defaults)."""
    period = probe.get("periodSeconds", 10)
    failures = probe.get("failureThreshold", 3)
    return probe.get("initialDelaySeconds", 0) + period * failures


def test_the_startup_probe_outlasts_the_servers_own_load_timeout(overlay: Overlay) -> None:
    assert window(overlay.container["startupProbe"]) > overlay.config.load_timeout_s


def test_the_gpu_overlay_allows_a_longer_start_than_cpu_dev(rendered: dict[str, Overlay]) -> None:
    gpu, dev = rendered["gpu"].container, rendered["cpu-dev"].container
    assert window(gpu["startupProbe"]) > window(dev["startupProbe"])


def test_liveness_leaves_hung_and_crashed_workers_to_the_server(overlay: Overlay) -> None:
    # The server kills a silent worker after its watchdog and restarts a dead
    # one with back-off; health is NOT_SERVING meanwhile. The kubelet restarts
    # the container only when that has not helped.
    config = overlay.resolved
    patience = max([*config.watchdogs.values(), RestartPolicy().max_s])
    liveness = overlay.container["livenessProbe"]
    assert window(liveness) >= patience
    assert window(overlay.container["readinessProbe"]) < window(liveness)


def test_termination_grace_covers_the_pre_stop_sleep_and_the_drain(overlay: Overlay) -> None:
    pre_stop = overlay.container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep_s = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep"
        sleep_s = int(command[1])
    assert sleep_s > 0
    grace = overlay.pod["terminationGracePeriodSeconds"]
    assert grace >= sleep_s + overlay.config.drain_grace_s + STOP_MARGIN_S


def test_the_headless_service_selects_the_same_pods_without_a_cluster_ip(
    overlay: Overlay,
) -> None:
    service = overlay.one("Service", "imago")["spec"]
    headless = overlay.one("Service", "imago-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"] == service["selector"]
    assert selects(headless["selector"], overlay.pod_labels)
    assert not headless.get("publishNotReadyAddresses", False)
    (port,) = headless["ports"]
    assert overlay.ports[port["targetPort"]] == overlay.config.port
    assert port["appProtocol"] == "grpc"


def test_the_service_exposes_grpc_and_metrics_by_container_port_name(overlay: Overlay) -> None:
    service = overlay.one("Service", "imago")["spec"]
    assert service["type"] == "ClusterIP"
    assert selects(service["selector"], overlay.pod_labels)
    ports = {p["name"]: p for p in service["ports"]}
    assert {name: overlay.ports[p["targetPort"]] for name, p in ports.items()} == overlay.ports
    assert ports["grpc"]["appProtocol"] == "grpc"


def test_every_other_selector_picks_the_deployments_pods(overlay: Overlay) -> None:
    deployment = overlay.deployment["spec"]
    assert selects(deployment["selector"]["matchLabels"], overlay.pod_labels)
    pdb = overlay.one("PodDisruptionBudget", "imago")["spec"]
    assert selects(pdb["selector"]["matchLabels"], overlay.pod_labels)
    policy = overlay.one("NetworkPolicy", "imago")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], overlay.pod_labels)
    allowed = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert allowed == set(overlay.ports)
    for spread in overlay.pod.get("topologySpreadConstraints", []):
        assert selects(spread["labelSelector"]["matchLabels"], overlay.pod_labels)
    target = overlay.one("HorizontalPodAutoscaler", "imago")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "imago")


def adapter_rules(overlay: Overlay) -> list[dict[str, Any]]:
    config = overlay.one("ConfigMap", "imago-prometheus-adapter-rules")["data"]["config.yaml"]
    return yaml.safe_load(config)["rules"]


def series_of(rule: dict[str, Any]) -> str:
    """The metric a prometheus-adapter rule's seriesQuery selects."""
    return re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)


def exposed_name(rule: dict[str, Any], series: str) -> str:
    """The custom metric name prometheus-adapter serves for ``series``: its
    ``name.matches`` regex (default ``.*``) expanded into ``name.as`` (default
    ``$0``, or ``$1`` with one capture group), as the adapter's namer does."""
    naming = rule.get("name") or {}
    pattern = re.compile(naming.get("matches") or ".*")
    template = naming.get("as") or ("$1" if pattern.groups == 1 else "$0")
    match = pattern.search(series)
    assert match, f"{series} does not match the rule's name pattern {pattern.pattern}"

    def group(reference: re.Match[str]) -> str:
        name = reference[1]
        return match.group(int(name) if name.isdigit() else name)

    return re.sub(r"\$\{?(\w+)\}?", group, template)


def test_the_hpa_asks_for_the_metric_the_adapter_rule_serves(overlay: Overlay) -> None:
    hpa = overlay.one("HorizontalPodAutoscaler", "imago")["spec"]
    served = {exposed_name(rule, series_of(rule)) for rule in adapter_rules(overlay)}
    pods_metrics = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert pods_metrics, "the HPA scales on no Pods metric"
    for metric in pods_metrics:
        assert metric["metric"]["name"] in served, (metric["metric"]["name"], served)
        assert metric["target"]["type"] == "AverageValue"


def test_the_adapter_rule_reads_a_gauge_the_server_exports_per_pod(overlay: Overlay) -> None:
    metrics = Metrics()
    families = {family.name: family for family in metrics.registry.collect()}
    (rule,) = adapter_rules(overlay)
    series = series_of(rule)
    assert series == metrics.queue_depth.describe()[0].name
    assert families[series].type == "gauge"
    # namespace and pod come from the scrape; they map the series to pods.
    overrides = rule["resources"]["overrides"]
    assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # One value per pod: summed over the server's own labels (the models).
    assert re.fullmatch(
        r"sum\(<<\.Series>>\{<<\.LabelMatchers>>\}\) by \(<<\.GroupBy>>\)", rule["metricsQuery"]
    )


def test_the_hpa_removes_pods_one_at_a_time_after_a_quiet_spell(overlay: Overlay) -> None:
    hpa = overlay.one("HorizontalPodAutoscaler", "imago")["spec"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    down = hpa["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert down["policies"] and all(
        p["type"] == "Pods" and p["value"] == 1 for p in down["policies"]
    )


def test_the_pod_runs_unprivileged_as_the_images_user(overlay: Overlay) -> None:
    pod = overlay.pod["securityContext"]
    uid, gid = dockerfile(IMAGE_OF_OVERLAY[overlay.name]).user_ids()
    assert pod["runAsNonRoot"] is True
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (uid, gid, gid)
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    container = overlay.container["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert overlay.pod["automountServiceAccountToken"] is False
    account = overlay.one("ServiceAccount", overlay.pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False


def test_everything_the_server_writes_is_on_a_volume(overlay: Overlay) -> None:
    # The root filesystem is read-only: the worker channel's IPC sockets (in
    # the temporary directory) and the model caches need volumes.
    assert "emptyDir" in overlay.volume_at("/tmp")
    env = {e["name"]: e.get("value") for e in overlay.container.get("env", [])}
    cache = overlay.volume_at(overlay.config.cache_dir)
    for variable in ("IMAGO_CACHE", "HF_HOME"):
        assert overlay.volume_at(env[variable]) == cache, variable


def test_the_gpu_overlay_keeps_the_model_cache_on_a_shared_claim(
    rendered: dict[str, Overlay],
) -> None:
    gpu = rendered["gpu"]
    cache = gpu.volume_at(gpu.config.cache_dir)
    assert set(cache) == {"name", "persistentVolumeClaim"}
    claim = gpu.one("PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
    # Pods the autoscaler adds land on other nodes and share the downloads.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["namespace"] == gpu.deployment["metadata"]["namespace"]
    assert "emptyDir" in rendered["cpu-dev"].volume_at(rendered["cpu-dev"].config.cache_dir)
