"""Device settings through a real server: a compiled model warmed up before
SERVING, and reduced precision reproducible by seed."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import pixels, start_server

from imago.client import DiffusionOptions
from imago.client.api import ImagoClient


def generate(client: ImagoClient, num_images: int = 1):
    diffusion = DiffusionOptions(steps=3, seed=5, width=64, height=64, num_images=num_images)
    return client.generate_result("a lighthouse at dusk", diffusion=diffusion)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("device-logs")


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


def test_loading_past_the_load_timeout_fails_start_up_saying_so(model_cache, logs):
    # Compiling at start takes far longer than the second allowed here.
    starting = start_server(
        model_cache, logs, "--compile", "sd-tiny=default", "--load-timeout-s", "1", wait=False
    )
    assert starting.process.wait(120) == 1
    assert "workers did not load their models within 1s" in starting.log()
