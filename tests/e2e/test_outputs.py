"""Result encodings: formats, quality, and the generation parameters in PNGs."""

from __future__ import annotations

import io

import grpc
import pytest
from job_builders import image_job
from PIL import Image

from imago.client import DiffusionOptions, OutputOptions
from imago.client.api import ImagoClient
from imago.workers.contract.jobs import ImageToImageJob, TextToImageJob
from imago.workers.families.diffusion.parameters import parameters_text


def job(**fields) -> TextToImageJob:
    values = dict(
        prompt="a red fox", negative_prompt="", width=64, height=96, steps=12,
        guidance_scale=6.5, seed=3, num_images=1, output_format="PNG", preview_every=0,
        preview_format="JPEG", preview_max_size=0,
    )  # fmt: skip
    values.update(fields)
    return image_job(**values)


def test_parameters_follow_the_layout_other_tools_read():
    text = parameters_text(job(negative_prompt="blurry"), 4, "sd-tiny", "Euler a")
    assert text.splitlines() == [
        "a red fox",
        "Negative prompt: blurry",
        "Steps: 12, Sampler: Euler a, CFG scale: 6.5, Seed: 4, Size: 64x96, Model: sd-tiny",
    ]


def test_parameters_of_image_to_image_name_the_strength_and_skip_an_empty_negative():
    base = job().__struct_fields__
    values = {name: getattr(job(), name) for name in base}
    text = parameters_text(ImageToImageJob(**values, strength=0.6), 3, "sd", "DDIM")
    assert text.splitlines()[0] == "a red fox"
    assert text.endswith("Denoising strength: 0.6")
    assert "Negative prompt" not in text


def test_parameters_name_the_loras_in_the_prompt_line_as_other_tools_do():
    text = parameters_text(job(loras=(("ink", 0.8), ("paper", 1.0))), 3, "sd", "DDIM")
    assert text.splitlines()[0] == "a red fox <lora:ink:0.8> <lora:paper:1>"


@pytest.fixture(scope="module")
def client(server):
    with ImagoClient(server.target, timeout=120) as imago:
        yield imago


def test_png_results_carry_their_parameters(client):
    result = client.generate_result(
        "a lighthouse",
        negative_prompt="fog",
        diffusion=DiffusionOptions(steps=3, seed=41, num_images=2, scheduler="unipc"),
    )
    for offset, generated in enumerate(result.images):
        text = Image.open(io.BytesIO(generated.image.data)).text["parameters"]
        assert text.startswith("a lighthouse\nNegative prompt: fog\nSteps: 3, Sampler: UniPC")
        assert f"Seed: {41 + offset}," in text and "Model: sd-tiny" in text


def test_parameters_can_be_left_out(client):
    result = client.generate_result(
        "a lighthouse",
        diffusion=DiffusionOptions(steps=2),
        output=OutputOptions(embed_parameters=False),
    )
    assert "parameters" not in Image.open(io.BytesIO(result.images[0].image.data)).text


def test_jpeg_quality_is_honoured(client):
    diffusion = DiffusionOptions(steps=2, seed=5, width=256, height=256)

    def size(quality: int) -> int:
        output = OutputOptions(format="jpeg", quality=quality)
        result = client.generate_result("a lighthouse", diffusion=diffusion, output=output)
        return len(result.images[0].image.data)

    sizes = {quality: size(quality) for quality in (20, 95)}
    assert sizes[20] < sizes[95]


@pytest.mark.parametrize("quality", [101, 1000])
def test_quality_out_of_range_names_the_field(client, quality):
    with pytest.raises(grpc.RpcError) as caught:
        client.generate_result(
            "a lighthouse",
            diffusion=DiffusionOptions(steps=2),
            output=OutputOptions(quality=quality),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output_quality" in caught.value.details()


def test_a_prompt_past_the_text_encoders_limit_is_truncated_with_a_warning(client):
    prompt = " ".join(["cat"] * 75 + ["blue", "castle"])
    result = client.generate_result(prompt, diffusion=DiffusionOptions(steps=2))
    assert result.images
    (warning,) = result.warnings
    assert warning.startswith("prompt ") and "'blue castle'" in warning
