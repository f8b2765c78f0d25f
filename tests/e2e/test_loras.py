"""LoRA adapters: loaded from a directory, chosen per request, reloaded on SIGHUP."""

from __future__ import annotations

import io
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import start_server
from diffusers import StableDiffusionPipeline
from PIL import Image

from imago.client import DiffusionOptions
from imago.client.api import ImagoClient
from imago.workers.checkpoints import tiny
from imago.workers.contract.adapters import check_name


def make_lora(directory: Path, name: str, seed: int, model_cache: Path) -> Path:
    """Write a random-weight LoRA for the tiny UNet as ``directory/name.safetensors``."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny.ensure("stable-diffusion", model_cache))
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,
    )  # fmt: skip
    pipe.unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        weight_name=f"{name}.safetensors",
    )
    return directory / f"{name}.safetensors"


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].image.data)), dtype=np.int16)


@pytest.fixture(scope="module")
def lora_dir(model_cache, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("loras")
    make_lora(directory, "ink", 1, model_cache)
    (directory / "not an adapter name.safetensors").write_bytes(b"skipped")
    return directory


@pytest.fixture(scope="module")
def lora_server(model_cache, lora_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("lora-logs")
    running = start_server(model_cache, logs, "--workers", "1", "--lora-dir", str(lora_dir))
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def client(lora_server):
    with ImagoClient(lora_server.target, timeout=120) as imago:
        yield imago


def generate(client: ImagoClient, loras: dict[str, float] | None = None):
    diffusion = DiffusionOptions(steps=3, seed=4, loras=loras or {})
    return client.generate_result("a fox", diffusion=diffusion)


@pytest.mark.parametrize("name", ["ink", "v1.2_soft-light", "A9"])
def test_plain_file_stems_are_adapter_names(name):
    assert check_name(name) is None


@pytest.mark.parametrize("name", ["", "../ink", "a/b", ".hidden", "a..b", "x" * 65, "ink\n"])
def test_paths_and_odd_names_are_not(name):
    assert check_name(name) is not None


def test_an_adapter_changes_the_image_and_equals_diffusers(client, lora_dir, model_cache):
    plain, inked = generate(client), generate(client, loras={"ink": 0.8})
    assert np.abs(pixels(plain) - pixels(inked)).max() > 1
    pipe = StableDiffusionPipeline.from_pretrained(tiny.ensure("stable-diffusion", model_cache))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_dir), weight_name="ink.safetensors", adapter_name="ink")
    pipe.set_adapters(["ink"], adapter_weights=[0.8])
    direct = pipe("a fox", num_inference_steps=3, generator=[torch.Generator().manual_seed(4)])
    assert np.abs(pixels(inked) - np.asarray(direct.images[0], dtype=np.int16)).max() <= 1


def test_a_request_without_adapters_is_untouched_by_an_earlier_one(client):
    before = pixels(generate(client))
    generate(client, loras={"ink": 1.0})
    assert np.abs(pixels(generate(client)) - before).max() == 0


def test_an_unknown_adapter_is_not_found_naming_the_field(client):
    with pytest.raises(grpc.RpcError) as caught:
        generate(client, loras={"ink": 1.0, "watercolour": 1.0})
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "loras[1].name" in caught.value.details() and "ink" in caught.value.details()


@pytest.mark.parametrize("name", ["../ink", "not an adapter name"])
def test_a_malformed_adapter_name_is_invalid(client, name):
    with pytest.raises(grpc.RpcError) as caught:
        generate(client, loras={name: 1.0})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "loras[0].name" in caught.value.details()


def test_sighup_reloads_the_adapter_directory(model_cache, tmp_path):
    directory = tmp_path / "adapters"
    directory.mkdir()
    make_lora(directory, "ink", 1, model_cache)
    server = start_server(model_cache, tmp_path, "--workers", "1", "--lora-dir", str(directory))
    try:
        with ImagoClient(server.target, timeout=120) as client:
            assert generate(client, loras={"ink": 1.0}).images
            make_lora(directory, "chalk", 2, model_cache)
            (directory / "ink.safetensors").unlink()
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while True:
                try:
                    assert generate(client, loras={"chalk": 1.0}).images
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND
                    assert time.monotonic() < deadline, "chalk never loaded"
                    time.sleep(0.2)
            with pytest.raises(grpc.RpcError) as caught:
                generate(client, loras={"ink": 1.0})
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        assert server.stop() == 0, server.log()
    assert "reloaded adapters" in server.log()


def test_the_command_line_applies_an_adapter_by_name_and_weight(lora_server, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "inked.png"
    command = [
        sys.executable, "-m", "imago.client.cli", "--target", lora_server.target, "generate",
        "a fox", "-o", str(out), "--steps", "3", "--seed", "4", "--lora", "ink:0.8",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Model: sd-tiny" in Image.open(out).text["parameters"]
    missing = subprocess.run([*command[:-1], "nope"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_the_adapters_loaded_are_logged_at_start(lora_server):
    assert "loaded adapters for sd-tiny: ['ink']" in lora_server.log()
