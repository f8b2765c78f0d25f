"""The architecture presets through a real server: the full-size models
built in the worker, answering, and holding memory of their real size."""

from __future__ import annotations

import re

import pytest
from conftest import free_port, pixels, png_bytes, start_server
from test_metrics import scrape_until, value

from imago.client import DiffusionOptions, PreviewOptions, TextOptions
from imago.client.api import ImagoClient


@pytest.fixture(scope="module")
def arch_server(model_cache, tmp_path_factory):
    """The full-size architectures with random weights, on the CPU in bfloat16:
    building BLIP-2 OPT-2.7b here takes about a minute and 8 GB."""
    metrics_port = free_port()
    running = start_server(
        model_cache, tmp_path_factory.mktemp("arch-logs"), "--preset", "arch", "--dtype", "bf16",
        "--metrics-port", str(metrics_port),
    )  # fmt: skip
    yield running, metrics_port
    assert running.stop() == 0, running.log()


def test_the_worker_builds_both_architectures_in_the_chosen_dtype(arch_server):
    running, _ = arch_server
    log = running.log()
    assert re.search(r"blip2-opt-2\.7b-arch on cpu \(bf16, sdpa\)", log), log
    assert re.search(r"sd15-arch on cpu \(bf16, sdpa\)", log), log


def test_it_captions_with_the_full_size_blip2(arch_server):
    running, _ = arch_server
    with ImagoClient(running.target, timeout=300) as client:
        reply = client.caption(
            png_bytes(), generation=TextOptions(max_new_tokens=2, min_new_tokens=2)
        )
    assert reply.info.model == "blip2-opt-2.7b-arch"
    assert len(reply.captions) == 1


def test_it_generates_with_the_full_size_unet_and_taesd_previews(arch_server):
    running, _ = arch_server
    previews = []
    with ImagoClient(running.target, timeout=300) as client:
        result = client.generate_result(
            "a lighthouse at dusk",
            diffusion=DiffusionOptions(steps=2, seed=5, width=64, height=64),
            previews=PreviewOptions(every_n_steps=1, method="taesd"),
            on_event=lambda e: previews.append(e) if e.HasField("preview") else None,
        )
    assert result.info.model == "sd15-arch"
    assert pixels(result.images[0].image.data).shape == (64, 64, 3)
    assert [event.preview.step for event in previews] == [1, 2]


def test_the_worker_holds_memory_of_the_size_of_the_real_models(arch_server):
    _, port = arch_server
    on_cpu = {"worker": "worker-0", "device": "cpu"}
    text = scrape_until(
        port, lambda t: value(t, "imago_worker_device_memory_bytes", **on_cpu), timeout=10
    )
    # 3.74 B + 1.07 B parameters in bfloat16 are 9.6 GB.
    assert value(text, "imago_worker_device_memory_bytes", **on_cpu) > 9e9
