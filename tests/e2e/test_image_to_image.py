"""Image-to-image through a real server: size, steps run, fidelity, errors."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from conftest import gradient, pixels, png
from diffusers import StableDiffusionImg2ImgPipeline

from imago.client import DiffusionOptions, ImageToImage
from imago.client.api import ImagoClient
from imago.workers.checkpoints import tiny


@pytest.fixture(scope="module")
def client(server):
    with ImagoClient(server.target, timeout=120) as imago:
        yield imago


def test_the_output_takes_the_init_images_size_and_runs_steps_times_strength(client):
    events = []
    result = client.generate_result(
        "a fox",
        diffusion=DiffusionOptions(steps=10, seed=1),
        edit=ImageToImage(png(gradient(96, 64)), strength=0.6),
        on_event=events.append,
    )
    started = [e.started for e in events if e.HasField("started")]
    steps = [e.progress.step for e in events if e.HasField("progress")]
    assert [s.total_steps for s in started] == [6]
    assert steps == [1, 2, 3, 4, 5, 6]
    image = result.images[0].image
    assert (image.width, image.height) == (96, 64)


def test_width_and_height_resize_the_init_image(client):
    result = client.generate_result(
        "a fox",
        diffusion=DiffusionOptions(steps=4, width=64, height=64),
        edit=ImageToImage(png(gradient(96, 64)), strength=0.5),
    )
    assert (result.images[0].image.width, result.images[0].image.height) == (64, 64)


def test_served_image_to_image_equals_direct_diffusers(client, model_cache):
    init = gradient(96, 64)
    served = client.generate_result(
        "a fox in snow",
        diffusion=DiffusionOptions(steps=10, seed=8, num_images=2, scheduler="euler"),
        edit=ImageToImage(png(init), strength=0.7),
    )
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny.ensure("stable-diffusion", model_cache)
    )
    pipe.set_progress_bar_config(disable=True)
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    direct = pipe(
        "a fox in snow", image=init, strength=0.7, num_inference_steps=10,
        num_images_per_prompt=2, generator=[torch.Generator("cpu").manual_seed(s) for s in (8, 9)],
    ).images  # fmt: skip
    for got, want in zip(served.images, direct, strict=True):
        assert np.abs(pixels(got.image.data) - np.asarray(want, dtype=np.int16)).max() <= 1


def test_a_style_image_without_an_ip_adapter_fails_its_precondition(client, server):
    from imago.client.api import generate_request
    from imago.v1 import imagegen_pb2_grpc

    request = generate_request("a fox", edit=ImageToImage(png(gradient()), strength=0.5))
    request.image_to_image.style_image.data = png(gradient(64, 64))
    stub = imagegen_pb2_grpc.ImageGenServiceStub(server.channel())
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(request, timeout=60))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "IP-Adapter" in caught.value.details()


def test_an_init_image_that_is_not_an_image_names_the_field(client):
    with pytest.raises(grpc.RpcError) as caught:
        client.generate_result("a fox", edit=ImageToImage(b"not an image at all", strength=0.5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_to_image.init_image.data" in caught.value.details()


def test_a_truncated_init_image_is_refused_by_the_worker_naming_the_field(client):
    truncated = png(gradient(300, 300))[:300]
    with pytest.raises(grpc.RpcError) as caught:
        client.generate_result(
            "a fox", diffusion=DiffusionOptions(steps=2), edit=ImageToImage(truncated, strength=0.5)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_to_image.init_image.data" in caught.value.details()
