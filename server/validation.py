"""Turning protobuf requests into worker jobs, checking every field.

Each function either returns a fully resolved job (defaults applied, seeds
drawn) or raises RequestError(INVALID_ARGUMENT) naming the offending field.
Images are checked by :mod:`imago.server.images` from their headers only.
"""

from __future__ import annotations

import math
import secrets

import grpc

from imago.server.config import Limits
from imago.server.errors import RequestError, invalid
from imago.server.images import check_image, image_size, output_format
from imago.v1 import align_pb2, caption_pb2, common_pb2, imagegen_pb2, vqa_pb2
from imago.workers.contract.adapters import check_name as check_adapter_name
from imago.workers.contract.protocol import (
    CaptionJob,
    EmbedImagesJob,
    EmbedTextsJob,
    ImageToImageJob,
    InpaintJob,
    MatchJob,
    ModelInfo,
    TextSettings,
    TextToImageJob,
    VqaJob,
)
from imago.workers.contract.schedulers import check_scheduler

MAX_SEED = 2**64 - 1

# Defaults for unset generation settings (transformers' own, except
# max_new_tokens: its default of 20 total tokens is too short for captions).
TEXT_DEFAULTS = {
    "max_new_tokens": 30,
    "min_new_tokens": 0,
    "num_beams": 1,
    "do_sample": False,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "repetition_penalty": 1.0,
    "num_return_sequences": 1,
    "length_penalty": 1.0,
}
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


#: PreviewMethod enum value -> the name workers know the method by.
PREVIEW_METHODS = {
    imagegen_pb2.PREVIEW_METHOD_UNSPECIFIED: "latent_rgb",
    imagegen_pb2.PREVIEW_METHOD_LATENT_RGB: "latent_rgb",
    imagegen_pb2.PREVIEW_METHOD_TAESD: "taesd",
    imagegen_pb2.PREVIEW_METHOD_FULL: "full",
}


def random_seed() -> int:
    """A fresh seed in [0, 2**32), small enough to read back and type in."""
    return secrets.randbits(32)


def decimal(value: float) -> float:
    """The shortest decimal that a protobuf ``float`` (32 bits) came from:
    0.7 arrives as 0.699999988..., and int(10 x that) would run 6 steps, not 7."""
    return float(f"{value:.7g}")


def _get(message, name: str):
    return getattr(message, name) if message.HasField(name) else TEXT_DEFAULTS[name]


def _in_range(field: str, value: float, low: float, high: float, *, low_open: bool = False):
    if not math.isfinite(value):
        raise invalid(field, f"must be a finite number, got {value}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise invalid(field, f"must be in {bracket}{low:g}, {high:g}], got {value:g}")


def text_settings(gen: common_pb2.GenerationSettings, limits: Limits) -> TextSettings:
    """Resolve ``generation`` (field name prefix) against defaults and limits."""
    f = "generation."
    max_new = _get(gen, "max_new_tokens")
    _in_range(f + "max_new_tokens", max_new, 1, limits.max_new_tokens)
    min_new = _get(gen, "min_new_tokens")
    _in_range(f + "min_new_tokens", min_new, 0, max_new)
    beams = _get(gen, "num_beams")
    _in_range(f + "num_beams", beams, 1, limits.max_beams)
    do_sample = _get(gen, "do_sample")
    temperature = _get(gen, "temperature")
    _in_range(f + "temperature", temperature, 0.0, 10.0, low_open=True)
    top_p = _get(gen, "top_p")
    _in_range(f + "top_p", top_p, 0.0, 1.0, low_open=True)
    top_k = _get(gen, "top_k")
    _in_range(f + "top_k", top_k, 0, 1000)
    repetition = _get(gen, "repetition_penalty")
    _in_range(f + "repetition_penalty", repetition, 0.0, 10.0, low_open=True)
    length_penalty = _get(gen, "length_penalty")
    _in_range(f + "length_penalty", length_penalty, -10.0, 10.0)
    sequences = _get(gen, "num_return_sequences")
    _in_range(f + "num_return_sequences", sequences, 1, limits.max_return_sequences)
    if not do_sample and sequences > beams:
        # Deterministic decoding can only return as many distinct sequences as it keeps beams.
        raise invalid(
            f + "num_return_sequences",
            f"{sequences} sequences need num_beams >= {sequences} or do_sample "
            f"(num_beams is {beams})",
        )
    seed = gen.seed if gen.HasField("seed") else random_seed()
    return TextSettings(
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        num_beams=beams,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition,
        num_return_sequences=sequences,
        length_penalty=length_penalty,
        seed=seed,
    )


def _text(field: str, value: str, limits: Limits, *, required: bool) -> str:
    if required and not value.strip():
        raise invalid(field, "must not be empty")
    if len(value) > limits.max_prompt_chars:
        raise invalid(field, f"is {len(value)} characters; at most {limits.max_prompt_chars}")
    return value


def _not_loaded(name: str, field: str, model: ModelInfo | None) -> RequestError:
    """NOT_FOUND for adapter ``name``, naming the adapters ``model`` has loaded."""
    loaded = ", ".join(model.adapters) if model is not None else ""
    where = f" for {model.name}" if model is not None else ""
    return RequestError(
        grpc.StatusCode.NOT_FOUND,
        f"no adapter {name!r} is loaded{where} (loaded: {loaded or 'none'})",
        field,
    )


def _adapter(name: str, model: ModelInfo | None) -> str:
    """The caption or VQA adapter a request names ("" for the base model). A
    malformed name is INVALID_ARGUMENT; a well-formed name ``model`` has not
    loaded (without a model: any name), NOT_FOUND."""
    if not name:
        return ""
    problem = check_adapter_name(name)
    if problem is not None:
        raise invalid("adapter", problem)
    if model is None or name not in model.adapters:
        raise _not_loaded(name, "adapter", model)
    return name


def caption_job(
    request: caption_pb2.CaptionRequest, limits: Limits, model: ModelInfo | None = None
) -> CaptionJob:
    """Resolve a CaptionRequest; ``model`` is the captioning model, whose
    loaded adapters the request may name."""
    prefix = _text("prefix", request.prefix, limits, required=False)
    settings = text_settings(request.generation, limits)
    adapter = _adapter(request.adapter, model)
    return CaptionJob(prefix=prefix.strip(), settings=settings, adapter=adapter)


def vqa_job(request: vqa_pb2.AskRequest, limits: Limits, model: ModelInfo | None = None) -> VqaJob:
    """Resolve an AskRequest; ``model`` as for :func:`caption_job`."""
    question = _text("question", request.question, limits, required=True)
    settings = text_settings(request.generation, limits)
    adapter = _adapter(request.adapter, model)
    return VqaJob(question=question.strip(), settings=settings, adapter=adapter)


def _align_images(images, limits: Limits) -> list[bytes]:
    """The header-checked bytes of 1..max_align_images images."""
    if not images:
        raise invalid("images", "at least one image is required")
    if len(images) > limits.max_align_images:
        message = f"has {len(images)} images; at most {limits.max_align_images} per request"
        raise invalid("images", message)
    return [check_image(image, f"images[{i}]", limits) for i, image in enumerate(images)]


def _align_texts(texts, limits: Limits) -> tuple[str, ...]:
    """1..max_align_texts non-empty texts, stripped."""
    if not texts:
        raise invalid("texts", "at least one text is required")
    if len(texts) > limits.max_align_texts:
        message = f"has {len(texts)} texts; at most {limits.max_align_texts} per request"
        raise invalid("texts", message)
    return tuple(
        _text(f"texts[{i}]", text, limits, required=True).strip() for i, text in enumerate(texts)
    )


def embed_images_job(
    request: align_pb2.EmbedImagesRequest, limits: Limits
) -> tuple[EmbedImagesJob, list[bytes]]:
    images = _align_images(request.images, limits)
    return EmbedImagesJob(images=len(images)), images


def embed_texts_job(request: align_pb2.EmbedTextsRequest, limits: Limits) -> EmbedTextsJob:
    return EmbedTextsJob(texts=_align_texts(request.texts, limits))


def match_job(
    request: align_pb2.MatchRequest, model: ModelInfo, limits: Limits
) -> tuple[MatchJob, list[bytes]]:
    images = _align_images(request.images, limits)
    texts = _align_texts(request.texts, limits)
    if request.image_text_matching:
        if not model.image_text_matching:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {model.name} has no image-text matching head; ask for similarities only",
                "image_text_matching",
            )
        pairs = len(images) * len(texts)
        if pairs > limits.max_match_pairs:
            raise invalid(
                "image_text_matching",
                f"{len(images)} images x {len(texts)} texts make {pairs} pairs; "
                f"at most {limits.max_match_pairs} per request",
            )
    job = MatchJob(images=len(images), texts=texts, image_text_matching=request.image_text_matching)
    return job, images


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
    request: imagegen_pb2.GenerateRequest, model: ModelInfo, limits: Limits, width: int, height: int
) -> dict:
    """Fields every image job shares, resolved; ``width`` and ``height`` are
    already checked."""
    prompt = _text("prompt", request.prompt, limits, required=True)
    negative = _text("negative_prompt", request.negative_prompt, limits, required=False)
    steps = request.steps or DEFAULT_STEPS
    _in_range("steps", steps, 1, limits.max_steps)
    guidance = (
        decimal(request.guidance_scale) if request.HasField("guidance_scale") else DEFAULT_GUIDANCE
    )
    _in_range("guidance_scale", guidance, 0.0, MAX_GUIDANCE)
    num_images = request.num_images or 1
    _in_range("num_images", num_images, 1, limits.max_images_per_request)
    seed = request.seed if request.HasField("seed") else random_seed()
    if seed + num_images - 1 > MAX_SEED:
        raise invalid("seed", f"seed + num_images - 1 must fit in 64 bits, got seed {seed}")
    problem = check_scheduler(request.scheduler)
    if problem is not None:
        raise invalid("scheduler", problem)
    fmt = output_format(request.output_format, "output_format", default="PNG")
    quality = request.output_quality or DEFAULT_QUALITY
    _in_range("output_quality", quality, 1, 100)
    previews = request.previews
    _in_range("previews.every_n_steps", previews.every_n_steps, 0, steps)
    preview_fmt = output_format(previews.format, "previews.format", default="JPEG")
    preview_size = previews.max_size or DEFAULT_PREVIEW_SIZE
    _in_range("previews.max_size", preview_size, 8, limits.max_image_side)
    method = PREVIEW_METHODS.get(previews.method)
    if method is None:
        raise invalid("previews.method", f"unknown preview method {previews.method}")
    if method != "latent_rgb" and method not in model.preview_methods:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"model {model.name} has no {method} decoder for previews; use latent_rgb",
            "previews.method",
        )
    return {
        "prompt": prompt,
        "negative_prompt": negative,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
        "num_images": num_images,
        "output_format": fmt,
        "preview_every": previews.every_n_steps,
        "preview_format": preview_fmt,
        "preview_max_size": preview_size,
        "scheduler": request.scheduler,
        "output_quality": quality,
        "embed_parameters": not request.omit_parameters,
        "preview_method": method,
        "preview_all_images": previews.all_images,
        "loras": _loras(request, model),
    }


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
            raise _not_loaded(lora.name, field, model)
        if lora.name in chosen:
            raise invalid(field, f"adapter {lora.name!r} is named twice")
        weight = decimal(lora.weight) if lora.HasField("weight") else 1.0
        _in_range(f"loras[{index}].weight", weight, -MAX_LORA_WEIGHT, MAX_LORA_WEIGHT)
        chosen[lora.name] = weight
    return tuple(chosen.items())


def text_to_image_job(
    request: imagegen_pb2.GenerateRequest, model: ModelInfo, limits: Limits
) -> TextToImageJob:
    """Resolve a GenerateRequest whose task is text_to_image."""
    if request.WhichOneof("task") != "text_to_image":
        raise invalid("task", "set exactly one of text_to_image, image_to_image, inpaint")
    width = _size("width", request.width, model.default_size, limits)
    height = _size("height", request.height, model.default_size, limits)
    return TextToImageJob(**_generation(request, model, limits, width, height))


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
        _in_range("image_to_image.style_scale", style_scale, 0.0, 2.0, low_open=True)
    field = "image_to_image.init_image"
    init = check_image(task.init_image, field, limits)
    init_width, init_height = image_size(init)
    width = _size("width", request.width, max(64, init_width // 8 * 8), limits, "init image")
    height = _size("height", request.height, max(64, init_height // 8 * 8), limits, "init image")
    strength = decimal(task.strength) or DEFAULT_STRENGTH
    _in_range("image_to_image.strength", strength, 0.0, 1.0, low_open=True)
    job = ImageToImageJob(
        **_generation(request, model, limits, width, height),
        strength=strength,
        style_scale=style_scale,
    )
    if job.steps_run < 1:
        raise invalid(
            "image_to_image.strength",
            f"steps x strength must be at least 1 step, got {job.steps} x {strength:g}",
        )
    return job, [init] if style is None else [init, style]


def inpaint_job(
    request: imagegen_pb2.GenerateRequest, model: ModelInfo, limits: Limits
) -> tuple[InpaintJob, bytes, bytes]:
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
    _in_range("inpaint.strength", strength, 0.0, 1.0, low_open=True)
    job = InpaintJob(**_generation(request, model, limits, width, height), strength=strength)
    if job.steps_run < 1:
        raise invalid(
            "inpaint.strength",
            f"steps x strength must be at least 1 step, got {job.steps} x {strength:g}",
        )
    return job, image, mask


def generate_job(
    request: imagegen_pb2.GenerateRequest, model: ModelInfo, limits: Limits
) -> tuple[TextToImageJob, list[bytes]]:
    """The job a GenerateRequest asks for and the image bytes that go with it."""
    task = request.WhichOneof("task")
    if task is None:
        raise invalid("task", "set exactly one of text_to_image, image_to_image, inpaint")
    if task == "text_to_image":
        return text_to_image_job(request, model, limits), []
    if task == "image_to_image":
        return image_to_image_job(request, model, limits)
    job, image, mask = inpaint_job(request, model, limits)
    return job, [image, mask]
