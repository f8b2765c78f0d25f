"""Restyling by a style image through an IP-Adapter, on a server that has one."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch
from conftest import png, start_server
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from imago.client import DiffusionOptions, ImageToImage
from imago.client.api import ImagoClient
from imago.workers.checkpoints import tiny


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].image.data)), dtype=np.int16)


CONTENT = Image.new("RGB", (64, 64), (40, 90, 160))
STYLE = Image.new("RGB", (48, 48), (250, 30, 20))


@pytest.fixture(scope="module")
def ip_adapter(model_cache):
    return tiny.ensure("ip-adapter", model_cache)


@pytest.fixture(scope="module")
def style_server(model_cache, ip_adapter, tmp_path_factory):
    logs = tmp_path_factory.mktemp("style-logs")
    server = start_server(
        model_cache, logs, "--workers", "1", "--model", f"ip_adapter={ip_adapter}"
    )
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def client(style_server):
    with ImagoClient(style_server.target, timeout=120) as imago:
        yield imago


def restyle(client: ImagoClient, style_image: bytes | None = None, style_scale: float = 0.0):
    edit = ImageToImage(
        png(CONTENT), strength=0.8, style_image=style_image, style_scale=style_scale
    )
    return client.generate_result("a house", diffusion=DiffusionOptions(steps=5, seed=6), edit=edit)


def test_a_style_image_restyles_and_equals_diffusers(client, model_cache, ip_adapter):
    styled = restyle(client, style_image=png(STYLE), style_scale=0.7)
    assert np.abs(pixels(styled) - pixels(restyle(client))).max() > 1
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny.ensure("stable-diffusion", model_cache)
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(ip_adapter), subfolder="", weight_name="ip-adapter.safetensors",
        image_encoder_folder="image_encoder",
    )  # fmt: skip
    pipe.set_ip_adapter_scale(0.7)
    direct = pipe(
        "a house", image=CONTENT, strength=0.8, num_inference_steps=5, ip_adapter_image=STYLE,
        generator=[torch.Generator().manual_seed(6)],
    ).images[0]  # fmt: skip
    assert np.abs(pixels(styled) - np.asarray(direct, dtype=np.int16)).max() <= 1


def test_requests_without_a_style_image_are_untouched_by_the_adapter(client, model_cache):
    served = client.generate_result("a house", diffusion=DiffusionOptions(steps=3, seed=2))
    pipe = StableDiffusionPipeline.from_pretrained(tiny.ensure("stable-diffusion", model_cache))
    pipe.set_progress_bar_config(disable=True)
    direct = pipe("a house", num_inference_steps=3, generator=[torch.Generator().manual_seed(2)])
    assert np.abs(pixels(served) - np.asarray(direct.images[0], dtype=np.int16)).max() <= 1


def test_a_style_scale_out_of_range_names_the_field(client):
    with pytest.raises(grpc.RpcError) as caught:
        restyle(client, style_image=png(STYLE), style_scale=3.0)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_to_image.style_scale" in caught.value.details()


def test_a_style_image_that_is_not_an_image_names_the_field(client):
    with pytest.raises(grpc.RpcError) as caught:
        restyle(client, style_image=b"a watercolour, please", style_scale=1.0)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_to_image.style_image" in caught.value.details()


def test_the_command_line_restyles_by_a_style_image(style_server, server, tmp_path):
    import subprocess
    import sys

    (tmp_path / "content.png").write_bytes(png(CONTENT))
    (tmp_path / "style.png").write_bytes(png(STYLE))

    def imago(target: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable, "-m", "imago.client.cli", "--target", target, "generate", "a house",
            "-o", str(tmp_path / "out.png"), "--init", str(tmp_path / "content.png"),
            "--style", str(tmp_path / "style.png"), "--style-scale", "0.5", "--steps", "3",
        ]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    styled = imago(style_server.target)
    assert styled.returncode == 0, styled.stderr
    assert Image.open(tmp_path / "out.png").size == (64, 64)
    refused = imago(server.target)  # the session server has no IP-Adapter
    assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr
