"""Turning protobuf requests into worker jobs, checking every field
(GenerateRequests in :mod:`imago.server.image_jobs`).

Each job builder takes ``(request, model, limits)``, ``model`` being the
loaded model the request goes to (None where the job does not depend on it),
and either returns a fully resolved job (defaults applied, seeds drawn) with
the image bytes that travel with it, or raises RequestError naming the
offending field (INVALID_ARGUMENT, or another code where the model cannot do
what is asked). Images are checked by :mod:`imago.server.images` from their
headers only.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from typing import Any

import grpc

from imago.server.config import Limits
from imago.server.errors import RequestError, invalid
from imago.server.images import check_image
from imago.v1 import align_pb2, caption_pb2, common_pb2, vqa_pb2
from imago.workers.contract.adapters import check_name as check_adapter_name
from imago.workers.contract.jobs import (
    CaptionJob,
    EmbedImagesJob,
    EmbedTextsJob,
    Job,
    MatchJob,
    TextSettings,
    VqaJob,
)
from imago.workers.contract.protocol import ModelInfo

#: A job builder: (request, model, limits) -> (job, the image bytes sent with it).
JobBuilder = Callable[[Any, ModelInfo, Limits], tuple[Job, list[bytes]]]

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


def random_seed() -> int:
    """A fresh seed in [0, 2**32), small enough to read back and type in."""
    return secrets.randbits(32)


def decimal(value: float) -> float:
    """The shortest decimal that a protobuf ``float`` (32 bits) came from:
    0.7 arrives as 0.699999988..., and int(10 x that) would run 6 steps, not 7."""
    return float(f"{value:.7g}")


def _get(message, name: str):
    return getattr(message, name) if message.HasField(name) else TEXT_DEFAULTS[name]


def in_range(field: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    """INVALID_ARGUMENT on ``field`` unless ``value`` is finite and in
    [low, high], or (low, high] with ``low_open``."""
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
    in_range(f + "max_new_tokens", max_new, 1, limits.max_new_tokens)
    min_new = _get(gen, "min_new_tokens")
    in_range(f + "min_new_tokens", min_new, 0, max_new)
    beams = _get(gen, "num_beams")
    in_range(f + "num_beams", beams, 1, limits.max_beams)
    do_sample = _get(gen, "do_sample")
    temperature = _get(gen, "temperature")
    in_range(f + "temperature", temperature, 0.0, 10.0, low_open=True)
    top_p = _get(gen, "top_p")
    in_range(f + "top_p", top_p, 0.0, 1.0, low_open=True)
    top_k = _get(gen, "top_k")
    in_range(f + "top_k", top_k, 0, 1000)
    repetition = _get(gen, "repetition_penalty")
    in_range(f + "repetition_penalty", repetition, 0.0, 10.0, low_open=True)
    length_penalty = _get(gen, "length_penalty")
    in_range(f + "length_penalty", length_penalty, -10.0, 10.0)
    sequences = _get(gen, "num_return_sequences")
    in_range(f + "num_return_sequences", sequences, 1, limits.max_return_sequences)
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


def checked_text(field: str, value: str, limits: Limits, *, required: bool) -> str:
    """``value``, unless it is blank while ``required`` or longer than
    ``limits.max_prompt_chars`` characters (INVALID_ARGUMENT on ``field``)."""
    if required and not value.strip():
        raise invalid(field, "must not be empty")
    if len(value) > limits.max_prompt_chars:
        raise invalid(field, f"is {len(value)} characters; at most {limits.max_prompt_chars}")
    return value


def adapter_not_loaded(name: str, field: str, model: ModelInfo | None) -> RequestError:
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
        raise adapter_not_loaded(name, "adapter", model)
    return name


def caption_job(
    request: caption_pb2.CaptionRequest, model: ModelInfo | None, limits: Limits
) -> tuple[CaptionJob, list[bytes]]:
    """Resolve a CaptionRequest and its image; ``model`` is the captioning
    model, whose loaded adapters the request may name."""
    prefix = checked_text("prefix", request.prefix, limits, required=False)
    settings = text_settings(request.generation, limits)
    adapter = _adapter(request.adapter, model)
    image = check_image(request.image, "image", limits)
    return CaptionJob(prefix=prefix.strip(), settings=settings, adapter=adapter), [image]


def vqa_job(
    request: vqa_pb2.AskRequest, model: ModelInfo | None, limits: Limits
) -> tuple[VqaJob, list[bytes]]:
    """Resolve an AskRequest and its image; ``model`` as for :func:`caption_job`."""
    question = checked_text("question", request.question, limits, required=True)
    settings = text_settings(request.generation, limits)
    adapter = _adapter(request.adapter, model)
    image = check_image(request.image, "image", limits)
    return VqaJob(question=question.strip(), settings=settings, adapter=adapter), [image]


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
        checked_text(f"texts[{i}]", text, limits, required=True).strip()
        for i, text in enumerate(texts)
    )


def embed_images_job(
    request: align_pb2.EmbedImagesRequest, model: ModelInfo | None, limits: Limits
) -> tuple[EmbedImagesJob, list[bytes]]:
    """Resolve an EmbedImagesRequest and its images."""
    images = _align_images(request.images, limits)
    return EmbedImagesJob(images=len(images)), images


def embed_texts_job(
    request: align_pb2.EmbedTextsRequest, model: ModelInfo | None, limits: Limits
) -> tuple[EmbedTextsJob, list[bytes]]:
    """Resolve an EmbedTextsRequest (it brings no images)."""
    return EmbedTextsJob(texts=_align_texts(request.texts, limits)), []


def match_job(
    request: align_pb2.MatchRequest, model: ModelInfo, limits: Limits
) -> tuple[MatchJob, list[bytes]]:
    """Resolve a MatchRequest and its images; ``model`` is the alignment
    model, which must have an image-text matching head for
    ``image_text_matching``."""
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
