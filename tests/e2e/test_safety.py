"""A model set with a safety checker: flagged images are said to be replaced."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import start_server
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor

from imago.client import DiffusionOptions, ImageToImage
from imago.client.api import ImagoClient
from imago.workers.checkpoints import tiny


def flag_everything_checkpoint(model_cache, directory) -> None:
    """The tiny model with a tiny safety checker whose thresholds every image
    crosses, saved to ``directory``."""
    base = StableDiffusionPipeline.from_pretrained(tiny.ensure("stable-diffusion", model_cache))
    clip = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config={**clip, "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={**clip, "image_size": 32, "patch_size": 4},
        projection_dim=32,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-1.0)
        checker.special_care_embeds_weights.fill_(-1.0)
    components = {
        **base.components,
        "safety_checker": checker,
        "feature_extractor": CLIPImageProcessor(crop_size=32, size=32),
    }
    StableDiffusionPipeline(**components, requires_safety_checker=True).save_pretrained(directory)


@pytest.fixture(scope="module")
def client(model_cache, tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("checked-sd")
    flag_everything_checkpoint(model_cache, checkpoint)
    logs = tmp_path_factory.mktemp("checked-logs")
    server = start_server(
        model_cache, logs, "--workers", "1", "--model", f"stable-diffusion={checkpoint}"
    )
    try:
        with ImagoClient(server.target, timeout=120) as imago:
            yield imago
    finally:
        assert server.stop() == 0, server.log()


def test_a_flagged_image_says_it_was_replaced_and_the_result_warns(client):
    result = client.generate_result(
        "a fox", diffusion=DiffusionOptions(steps=2, num_images=2, seed=3)
    )
    assert [(i.nsfw_detected, i.replaced) for i in result.images] == [(True, True)] * 2
    assert any("safety checker flagged image 0, 1" in w for w in result.warnings)
    black = np.asarray(Image.open(io.BytesIO(result.images[0].image.data)))
    assert black.max() == 0


def test_image_to_image_is_checked_too(client):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(buffer, "PNG")
    result = client.generate_result(
        "a fox", diffusion=DiffusionOptions(steps=2), edit=ImageToImage(buffer.getvalue())
    )
    assert result.images[0].nsfw_detected and result.images[0].replaced


def test_without_a_checker_nothing_is_flagged(server):
    with ImagoClient(server.target, timeout=120) as plain:
        result = plain.generate_result("a fox", diffusion=DiffusionOptions(steps=2))
    assert not result.images[0].nsfw_detected and not result.images[0].replaced
    assert not any("safety" in w for w in result.warnings)
