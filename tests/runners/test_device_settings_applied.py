"""Device settings put into effect: the runners loaded in-process with each
setting on the tiny checkpoints, and what the setting changes (or must not
change) in the loaded model and its outputs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from job_builders import image_job
from PIL import Image

from imago.workers.checkpoints import tiny
from imago.workers.contract.jobs import TextToImageJob
from imago.workers.contract.presets import DeviceSettings
from imago.workers.families.blip2.runner import Blip2Runner
from imago.workers.families.diffusion.runner import StableDiffusionRunner
from imago.workers.runtime.device_setup import compiled_graphs, dtype_name, torch_dtype
from imago.workers.runtime.inprocess import run_direct
from imago.workers.runtime.runner import Request


@pytest.fixture(scope="module")
def sd_source(model_cache: Path) -> str:
    return tiny.resolve("tiny:stable-diffusion", model_cache)


@pytest.fixture(scope="module")
def plain(sd_source: str) -> StableDiffusionRunner:
    return StableDiffusionRunner.load("sd-tiny", sd_source, "cpu")


def load_sd(source: str, **settings: object) -> StableDiffusionRunner:
    return StableDiffusionRunner.load("sd-tiny", source, "cpu", DeviceSettings(**settings))


def job(**fields: object) -> TextToImageJob:
    values = {
        "prompt": "a lighthouse at dusk", "negative_prompt": "", "width": 64, "height": 64,
        "steps": 3, "guidance_scale": 7.5, "seed": 7, "num_images": 1, "output_format": "png",
        "preview_every": 0, "preview_format": "jpeg", "preview_max_size": 0,
    }  # fmt: skip
    return image_job(**{**values, **fields})


def images(runner: StableDiffusionRunner, *jobs: TextToImageJob) -> list[np.ndarray]:
    """The pixels of every image the jobs give, run as one batch."""
    requests = [Request(f"r{i}", each) for i, each in enumerate(jobs)]
    results = run_direct(runner, requests, batch_size=len(requests))
    for result in results:
        assert result.code == "OK", result.message
    return [
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
        for result in results
        for data in result.images
    ]


def test_auto_is_half_precision_on_cuda_and_full_precision_elsewhere():
    assert torch_dtype("auto", "cuda") == torch.float16
    assert torch_dtype("auto", "cpu") == torch.float32
    assert dtype_name("auto", "cpu") == "fp32"
    assert torch_dtype("bf16", "cpu") == torch.bfloat16


def test_stable_diffusion_loads_in_the_chosen_dtype(sd_source):
    runner = load_sd(sd_source, dtype="bf16")
    for part in (runner.pipe.unet, runner.pipe.vae, runner.pipe.text_encoder):
        assert part.dtype == torch.bfloat16


def test_blip2_loads_in_the_chosen_dtype_and_attention(model_cache):
    source = tiny.resolve("tiny:blip2", model_cache)
    runner = Blip2Runner.load("blip2-tiny", source, "cpu", DeviceSettings("bf16", "eager"))
    assert runner.model.vision_model.dtype == torch.bfloat16
    assert runner.model.language_model.dtype == torch.bfloat16
    assert runner.model.config._attn_implementation == "eager"
    assert runner.model.language_model.config._attn_implementation == "eager"


def test_sdpa_is_the_default_attention_and_eager_replaces_it(plain, sd_source):
    processors = set(map(type, plain.pipe.unet.attn_processors.values()))
    assert processors == {AttnProcessor2_0}
    assert plain.pipe.text_encoder.config._attn_implementation == "sdpa"
    eager = load_sd(sd_source, attention="eager")
    assert set(map(type, eager.pipe.unet.attn_processors.values())) == {AttnProcessor}
    assert set(map(type, eager.pipe.vae.attn_processors.values())) == {AttnProcessor}
    assert eager.pipe.text_encoder.config._attn_implementation == "eager"


def test_eager_attention_gives_the_same_image_as_sdpa(plain, sd_source):
    (sdpa,) = images(plain, job())
    (eager,) = images(load_sd(sd_source, attention="eager"), job())
    assert np.abs(sdpa - eager).max() <= 1


def test_channels_last_stores_convolutions_nhwc_without_changing_the_image(plain, sd_source):
    runner = load_sd(sd_source, channels_last=True)
    weight = runner.pipe.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(images(runner, job())[0] - images(plain, job())[0]).max() <= 1


def test_vae_slicing_decodes_a_batch_to_the_same_images(plain, sd_source):
    runner = load_sd(sd_source, vae_slicing=True)
    assert runner.pipe.vae.use_slicing and not plain.pipe.vae.use_slicing
    sliced = images(runner, job(num_images=3))
    whole = images(plain, job(num_images=3))
    assert max(np.abs(a - b).max() for a, b in zip(sliced, whole, strict=True)) <= 1


def test_vae_tiling_decodes_images_larger_than_a_tile_in_tiles(plain, sd_source):
    runner = load_sd(sd_source, vae_tiling=True)
    assert runner.pipe.vae.use_tiling
    tile = runner.pipe.vae.tile_sample_min_size
    # At one tile the decode is the plain one; past it the tiles are blended.
    assert np.array_equal(
        images(runner, job(width=tile, height=tile))[0],
        images(plain, job(width=tile, height=tile))[0],
    )
    (tiled,) = images(runner, job(width=2 * tile, height=2 * tile))
    (whole,) = images(plain, job(width=2 * tile, height=2 * tile))
    assert tiled.shape == whole.shape == (2 * tile, 2 * tile, 3)
    assert not np.array_equal(tiled, whole)


def test_a_fixed_seed_gives_the_same_image_again_in_half_precision(sd_source):
    runner = load_sd(sd_source, dtype="bf16")
    first = images(runner, job(seed=11), job(seed=12))
    again = images(runner, job(seed=11), job(seed=12))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], first[1])


@pytest.fixture(scope="module")
def compiled(sd_source: str) -> tuple[StableDiffusionRunner, int]:
    """A compiled, warmed-up runner and the graphs built by then. torch.compile
    on the CPU (inductor) takes about a minute per graph the first time on a
    2-core machine, and seconds once its on-disk cache holds them."""
    runner = load_sd(sd_source, compile="default")
    runner.warm_up()
    return runner, compiled_graphs()


class TestCompiled:
    def test_warm_up_compiles_the_unet_and_the_vae_decoder(self, compiled):
        runner, graphs = compiled
        assert graphs >= 2
        assert hasattr(runner.pipe.vae.decoder, "_compiled_call_impl")

    def test_requests_at_the_default_size_compile_nothing_after_warm_up(self, compiled):
        runner, graphs = compiled
        images(runner, job())
        images(runner, job(num_images=3))
        images(runner, job(guidance_scale=1.0))
        images(runner, job(guidance_scale=1.0, num_images=2), job(guidance_scale=1.0, seed=1))
        # Float timesteps (Euler) meet the same graph as integer ones (PNDM).
        images(runner, job(scheduler="euler"), job(scheduler="euler", seed=9))
        images(runner, job(preview_every=1, preview_method="full"))
        assert compiled_graphs() == graphs

    def test_a_compiled_model_gives_the_eager_image(self, compiled, plain):
        runner, _ = compiled
        for each in (job(), job(scheduler="euler", seed=3)):
            assert np.abs(images(runner, each)[0] - images(plain, each)[0]).max() <= 2
