"""Device settings and architecture presets through a real server: the arch
preset built in the worker at full size, a compiled model warmed up before
SERVING, reduced precision reproducible by seed, and per-worker device
memory in the metrics."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import free_port, pixels, png_bytes, start_server
from test_metrics import scrape_until, value

from imago.client.api import ImagoClient


def generate(client: ImagoClient, **options: object):
    options = {"steps": 3, "seed": 5, "width": 64, "height": 64, **options}
    return client.generate_result("a lighthouse at dusk", **options)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("device-logs")


@pytest.fixture(scope="module")
def arch_server(model_cache, logs):
    """The full-size architectures with random weights, on the CPU in bfloat16:
    building BLIP-2 OPT-2.7b here takes about a minute and 8 GB."""
    metrics_port = free_port()
    running = start_server(
        model_cache, logs, "--preset", "arch", "--dtype", "bf16",
        "--metrics-port", str(metrics_port),
    )  # fmt: skip
    yield running, metrics_port
    assert running.stop() == 0, running.log()


class TestArchPreset:
    def test_the_worker_builds_both_architectures_in_the_chosen_dtype(self, arch_server):
        running, _ = arch_server
        log = running.log()
        assert re.search(r"blip2-opt-2\.7b-arch on cpu \(bf16, sdpa\)", log), log
        assert re.search(r"sd15-arch on cpu \(bf16, sdpa\)", log), log

    def test_it_captions_with_the_full_size_blip2(self, arch_server):
        running, _ = arch_server
        with ImagoClient(running.target, timeout=300) as client:
            reply = client.caption(png_bytes(), max_new_tokens=2, min_new_tokens=2)
        assert reply.info.model == "blip2-opt-2.7b-arch"
        assert len(reply.captions) == 1

    def test_it_generates_with_the_full_size_unet_and_taesd_previews(self, arch_server):
        running, _ = arch_server
        previews = []
        with ImagoClient(running.target, timeout=300) as client:
            result = generate(
                client,
                steps=2,
                preview_every=1,
                preview_method="taesd",
                on_event=lambda e: previews.append(e) if e.HasField("preview") else None,
            )
        assert result.info.model == "sd15-arch"
        assert pixels(result.images[0].image.data).shape == (64, 64, 3)
        assert [event.preview.step for event in previews] == [1, 2]

    def test_the_worker_holds_memory_of_the_size_of_the_real_models(self, arch_server):
        _, port = arch_server
        on_cpu = {"worker": "worker-0", "device": "cpu"}
        text = scrape_until(
            port, lambda t: value(t, "imago_worker_device_memory_bytes", **on_cpu), timeout=10
        )
        # 3.74 B + 1.07 B parameters in bfloat16 are 9.6 GB.
        assert value(text, "imago_worker_device_memory_bytes", **on_cpu) > 9e9


def test_a_compiled_model_is_warmed_up_before_serving_and_draws_the_eager_image(
    model_cache, logs, server
):
    compiled = start_server(model_cache, logs, "--compile", "sd-tiny=default")
    try:
        log = compiled.log()
        assert "compiled and warmed up sd-tiny" in log
        assert log.index("compiled and warmed up sd-tiny") < log.index("serving on")
        assert "sd-tiny on cpu (fp32, sdpa, compile=default)" in log
        with ImagoClient(compiled.target) as client:
            image = generate(client).images[0].image.data
        with ImagoClient(server.target) as client:
            eager = generate(client).images[0].image.data
        assert np.abs(pixels(image) - pixels(eager)).max() <= 2
    finally:
        assert compiled.stop() == 0, compiled.log()


def test_a_bfloat16_model_gives_the_same_image_for_the_same_seed(model_cache, logs, server):
    half = start_server(model_cache, logs, "--dtype", "sd-tiny=bf16", "--vae-slicing")
    try:
        with ImagoClient(half.target) as client:
            first = [image.image.data for image in generate(client, num_images=2).images]
            again = [image.image.data for image in generate(client, num_images=2).images]
        with ImagoClient(server.target) as client:
            full = [image.image.data for image in generate(client, num_images=2).images]
    finally:
        assert half.stop() == 0, half.log()
    assert first == again
    # The precision did change: float32 draws (slightly) different pixels.
    assert first != full
