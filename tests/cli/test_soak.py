"""``imago soak``: timed mixed load with throughput, errors and memory."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image, UnidentifiedImageError

from imago.client.bench import adversarial as adv
from imago.client.bench.loadgen import Outcome
from imago.client.bench.soak import memory_of
from imago.client.cli import main

SCRAPE = """\
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 2.097152e+08
# HELP imago_worker_resident_memory_bytes Resident memory of each worker process.
# TYPE imago_worker_resident_memory_bytes gauge
imago_worker_resident_memory_bytes{worker="worker-0"} 1.048576e+09
imago_worker_resident_memory_bytes{worker="worker-1"} 5.24288e+08
"""


def test_memory_is_read_per_process_from_a_scrape():
    assert memory_of(SCRAPE) == {
        "frontend": 209715200.0,
        "worker-0": 1048576000.0,
        "worker-1": 524288000.0,
    }


def test_a_short_soak_reports_throughput_errors_and_memory_of_every_process(model_cache, capsys):
    code = main(
        [
            "soak", "--cache-dir", str(model_cache), "--duration", "4", "--concurrency", "4",
            "--mix", "caption=2,vqa=1,generate=1", "--steps", "2", "--size", "64",
            "--sample-every", "1", "--json",
        ]
    )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    overall = report["served"]["overall"]
    assert overall["completed"] > 0 and overall["errors"] == {}
    assert overall["throughput_rps"] > 0
    assert set(report["served"]["kinds"]) == {"caption", "vqa", "generate"}
    memory = report["memory_mib"]
    assert set(memory) == {"frontend", "worker-0"}
    for figures in memory.values():
        assert figures["start"] > 10 and figures["end"] > 10
        assert figures["peak"] >= max(figures["start"], figures["end"])
    # Samples: after the warm-up, every second of the four, and at the end.
    assert report["memory_samples"] >= 4
    assert report["server_exit_code"] == 0


# ------------------------------------------------------------------ adversarial profile


def outcome(seconds: float, code: str = "OK", kind: str = "caption") -> Outcome:
    return Outcome(kind, 0, seconds, code=code)


def test_spread_is_the_percentiles_and_the_maximum_in_milliseconds():
    spread = adv.spread_ms([0.001 * n for n in range(1, 101)])
    assert spread == pytest.approx({"p50": 50.5, "p95": 95.05, "p99": 99.01, "max": 100.0})


def test_spread_of_no_calls_is_none():
    assert adv.spread_ms([]) == {"p50": None, "p95": None, "p99": None, "max": None}


def test_figures_count_requests_and_errors_by_code_and_time_only_the_answered_calls():
    calls = [outcome(0.1), outcome(0.3), outcome(9.0, "UNAVAILABLE"), outcome(0.2, "INTERNAL"),
             outcome(8.0, "UNAVAILABLE")]  # fmt: skip
    figs = adv.figures(calls, elapsed_s=2.0)
    assert (figs["requests"], figs["ok"]) == (5, 2)
    assert figs["errors"] == {"INTERNAL": 1, "UNAVAILABLE": 2}
    assert figs["latency_ms"]["max"] == pytest.approx(300.0)
    assert figs["throughput_rps"] == pytest.approx(1.0)
    assert figs["requests_rps"] == pytest.approx(2.5)


def test_an_oversized_call_is_refused_in_time_when_it_fails_early_whatever_its_code():
    for code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNKNOWN"):
        assert adv.refused_in_time(outcome(0.01, code), deadline_s=2.0)
    assert not adv.refused_in_time(outcome(0.01, "OK"), deadline_s=2.0)
    # Ended by the deadline, the client's or the server's a little earlier: held, not refused.
    assert not adv.refused_in_time(outcome(2.003, "DEADLINE_EXCEEDED"), deadline_s=2.0)
    assert not adv.refused_in_time(outcome(1.998, "DEADLINE_EXCEEDED"), deadline_s=2.0)


def test_oversized_figures_time_the_refusals_and_count_late_and_accepted_calls_per_kind():
    calls = [outcome(0.04, "INVALID_ARGUMENT"), outcome(0.06, "INVALID_ARGUMENT"),
             outcome(0.003, "DEADLINE_EXCEEDED", "generate"),
             outcome(2.01, "DEADLINE_EXCEEDED", "generate"),
             outcome(1.5, "OK", "generate")]  # fmt: skip
    figs = adv.oversized_figures(calls, elapsed_s=5.0, deadline_s=2.0)
    assert (figs["requests"], figs["ok"], figs["accepted"], figs["late"]) == (5, 1, 1, 1)
    assert figs["refusal_ms"]["max"] == pytest.approx(2010.0)
    assert set(figs["kinds"]) == {"caption", "generate"}
    caption, generate = figs["kinds"]["caption"], figs["kinds"]["generate"]
    assert caption["errors"] == {"INVALID_ARGUMENT": 2} and caption["late"] == 0
    assert caption["refusal_ms"]["p50"] == pytest.approx(50.0)
    assert (generate["requests"], generate["late"], generate["accepted"]) == (3, 1, 1)


def classes_with(oversized_calls: list[Outcome], interactive_code: str = "OK") -> dict:
    runs = {
        "bulk": ([outcome(0.5)], 1.0),
        "interactive": ([outcome(0.2, interactive_code)], 1.0),
        "generation": ([outcome(1.0, kind="generate")], 1.0),
        "oversized": (oversized_calls, 1.0),
    }
    return adv.class_report(runs, adv.Adversaries(oversized_deadline_s=2.0))


def test_oversized_calls_refused_in_time_do_not_fail_the_run():
    classes = classes_with([outcome(0.05, "INVALID_ARGUMENT"), outcome(0.01, "DEADLINE_EXCEEDED")])
    assert adv.failures(classes) == []


def test_oversized_calls_answered_or_refused_late_fail_the_run():
    reasons = adv.failures(classes_with([outcome(1.0, "OK"), outcome(2.0, "DEADLINE_EXCEEDED")]))
    assert len(reasons) == 2 and all(reason.startswith("oversized") for reason in reasons)


def test_an_error_of_an_interactive_call_fails_the_run():
    reasons = adv.failures(classes_with([outcome(0.05, "INVALID_ARGUMENT")], "DEADLINE_EXCEEDED"))
    assert reasons == ["interactive: errors DEADLINE_EXCEEDED 1"]


def test_the_table_has_a_row_per_class_and_per_oversized_kind():
    classes = classes_with([outcome(0.05, "INVALID_ARGUMENT"),
                            outcome(0.01, "DEADLINE_EXCEEDED", "generate")])  # fmt: skip
    names = [line.split()[0] for line in adv.format_classes(classes)[1:]]
    assert names[:6] == ["bulk", "interactive", "generation", "oversized", "caption", "generate"]


def test_undecodable_bytes_are_the_size_asked_and_no_image():
    data = adv.undecodable(3 * 1024 * 1024)
    assert len(data) == 3 * 1024 * 1024
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(data))


def test_a_short_adversarial_soak_reports_every_class_and_refuses_only_the_oversized(
    model_cache, capsys
):
    code = main(
        [
            "soak", "--profile", "adversarial", "--cache-dir", str(model_cache),
            "--duration", "6", "--interactive-clients", "2", "--interactive-deadline", "120",
            "--generation-clients", "2", "--generation-steps", "20", "--generation-size", "64",
            "--oversized-mib", "4", "--sample-every", "2", "--json",
        ]
    )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    classes = report["classes"]
    assert list(classes) == ["bulk", "interactive", "generation", "oversized"]
    for name, figs in classes.items():
        assert figs["requests"] > 0, name
    assert classes["interactive"]["errors"] == {}
    assert classes["generation"]["errors"] == {}
    oversized = classes["oversized"]
    assert oversized["ok"] == 0 and sum(oversized["errors"].values()) == oversized["requests"]
    assert set(oversized["kinds"]) == {"caption", "generate"}
    assert code == (1 if report["failures"] else 0)
    assert set(report["memory_mib"]) == {"frontend", "worker-0"}
    assert report["server_exit_code"] == 0
