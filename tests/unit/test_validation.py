"""Field validation of requests, before anything is queued."""

from __future__ import annotations

import grpc
import pytest
from conftest import png_bytes

from imago.server.config import Limits
from imago.server.errors import RequestError
from imago.server.image_jobs import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    generate_job,
    image_to_image_job,
    text_to_image_job,
)
from imago.server.validation import caption_job, text_settings, vqa_job
from imago.v1 import caption_pb2, common_pb2, imagegen_pb2, vqa_pb2
from imago.workers.contract.protocol import ModelInfo

LIMITS = Limits()
SD = ModelInfo(name="sd", family="stable-diffusion", source="x", default_size=64)


def generate(**fields) -> imagegen_pb2.GenerateRequest:
    fields.setdefault("prompt", "a red fox")
    fields.setdefault("text_to_image", imagegen_pb2.TextToImage())
    return imagegen_pb2.GenerateRequest(**fields)


def rejected(call, *args) -> RequestError:
    with pytest.raises(RequestError) as caught:
        call(*args)
    return caught.value


def text_to_image(request: imagegen_pb2.GenerateRequest, model: ModelInfo = SD):
    job, _ = text_to_image_job(request, model, LIMITS)
    return job


def test_unset_generation_settings_take_the_defaults():
    settings = text_settings(common_pb2.GenerationSettings(), LIMITS)
    assert (settings.max_new_tokens, settings.num_beams, settings.do_sample) == (30, 1, False)
    assert settings.num_return_sequences == 1


def test_given_seed_is_kept_and_missing_seed_is_drawn():
    assert text_settings(common_pb2.GenerationSettings(seed=7), LIMITS).seed == 7
    drawn = {text_settings(common_pb2.GenerationSettings(), LIMITS).seed for _ in range(5)}
    assert len(drawn) > 1


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_new_tokens": 0}, "generation.max_new_tokens"),
        ({"max_new_tokens": 100_000}, "generation.max_new_tokens"),
        ({"max_new_tokens": 5, "min_new_tokens": 6}, "generation.min_new_tokens"),
        ({"num_beams": 0}, "generation.num_beams"),
        ({"num_beams": 99}, "generation.num_beams"),
        ({"temperature": 0.0}, "generation.temperature"),
        ({"temperature": float("nan")}, "generation.temperature"),
        ({"top_p": 1.5}, "generation.top_p"),
        ({"top_p": 0.0}, "generation.top_p"),
        ({"top_k": 5000}, "generation.top_k"),
        ({"repetition_penalty": 0.0}, "generation.repetition_penalty"),
        ({"length_penalty": float("inf")}, "generation.length_penalty"),
        ({"num_return_sequences": 0}, "generation.num_return_sequences"),
        ({"num_return_sequences": 3, "num_beams": 2}, "generation.num_return_sequences"),
        ({"num_return_sequences": 2}, "generation.num_return_sequences"),
    ],
)
def test_out_of_range_generation_setting_names_its_field(fields, field):
    error = rejected(text_settings, common_pb2.GenerationSettings(**fields), LIMITS)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field == field


def test_several_sampled_sequences_need_no_beams():
    gen = common_pb2.GenerationSettings(do_sample=True, num_return_sequences=3)
    assert text_settings(gen, LIMITS).num_return_sequences == 3


def test_empty_question_is_rejected():
    error = rejected(vqa_job, vqa_pb2.AskRequest(question="   "), None, LIMITS)
    assert error.field == "question"


def test_question_is_stripped_and_kept():
    image = common_pb2.Image(data=png_bytes())
    job, _ = vqa_job(vqa_pb2.AskRequest(question="  what colour?  ", image=image), None, LIMITS)
    assert job.question == "what colour?"


def test_overlong_prefix_is_rejected():
    request = caption_pb2.CaptionRequest(prefix="x" * (LIMITS.max_prompt_chars + 1))
    assert rejected(caption_job, request, None, LIMITS).field == "prefix"


def test_generate_defaults_come_from_the_model_and_the_server():
    job = text_to_image(generate())
    assert (job.params.width, job.params.height) == (64, 64)
    assert job.params.steps == DEFAULT_STEPS
    assert job.params.guidance_scale == DEFAULT_GUIDANCE
    assert (job.num_images, job.output.format, job.preview.every) == (1, "PNG", 0)


def test_explicit_zero_guidance_is_kept():
    assert text_to_image(generate(guidance_scale=0.0)).params.guidance_scale == 0.0


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": " \n "}, "prompt"),
        ({"width": 100}, "width"),
        ({"height": 4096}, "height"),
        ({"width": 8}, "width"),
        ({"steps": 151}, "steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": 31.0}, "guidance_scale"),
        ({"num_images": 9}, "num_images"),
        ({"output_format": 42}, "output_format"),
        ({"seed": 2**64 - 1, "num_images": 2}, "seed"),
        ({"previews": imagegen_pb2.PreviewOptions(every_n_steps=31)}, "previews.every_n_steps"),
        ({"previews": imagegen_pb2.PreviewOptions(format=9)}, "previews.format"),
        ({"previews": imagegen_pb2.PreviewOptions(max_size=4)}, "previews.max_size"),
    ],
)
def test_invalid_generate_field_is_named(fields, field):
    error = rejected(text_to_image_job, generate(**fields), SD, LIMITS)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field == field


def test_generate_without_a_task_is_invalid():
    request = imagegen_pb2.GenerateRequest(prompt="a fox")
    error = rejected(text_to_image_job, request, SD, LIMITS)
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "task")


def inpaint(image_size=(100, 70), mask_size=(100, 70), **task) -> imagegen_pb2.GenerateRequest:
    image = common_pb2.Image(data=png_bytes(size=image_size))
    mask = common_pb2.Image(data=png_bytes(size=mask_size))
    return imagegen_pb2.GenerateRequest(
        prompt="a fox", inpaint=imagegen_pb2.Inpaint(image=image, mask=mask, **task)
    )


def test_inpaint_takes_the_images_size_full_strength_and_both_images():
    job, images = generate_job(inpaint(mask_size=(20, 20)), SD, LIMITS)
    assert (job.params.width, job.params.height, job.strength, job.steps_run) == (96, 64, 1.0, 30)
    assert len(images) == 2


def test_a_mask_that_is_not_an_image_names_the_field():
    request = inpaint()
    request.inpaint.mask.data = b"white where it should change"
    error = rejected(generate_job, request, SD, LIMITS)
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "inpaint.mask.data")


def test_inpaint_strength_out_of_range_names_the_field():
    error = rejected(generate_job, inpaint(strength=2.0), SD, LIMITS)
    assert error.field == "inpaint.strength"


def img2img(size=(100, 70), **task) -> imagegen_pb2.GenerateRequest:
    init = common_pb2.Image(data=png_bytes(size=size))
    return imagegen_pb2.GenerateRequest(
        prompt="a fox", image_to_image=imagegen_pb2.ImageToImage(init_image=init, **task)
    )


def test_image_to_image_takes_the_init_images_size_and_default_strength():
    job, (init,) = image_to_image_job(img2img(size=(100, 70)), SD, LIMITS)
    assert (job.params.width, job.params.height, job.strength) == (96, 64, 0.8)
    assert job.steps_run == 24  # 30 steps x 0.8
    assert init.startswith(b"\x89PNG")
    request = img2img(strength=0.5)
    request.width, request.height, request.steps = 128, 64, 10
    job, _ = image_to_image_job(request, SD, LIMITS)
    assert (job.params.width, job.params.height, job.steps_run) == (128, 64, 5)


def test_float_fields_mean_the_decimal_the_client_wrote():
    request = img2img(strength=0.7)
    request.steps, request.guidance_scale = 10, 7.3
    job, _ = image_to_image_job(request, SD, LIMITS)
    assert (job.strength, job.steps_run, job.params.guidance_scale) == (0.7, 7, 7.3)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_image_to_image_strength_out_of_range_names_the_field(strength):
    error = rejected(image_to_image_job, img2img(strength=strength), SD, LIMITS)
    assert (error.code, error.field) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "image_to_image.strength",
    )


def test_image_to_image_running_no_step_is_refused():
    request = img2img(strength=0.05)
    request.steps = 10
    assert rejected(image_to_image_job, request, SD, LIMITS).field == "image_to_image.strength"


def test_image_to_image_needs_an_init_image():
    request = imagegen_pb2.GenerateRequest(
        prompt="a fox", image_to_image=imagegen_pb2.ImageToImage(strength=0.5)
    )
    assert rejected(image_to_image_job, request, SD, LIMITS).field == (
        "image_to_image.init_image.data"
    )


def test_a_style_image_without_an_ip_adapter_is_a_failed_precondition():
    request = img2img()
    request.image_to_image.style_image.data = png_bytes()
    error = rejected(image_to_image_job, request, SD, LIMITS)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.field == "image_to_image.style_image" and "IP-Adapter" in error.message


def test_a_named_scheduler_is_kept_and_an_unknown_one_names_the_field():
    assert text_to_image(generate(scheduler="unipc")).params.scheduler == "unipc"
    assert text_to_image(generate()).params.scheduler == ""
    error = rejected(text_to_image_job, generate(scheduler="../euler"), SD, LIMITS)
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "scheduler")
    assert "dpmpp_2m_karras" in error.message


def test_a_preview_method_the_model_lacks_fails_its_precondition():
    request = generate(
        previews=imagegen_pb2.PreviewOptions(method=imagegen_pb2.PREVIEW_METHOD_TAESD)
    )
    error = rejected(text_to_image_job, request, SD, LIMITS)
    assert (error.code, error.field) == (grpc.StatusCode.FAILED_PRECONDITION, "previews.method")
    with_taesd = ModelInfo(name="sd", family="stable-diffusion", source="x", default_size=64,
                           preview_methods=["full", "taesd"])  # fmt: skip
    assert text_to_image(request, with_taesd).preview.method == "taesd"
    assert text_to_image(generate()).preview.method == "latent_rgb"
