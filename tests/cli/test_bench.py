"""``imago bench``: figures on known numbers, and runs against real servers."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from imago.client.bench.closedloop import format_report
from imago.client.bench.loadgen import (
    Outcome,
    Plan,
    parse_mix,
    percentile,
    phase_report,
    rotation,
    run_in_process,
    sample_image,
    summarize,
)
from imago.client.cli import main
from imago.workers.contract.protocol import GeneratedText, TextResult
from imago.workers.runtime.inprocess import run_direct
from imago.workers.runtime.runner import Request

RATIO_KEYS = ("overhead_ms", "batched_ratio", "sequential_speedup")


def bench(*args: str, target: str | None = None) -> subprocess.CompletedProcess:
    """``imago [--target T] --timeout 120 bench ARGS`` in a subprocess. One
    torch thread per process: on small machines spinning threads of the test
    server and the in-process baseline would slow each other down."""
    where = ["--target", target] if target else []
    return subprocess.run(
        [sys.executable, "-m", "imago.client.cli", *where, "--timeout", "120", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


# ------------------------------------------------------------------ mix


def test_mix_keeps_weights_in_the_order_given():
    assert parse_mix("vqa=2, caption=1,generate") == {"vqa": 2, "caption": 1, "generate": 1}


def test_rotation_repeats_each_kind_by_weight_spread_out():
    assert rotation({"caption": 2, "vqa": 1, "generate": 1}) == [
        "caption",
        "vqa",
        "generate",
        "caption",
    ]
    assert rotation({"caption": 3, "vqa": 1}) == ["caption", "caption", "vqa", "caption"]
    assert rotation({"generate": 1}) == ["generate"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("draw=1", "unknown request kind 'draw'"),
        ("caption=1,,vqa=1", "unknown request kind ''"),
        ("caption=0", "positive integer"),
        ("caption=-1", "positive integer"),
        ("caption=1.5", "positive integer"),
        ("caption=", "positive integer"),
        ("caption=1,caption=2", "twice"),
    ],
)
def test_mix_rejects_unknown_kinds_and_bad_weights(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mix(text)


@pytest.mark.parametrize(
    "args",
    [
        ["--mix", "draw=1"],
        ["--concurrency", "0"],
        ["--size", "100"],
        ["--steps", "2", "--preview-every", "3"],
        ["--compare-previews"],
        ["--mix", "generate=1", "--compare-previews", "--preview-every", "1"],
        ["--external", "--workers", "2"],
        ["--image-format", "gif"],
    ],
)
def test_bad_options_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", *args])
    assert stop.value.code == 2
    assert "imago bench: error:" in capsys.readouterr().err


# ------------------------------------------------------------------ figures


def test_percentile_interpolates_linearly_like_numpy():
    values = [0.3, 12.0, 5.5, 7.25, 1.0, 9.0, 4.0]
    for p in (0, 1, 25, 50, 90, 95, 99, 100):
        assert percentile(values, p) == pytest.approx(np.percentile(values, p))
    assert percentile([10.0, 20.0, 30.0, 40.0], 50) == 25.0
    assert percentile([7.0], 99) == 7.0


def test_summary_of_known_latencies():
    outcomes = [Outcome("caption", i, s, batch_size=b) for i, (s, b) in
                enumerate([(0.1, 1), (0.2, 2), (0.3, 2), (0.4, 3)])]  # fmt: skip
    outcomes.append(Outcome("caption", 4, 9.0, code="UNAVAILABLE"))
    summary = summarize(outcomes, elapsed_s=2.0)
    assert summary["completed"] == 4
    assert summary["errors"] == {"UNAVAILABLE": 1}
    assert summary["throughput_rps"] == pytest.approx(2.0)
    assert summary["images_per_s"] is None
    latency = summary["latency_ms"]
    assert latency["p50"] == pytest.approx(250.0)
    assert latency["p95"] == pytest.approx(385.0)
    assert latency["p99"] == pytest.approx(397.0)
    assert latency["mean"] == pytest.approx(250.0)
    assert summary["mean_batch_size"] == pytest.approx(2.0)


def test_images_per_second_count_generated_images_per_kind():
    outcomes = [Outcome("generate", 0, 1.0, images=2), Outcome("caption", 1, 0.5)]
    report = phase_report(outcomes, elapsed_s=4.0)
    assert report["kinds"]["generate"]["images_per_s"] == pytest.approx(0.5)
    assert report["kinds"]["caption"]["images_per_s"] is None
    assert report["overall"]["throughput_rps"] == pytest.approx(0.5)
    assert report["overall"]["mean_batch_size"] is None


def test_report_shows_the_input_image_and_the_rpc_floor():
    phase = phase_report([Outcome("caption", 0, 0.01)], elapsed_s=1.0)
    report = {"target": "t:1", "server": "external", "concurrency": 1, "mix": {"caption": 1},
              "warmup": 2, "input": {"format": "jpeg", "side": 224, "bytes": 7998},
              "rpc_floor_ms": 0.6123, "served": phase}  # fmt: skip
    lines = format_report(report).splitlines()
    assert lines[0].endswith(", input jpeg 224px 7998 bytes")
    floor = next(line for line in lines if line.startswith("rpc_floor_ms"))
    assert floor.startswith("rpc_floor_ms = 0.612   (p50 of an empty health check round trip")
    generate_only = {**report, "input": None, "mix": {"generate": 1}}
    assert "input" not in format_report(generate_only).splitlines()[0]


# ------------------------------------------------------------------ sample image


@pytest.mark.parametrize("fmt, pil_name", [("jpeg", "JPEG"), ("png", "PNG")])
def test_sample_image_is_a_square_rgb_image_of_the_format_asked(fmt, pil_name):
    data = sample_image(96, fmt, seed=3)
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size, image.mode) == (pil_name, (96, 96), "RGB")


def test_sample_image_is_the_same_for_a_seed_and_differs_between_seeds():
    for fmt in ("jpeg", "png"):
        assert sample_image(64, fmt, seed=5) == sample_image(64, fmt, seed=5)
        assert sample_image(64, fmt, seed=5) != sample_image(64, fmt, seed=6)


def test_sample_image_defaults_to_a_photo_sized_jpeg():
    data = sample_image()
    assert data.startswith(b"\xff\xd8\xff")
    assert Image.open(io.BytesIO(data)).size == (224, 224)
    # Smooth regions compress the way photos do, unlike colour noise (~138 KB).
    assert len(data) < 30_000
    pixels = np.asarray(Image.open(io.BytesIO(data)), dtype=float)
    assert pixels.std() > 20  # not a flat field either


def test_sample_image_rejects_other_formats():
    with pytest.raises(ValueError, match="jpeg, png"):
        sample_image(32, "gif")


# ------------------------------------------------------------------ in process


class EchoRunner:
    """A stand-in runner: answers each request with its id; records its calls."""

    def __init__(self):
        self.calls = []

    def run(self, batch, sink):
        self.calls.append([request.request_id for request in batch])
        for request in batch:
            sink.emit(
                TextResult.of(request.request_id, [GeneratedText(request.request_id)], 0, 0.0)
            )


def test_run_in_process_runs_alone_then_in_batches_of_one_kind():
    plan = Plan(("caption", "vqa"), b"", "q", "p", 1, 0, 0, 0)
    runner = EchoRunner()

    def prepare(index):
        if index == 5:
            return "INVALID_ARGUMENT"
        return runner, Request(f"r{index}", None)

    phases = run_in_process(plan, range(6), 1, 2, prepare)
    # warmup r0; each of 0..4 alone; captions 0,2,4 then vqa 1,3 in twos.
    assert runner.calls == [["r0"], *[[f"r{i}"] for i in range(5)], ["r0", "r2"], ["r4"],
                            ["r1", "r3"]]  # fmt: skip
    sequential, batched = phases["sequential"]["overall"], phases["batched"]["overall"]
    assert sequential["completed"] == batched["completed"] == 5
    assert sequential["errors"] == batched["errors"] == {"INVALID_ARGUMENT": 1}
    assert batched["mean_batch_size"] == pytest.approx((2 + 2 + 1 + 2 + 2) / 5)
    texts = {o.index: o.text for o in phases["outcomes"]}
    assert texts[3] == "r3" and texts[5] is None


class SlowSecondRunner:
    """Reports its first request at once and the second 50 ms later."""

    def run(self, batch, sink):
        for request in batch:
            sink.emit(TextResult.of(request.request_id, [GeneratedText("x")], 0, 0.0))
            time.sleep(0.05)


def test_run_direct_times_each_request_to_its_own_result():
    first, second = run_direct(SlowSecondRunner(), [Request("a", None), Request("b", None)], 2)
    assert first.batch_size == second.batch_size == 2
    assert first.call_seconds == second.call_seconds >= 0.1
    assert second.seconds - first.seconds >= 0.05 and second.seconds < second.call_seconds


# ------------------------------------------------------------------ real servers


def test_bench_against_a_running_server_prints_throughput_and_percentiles(server):
    args = ["--external", "--requests", "6", "--concurrency", "2", "--mix", "caption=1,vqa=1"]
    done = bench(*args, "--warmup", "1", target=server.target)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("kind"))
    for column in ("req/s", "p50 ms", "p95 ms", "p99 ms", "mean ms", "batch"):
        assert column in header
    rows = {line.split()[0]: line.split() for line in lines if line.split()}
    assert rows["caption"][1] == "3" and rows["vqa"][1] == "3" and rows["overall"][1] == "6"
    assert float(rows["overall"][3]) > 0  # requests per second
    assert ", input jpeg 224px " in lines[0]
    assert float(rows["rpc_floor_ms"][2]) > 0


def test_baseline_reports_the_three_ratios(server, model_cache):
    args = ["--external", "--requests", "4", "--concurrency", "2", "--warmup", "1"]
    done = bench(*args, "--baseline", "--cache-dir", str(model_cache), "--json",
                 target=server.target)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for key in RATIO_KEYS:
        assert isinstance(report[key], float), key
    base = report["baseline"]
    assert base["sequential"]["overall"]["completed"] == 4
    assert base["batched"]["overall"]["mean_batch_size"] == 2.0
    # Same jobs on the same model: the served texts are the in-process ones.
    assert base["text_mismatches"] == 0
    text = format_report(report)
    for key in RATIO_KEYS:
        assert f"\n{key} = " in text


def test_compare_previews_prints_previews_ratio(server):
    args = ["--external", "--mix", "generate=1", "--compare-previews", "--steps", "2"]
    done = bench(*args, "--requests", "2", "--warmup", "0", target=server.target)
    assert done.returncode == 0, done.stderr
    assert "served, preview every step" in done.stdout
    ratio = next(line for line in done.stdout.splitlines() if line.startswith("previews_ratio"))
    assert float(ratio.split()[2]) > 0


def test_compare_previews_reports_first_preview_time_and_cost_per_step(server):
    args = ["--external", "--mix", "generate=1", "--compare-previews", "--steps", "3"]
    done = bench(*args, "--preview-method", "taesd", "--requests", "2", "--warmup", "0",
                 "--json", target=server.target)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["served"]["overall"]["first_preview_ms"] is None
    with_previews = report["served_with_previews"]["overall"]
    first = with_previews["first_preview_ms"]
    assert first is not None and 0 < first <= with_previews["latency_ms"]["p50"]
    assert report["first_preview_ms"] == first
    assert "preview_cost_ms_per_step" in report


def test_bench_stops_the_server_it_started(server, model_cache):
    # `server` only makes sure the tiny checkpoints are built already.
    done = bench("--cache-dir", str(model_cache), "--requests", "2", "--warmup", "0", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["server"].startswith("started")
    assert report["served"]["overall"]["completed"] == 2
    assert isinstance(report["rpc_floor_ms"], float) and report["rpc_floor_ms"] > 0
    assert report["input"]["format"] == "jpeg" and report["input"]["bytes"] > 0
    assert report["server_exit_code"] == 0
    with pytest.raises(ProcessLookupError):
        os.kill(report["server_pid"], 0)
    host, port = report["target"].split(":")
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect((host, int(port)))
