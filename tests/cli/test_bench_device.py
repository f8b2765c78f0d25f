"""``imago bench-device``: its options, its figures and goals on known numbers,
and one real run against the tiny models on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from imago.client.bench.devicebench import bench_models, sd_only_preset, server_gpu_env
from imago.client.bench.devicereport import (
    caption_row,
    compiled_row,
    counter_value,
    format_report,
    goals,
    preview_row,
    sd_row,
)
from imago.client.cli import main

SMALL = ["--device", "cpu", "--preset", "tiny", "--size", "64", "--steps", "2",
         "--sd-batches", "1,2", "--caption-batches", "1,2", "--new-tokens", "3",
         "--repeats", "1", "--compile-mode", "off"]  # fmt: skip


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "args, option",
    [
        (["--size", "100"], "--size"),
        (["--size", "56"], "--size"),
        (["--size", "4096"], "--size"),
        (["--steps", "0"], "--steps"),
        (["--steps", "151"], "--steps"),
        (["--sd-batches", "1,0"], "--sd-batches"),
        (["--sd-batches", "1,x"], "--sd-batches"),
        (["--sd-batches", "2,2"], "--sd-batches"),
        (["--sd-batches", "9"], "--sd-batches"),
        (["--caption-batches", "-1"], "--caption-batches"),
        (["--caption-batches", "1,,2"], "--caption-batches"),
        (["--new-tokens", "0"], "--new-tokens"),
        (["--new-tokens", "257"], "--new-tokens"),
        (["--repeats", "0"], "--repeats"),
        (["--guidance", "31"], "--guidance"),
        (["--dtype", "fp8"], "--dtype"),
        (["--device", "tpu"], "--device"),
        (["--preset", "nope"], "--preset"),
        (["--compile-mode", "fast"], "--compile-mode"),
        (["--compile-batches", "3"], "--compile-batches"),
        (["--out", "/no/such/dir/out.json"], "--out"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_option(args, option, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench-device", "--preset", "tiny", *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "imago bench-device: error:" in err
    assert option in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_without_one_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["bench-device", *SMALL, "--device", "cuda", "--out", str(tmp_path / "x.json")])
    assert stop.value.code == 2
    assert "--device cuda" in capsys.readouterr().err


def test_the_command_leaves_this_process_environment_alone(tmp_path):
    before = dict(os.environ)
    with pytest.raises(SystemExit):
        main(["bench-device", *SMALL, "--device", "cuda:1", "--out", str(tmp_path / "x.json")])
    assert dict(os.environ) == before


@pytest.mark.parametrize(
    ("visible", "device", "shown"),
    [(None, "cuda:0", "0"), (None, "cuda:2", "2"), ("4,5", "cuda:1", "5"), ("4", "cuda:3", "-1")],
)
def test_a_server_is_shown_only_the_gpu_measured(monkeypatch, visible, device, shown):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert server_gpu_env(device) == {"CUDA_VISIBLE_DEVICES": shown}
    assert server_gpu_env("cpu") == {}


def test_presets_name_both_models_and_the_compiled_server_loads_sd_alone():
    sd, blip2 = bench_models("tiny")
    assert (sd.name, sd.source) == ("sd-tiny", "tiny:stable-diffusion")
    assert (blip2.name, blip2.source) == ("blip2-tiny", "tiny:blip2")
    assert sd_only_preset("tiny") == "tiny"  # no preset holds sd-tiny alone
    with pytest.raises(ValueError, match="unknown preset"):
        bench_models("nope")


# ------------------------------------------------------------------ figures


def test_sd_row_rates_are_steps_over_the_median_wall():
    row = sd_row(4, 20, served_s=[2.2, 2.0, 2.1], direct_s=[2.0, 1.9, 1.8], inference_s=[1.95])
    assert row["served_it_per_s"] == pytest.approx(20 / 2.1)
    assert row["direct_it_per_s"] == pytest.approx(20 / 1.9)
    assert row["served_images_per_s"] == pytest.approx(4 / 2.1)
    assert row["ratio"] == pytest.approx(1.9 / 2.1)
    assert row["served_inference_s"] == 1.95


def test_caption_row_ratio_is_of_tokens_per_second():
    row = caption_row(8, [0.5, 0.4], 160.0, [0.3], 150.0, batch_sizes=[8] * 8)
    assert row["served_captions_per_s"] == pytest.approx(8 / 0.45)
    assert row["served_tokens_per_s"] == pytest.approx(160 / 0.45)
    assert row["direct_tokens_per_s"] == pytest.approx(150 / 0.3)
    assert row["ratio"] == pytest.approx((160 / 0.45) / (150 / 0.3))
    assert row["captions_ratio"] == pytest.approx(0.3 / 0.45)
    assert row["served_mean_batch_size"] == 8.0


def test_preview_row_spreads_the_extra_wall_over_the_steps():
    row = preview_row("taesd", 20, with_s=[1.2, 1.3, 1.1], first_s=[0.1, 0.12], without_s=1.0)
    assert row["overhead_ms_per_step"] == pytest.approx(200 / 20)
    assert row["first_preview_ms"] == pytest.approx(110.0)


def test_goals_judge_the_least_sd_ratio_compiled_batch_one_and_the_largest_caption_batch():
    report = {
        "sd": [sd_row(1, 10, [1.0], [0.99]), sd_row(4, 10, [2.0], [1.5])],
        "compile": {"rows": [compiled_row(1, 10, [0.5], 10.0), compiled_row(4, 10, [1.0], 1.0)]},
        "captions": [
            caption_row(32, [1.0], 100.0, [1.0], 105.0),
            caption_row(1, [1.0], 1.0, [1.0], 10.0),
        ],  # fmt: skip
    }
    judged = {goal["name"]: goal for goal in goals(report)}
    assert judged["sd_served_vs_direct"]["value"] == pytest.approx(0.75)
    assert judged["sd_served_vs_direct"]["passed"] is False
    assert judged["compiled_vs_direct"]["value"] == pytest.approx(2.0)
    assert judged["compiled_vs_direct"]["passed"] is True
    assert judged["blip2_served_vs_direct"]["value"] == pytest.approx(100 / 105)
    assert judged["blip2_served_vs_direct"]["passed"] is True
    skipped = {goal["name"]: goal for goal in goals({**report, "compile": None})}
    assert skipped["compiled_vs_direct"]["passed"] is None


def test_counter_value_reads_one_labelled_sample():
    text = (
        "# HELP imago_generated_tokens_total New tokens generated.\n"
        "# TYPE imago_generated_tokens_total counter\n"
        'imago_generated_tokens_total{model="blip2-tiny"} 42.0\n'
        'imago_generated_tokens_total{model="other"} 7.0\n'
        'imago_generated_tokens_created{model="blip2-tiny"} 1.7e+09\n'
    )
    assert counter_value(text, "imago_generated_tokens_total", {"model": "blip2-tiny"}) == 42.0
    assert counter_value(text, "imago_generated_tokens_total", {"model": "x"}) is None


# ------------------------------------------------------------------ a real run


def test_a_tiny_cpu_run_writes_every_figure(model_cache, tmp_path):
    out = tmp_path / "device.json"
    done = subprocess.run(
        [sys.executable, "-m", "imago.client.cli", "--timeout", "120", "bench-device", *SMALL,
         "--cache-dir", str(model_cache), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["error"] is None
    assert report["device"]["name"].startswith("cpu (")
    assert {"torch", "diffusers", "transformers"} <= set(report["device"])
    settings = report["settings"]
    assert (settings["dtype"], settings["dtype_resolved"]) == ("auto", "fp32")
    assert settings["direct_dtypes"] == {"sd_unet": "float32", "blip2_vision": "float32"}
    assert report["server"]["exit_code"] == 0
    assert "--cpu" in report["server"]["args"]

    assert [row["batch"] for row in report["sd"]] == [1, 2]
    for row in report["sd"]:
        for key in ("served_it_per_s", "direct_it_per_s", "served_inference_s", "ratio"):
            assert row[key] > 0, key
        assert row["ratio"] == pytest.approx(row["served_it_per_s"] / row["direct_it_per_s"])
        assert row["served_it_per_s"] == pytest.approx(2 / row["served_wall_s"])
        # The same weights and seeds: the served image is the direct one.
        assert row["max_pixel_difference"] <= 1
    assert report["png_encode_ms"] > 0

    assert [row["batch"] for row in report["captions"]] == [1, 2]
    for row in report["captions"]:
        assert row["served_tokens_per_round"] == row["direct_tokens_per_call"] == 3 * row["batch"]
        assert row["served_tokens_source"].startswith("server metric")
        for key in ("served_captions_per_s", "served_tokens_per_s", "direct_tokens_per_s"):
            assert row[key] > 0, key
        tokens_ratio = row["served_tokens_per_s"] / row["direct_tokens_per_s"]
        assert row["ratio"] == pytest.approx(tokens_ratio)
        assert row["served_mean_batch_size"] >= 1

    methods = report["previews"]["methods"]
    assert [row["method"] for row in methods] == ["latent_rgb", "taesd", "full"]
    assert all(row["first_preview_ms"] > 0 for row in methods)
    assert report["compile"] is None
    judged = {goal["name"]: goal for goal in report["goals"]}
    assert set(judged) == {"sd_served_vs_direct", "compiled_vs_direct", "blip2_served_vs_direct"}
    assert judged["compiled_vs_direct"]["passed"] is None
    assert judged["sd_served_vs_direct"]["value"] == min(row["ratio"] for row in report["sd"])
    assert judged["blip2_served_vs_direct"]["value"] == report["captions"][-1]["ratio"]

    assert done.stdout == format_report(report)
    assert "served/direct" in done.stdout and "goals:" in done.stdout
