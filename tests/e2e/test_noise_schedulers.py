"""Schedulers chosen per request by name, through a real server."""

from __future__ import annotations

import io

import diffusers
import grpc
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from imago.client import DiffusionOptions
from imago.client.api import ImagoClient
from imago.workers.checkpoints import tiny
from imago.workers.contract.schedulers import SCHEDULERS

REQUIRED = [
    "ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras", "lms", "unipc",
]  # fmt: skip


@pytest.fixture(scope="module")
def client(server):
    with ImagoClient(server.target, timeout=120) as imago:
        yield imago


def test_every_required_scheduler_is_offered():
    assert set(REQUIRED) <= set(SCHEDULERS)


@pytest.mark.parametrize("name", REQUIRED)
def test_a_named_scheduler_runs_every_step_it_was_asked_for(client, name):
    events = []
    result = client.generate_result(
        "a fox",
        diffusion=DiffusionOptions(scheduler=name, steps=4, width=64, height=64, seed=3),
        on_event=events.append,
    )
    steps = [e.progress.step for e in events if e.HasField("progress")]
    assert steps == [1, 2, 3, 4]
    assert result.images[0].seed == 3


def test_schedulers_give_different_images_from_the_same_seed(client):
    images = {
        name: client.generate_result(
            "a fox", diffusion=DiffusionOptions(scheduler=name, steps=4, seed=5)
        ).images[0]
        for name in ("ddim", "euler_ancestral", "dpmpp_2m_karras")
    }
    assert len({image.image.data for image in images.values()}) == 3


def test_an_unknown_scheduler_is_refused_with_the_valid_names(client):
    with pytest.raises(grpc.RpcError) as caught:
        client.generate_result("a fox", diffusion=DiffusionOptions(scheduler="warp_drive", steps=2))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert "scheduler" in details and "warp_drive" in details
    assert all(name in details for name in REQUIRED)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m_karras", "euler_ancestral"])
def test_served_image_equals_diffusers_with_that_scheduler(client, model_cache, name):
    pipe = StableDiffusionPipeline.from_pretrained(tiny.ensure("stable-diffusion", model_cache))
    pipe.set_progress_bar_config(disable=True)
    class_name, overrides = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)
    served = client.generate_result(
        "a lighthouse", diffusion=DiffusionOptions(scheduler=name, steps=5, seed=21)
    )
    direct = pipe(
        "a lighthouse", num_inference_steps=5, generator=[torch.Generator("cpu").manual_seed(21)]
    ).images[0]
    pixels = np.asarray(Image.open(io.BytesIO(served.images[0].image.data)), dtype=np.int16)
    assert np.abs(pixels - np.asarray(direct, dtype=np.int16)).max() <= 1
