"""Turning GenerateRequests into image jobs, checking every field.

The builders take ``(request, model, limits)`` and return the job with the
image bytes that travel with it, or raise RequestError naming the offending
field, as those of :mod:`imago.server.validation` do.
"""

from __future__ import annotations

from typing import TypeVar

import grpc

from imago.server.config import Limits
from imago.server.errors import RequestError, invalid
from imago.server.images import check_image, image_size, output_format
from imago.server.validation import (
    JobBuilder,
    adapter_not_loaded,
    checked_text,
    decimal,
    in_range,
    random_seed,
)
from imago.v1 import imagegen_pb2
from imago.workers.contract.adapters import check_name as check_adapter_name
from imago.workers.contract.jobs import (
    DiffusionParams,
    ImageToImageJob,
    InpaintJob,
    Job,
    OutputSpec,
    PreviewSpec,
    TextToImageJob,
)
from imago.workers.contract.preview_methods import DEFAULT_PREVIEW_METHOD, preview_method_name
from imago.workers.contract.protocol import ModelInfo
from imago.workers.contract.schedulers import check_scheduler

MAX_SEED = 2**64 - 1
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.5
MAX_GUIDANCE = 30.0
DEFAULT_PREVIEW_SIZE = 512
# Largest LoRA weight either way.
MAX_LORA_WEIGHT = 4.0
# Quality of JPEG and WebP results unless asked otherwise.
DEFAULT_QUALITY = 95
# diffusers' default image-to-image strength.
DEFAULT_STRENGTH = 0.8

ImageJobType = TypeVar("ImageJobType", bound=TextToImageJob)


def _size(field: str, value: int, default: int, limits: Limits, source: str = "") -> int:
    """``value`` checked, or ``default`` when it is 0. A default taken from the
    input image ``source`` is checked too: input images may be larger than
    outputs."""
    if value == 0:
        if default > limits.max_image_side:
            raise invalid(
                field,
                f"is unset, so it would take the {source}'s {default} pixels, over the "
                f"limit of {limits.max_image_side}; set it to a multiple of 8 in "
                f"[64, {limits.max_image_side}]",
            )
        return default
    if value % 8:
        raise invalid(field, f"must be a multiple of 8, got {value}")
    if value < 64 or value > limits.max_image_side:
        raise invalid(field, f"must be in [64, {limits.max_image_side}], got {value}")
    return value


def _generation(
    job_type: type[ImageJobType],
    request: imagegen_pb2.GenerateRequest,
    model: ModelInfo,
    limits: Limits,
    size: tuple[int, int],
    **task: float,
) -> ImageJobType:
    """A ``job_type`` job with the fields every image job shares resolved, at
    ``size`` (width, height in pixels, already checked), with the task's own
    fields ``task`` (strength, style scale)."""
    prompt = checked_text("prompt", request.prompt, limits, required=True)
    negative = checked_text("negative_prompt", request.negative_prompt, limits, required=False)
    steps = request.steps or DEFAULT_STEPS
    in_range("steps", steps, 1, limits.max_steps)
    guidance = (
        decimal(request.guidance_scale) if request.HasField("guidance_scale") else DEFAULT_GUIDANCE
    )
    in_range("guidance_scale", guidance, 0.0, MAX_GUIDANCE)
    num_images = request.num_images or 1
    in_range("num_images", num_images, 1, limits.max_images_per_request)
    seed = request.seed if request.HasField("seed") else random_seed()
    if seed + num_images - 1 > MAX_SEED:
        raise invalid("seed", f"seed + num_images - 1 must fit in 64 bits, got seed {seed}")
    problem = check_scheduler(request.scheduler)
    if problem is not None:
        raise invalid("scheduler", problem)
    fmt = output_format(request.output_format, "output_format", default="PNG")
    quality = request.output_quality or DEFAULT_QUALITY
    in_range("output_quality", quality, 1, 100)
    previews = request.previews
    in_range("previews.every_n_steps", previews.every_n_steps, 0, steps)
    preview_fmt = output_format(previews.format, "previews.format", default="JPEG")
    preview_size = previews.max_size or DEFAULT_PREVIEW_SIZE
    in_range("previews.max_size", preview_size, 8, limits.max_image_side)
    method = preview_method_name(previews.method)
    if method is None:
        raise invalid("previews.method", f"unknown preview method {previews.method}")
    if method != DEFAULT_PREVIEW_METHOD and method not in model.preview_methods:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"model {model.name} has no {method} decoder for previews; "
            f"use {DEFAULT_PREVIEW_METHOD}",
            "previews.method",
        )
    width, height = size
    params = DiffusionParams(
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        scheduler=request.scheduler,
        loras=_loras(request, model),
    )
    return job_type(
        prompt=prompt,
        negative_prompt=negative,
        params=params,
        seed=seed,
        num_images=num_images,
        output=OutputSpec(
            format=fmt, quality=quality, embed_parameters=not request.omit_parameters
        ),
        preview=PreviewSpec(
            every=previews.every_n_steps,
            format=preview_fmt,
            max_size=preview_size,
            method=method,
            all_images=previews.all_images,
        ),
        **task,
    )


def _loras(
    request: imagegen_pb2.GenerateRequest, model: ModelInfo
) -> tuple[tuple[str, float], ...]:
    """The requested adapters as (name, weight). A malformed name or weight is
    INVALID_ARGUMENT; a well-formed name the model has not loaded, NOT_FOUND."""
    chosen: dict[str, float] = {}
    for index, lora in enumerate(request.loras):
        field = f"loras[{index}].name"
        problem = check_adapter_name(lora.name)
        if problem is not None:
            raise invalid(field, problem)
        if lora.name not in model.adapters:
            raise adapter_not_loaded(lora.name, field, model)
        if lora.name in chosen:
            raise invalid(field, f"adapter {lora.name!r} is named twice")
        weight = decimal(lora.weight) if lora.HasField("weight") else 1.0
        in_range(f"loras[{index}].weight", weight, -MAX_LORA_WEIGHT, MAX_LORA_WEIGHT)
        chosen[lora.name] = weight
    return tuple(chosen.items())


def text_to_image_job(
    request: imagegen_pb2.GenerateRequest, model: ModelInfo, limits: Limits
) -> tuple[TextToImageJob, list[bytes]]:
    """Resolve a GenerateRequest whose task is text_to_image (it brings no
    images). Width and height default to the model's native size."""
    if request.WhichOneof("task") != "text_to_image":
        raise invalid("task", "set exactly one of text_to_image, image_to_image, inpaint")
    width = _size("width", request.width, model.default_size, limits)
    height = _size("height", request.height, model.default_size, limits)
    return _generation(TextToImageJob, request, model, limits, (width, height)), []


def image_to_image_job(
    request: imagegen_pb2.GenerateRequest, model: ModelInfo, limits: Limits
) -> tuple[ImageToImageJob, list[bytes]]:
    """Resolve a GenerateRequest whose task is image_to_image; also return the
    init image's bytes, then the style image's when there is one. Width and
    height default to the init image's size, rounded down to multiples of 8."""
    task = request.image_to_image
    style, style_scale = None, 0.0
    if task.HasField("style_image"):
        if not model.style_images:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"restyling by a style image needs an IP-Adapter, and model {model.name} has "
                "none; restyle by the prompt instead",
                "image_to_image.style_image",
            )
        style = check_image(task.style_image, "image_to_image.style_image", limits)
        style_scale = decimal(task.style_scale) or 1.0
        in_range("image_to_image.style_scale", style_scale, 0.0, 2.0, low_open=True)
    field = "image_to_image.init_image"
    init = check_image(task.init_image, field, limits)
    init_width, init_height = image_size(init)
    width = _size("width", request.width, max(64, init_width // 8 * 8), limits, "init image")
    height = _size("height", request.height, max(64, init_height // 8 * 8), limits, "init image")
    strength = decimal(task.strength) or DEFAULT_STRENGTH
    in_range("image_to_image.strength", strength, 0.0, 1.0, low_open=True)
    job = _generation(
        ImageToImageJob,
        request,
        model,
        limits,
        (width, height),
        strength=strength,
        style_scale=style_scale,
    )
    if job.steps_run < 1:
        raise invalid(
            "image_to_image.strength",
            f"steps x strength must be at least 1 step, got {job.params.steps} x {strength:g}",
        )
    return job, [init] if style is None else [init, style]


def inpaint_job(
    request: imagegen_pb2.GenerateRequest, model: ModelInfo, limits: Limits
) -> tuple[InpaintJob, list[bytes]]:
    """Resolve a GenerateRequest whose task is inpaint; also return the image's
    and the mask's bytes. Width and height default to the image's size, rounded
    down to multiples of 8; a mask of another size is resized by the worker,
    which says so in the result's warnings."""
    task = request.inpaint
    image = check_image(task.image, "inpaint.image", limits)
    mask = check_image(task.mask, "inpaint.mask", limits)
    image_width, image_height = image_size(image)
    width = _size("width", request.width, max(64, image_width // 8 * 8), limits, "image")
    height = _size("height", request.height, max(64, image_height // 8 * 8), limits, "image")
    strength = decimal(task.strength) or 1.0
    in_range("inpaint.strength", strength, 0.0, 1.0, low_open=True)
    job = _generation(InpaintJob, request, model, limits, (width, height), strength=strength)
    if job.steps_run < 1:
        raise invalid(
            "inpaint.strength",
            f"steps x strength must be at least 1 step, got {job.params.steps} x {strength:g}",
        )
    return job, [image, mask]


#: The builder of each task a GenerateRequest may set.
GENERATE_TASKS: dict[str, JobBuilder] = {
    "text_to_image": text_to_image_job,
    "image_to_image": image_to_image_job,
    "inpaint": inpaint_job,
}


def generate_job(
    request: imagegen_pb2.GenerateRequest, model: ModelInfo, limits: Limits
) -> tuple[Job, list[bytes]]:
    """The job a GenerateRequest asks for and the image bytes that go with it."""
    task = request.WhichOneof("task")
    if task is None:
        raise invalid("task", "set exactly one of text_to_image, image_to_image, inpaint")
    return GENERATE_TASKS[task](request, model, limits)
