"""Inpainting through a real server: the mask decides, fidelity, warnings, errors."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from conftest import gradient, pixels, png, start_server
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
from PIL import Image

from imago.client import DiffusionOptions, Inpaint
from imago.client.api import ImagoClient
from imago.workers.checkpoints import tiny


def square_mask(width: int = 96, height: int = 64) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


@pytest.fixture(scope="module")
def client(server):
    with ImagoClient(server.target, timeout=120) as imago:
        yield imago


def assert_equals_direct(client: ImagoClient, checkpoint) -> None:
    """Inpainting served by ``client`` equals diffusers' on ``checkpoint``."""
    image, mask = gradient(), square_mask()
    served = client.generate_result(
        "a red door",
        diffusion=DiffusionOptions(steps=6, seed=17),
        edit=Inpaint(png(image), png(mask)),
    )
    pipe = StableDiffusionInpaintPipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(
        "a red door", image=image, mask_image=mask, num_inference_steps=6, strength=1.0,
        width=96, height=64, generator=[torch.Generator("cpu").manual_seed(17)],
    ).images[0]  # fmt: skip
    assert np.abs(pixels(served.images[0].image.data) - np.asarray(direct, np.int16)).max() <= 1
    assert not served.warnings


def test_the_dedicated_inpainting_checkpoint_is_used_and_equals_diffusers(client, model_cache):
    checkpoint = tiny.ensure("stable-diffusion-inpaint", model_cache)
    assert UNet2DConditionModel.load_config(checkpoint / "unet")["in_channels"] == 9
    assert_equals_direct(client, checkpoint)


def test_without_one_generic_inpainting_equals_diffusers_on_the_base_model(model_cache, tmp_path):
    server = start_server(model_cache, tmp_path, "--workers", "1", "--model", "inpaint=")
    try:
        with ImagoClient(server.target, timeout=120) as generic:
            assert_equals_direct(generic, tiny.ensure("stable-diffusion", model_cache))
    finally:
        assert server.stop() == 0


def test_a_mask_of_another_size_is_resized_and_the_result_says_so(client):
    result = client.generate_result(
        "a red door",
        diffusion=DiffusionOptions(steps=2),
        edit=Inpaint(png(gradient()), png(square_mask(48, 48))),
    )
    assert any("mask is 48x48" in warning for warning in result.warnings)
    assert (result.images[0].image.width, result.images[0].image.height) == (96, 64)


def test_strength_runs_part_of_the_schedule(client):
    events = []
    client.generate_result(
        "a red door",
        diffusion=DiffusionOptions(steps=10),
        edit=Inpaint(png(gradient()), png(square_mask()), strength=0.5),
        on_event=events.append,
    )
    assert [e.progress.step for e in events if e.HasField("progress")] == [1, 2, 3, 4, 5]


def test_a_mask_that_is_not_an_image_is_invalid(client):
    with pytest.raises(grpc.RpcError) as caught:
        client.generate_result("a red door", edit=Inpaint(png(gradient()), b"mask?"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inpaint.mask.data" in caught.value.details()


def test_a_truncated_mask_is_refused_by_the_worker_naming_the_field(client):
    truncated = png(square_mask(300, 300))[:120]
    with pytest.raises(grpc.RpcError) as caught:
        client.generate_result("a red door", edit=Inpaint(png(gradient()), truncated))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inpaint.mask.data" in caught.value.details()
