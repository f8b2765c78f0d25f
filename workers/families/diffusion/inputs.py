"""Decoding the images an image job brings: the init image (and style image)
of image-to-image, the image and mask of inpainting. Each is decoded once,
here in the worker (the frontend has checked only their headers), and brought
to the output size. Also what each task's pipeline is given of them.

Both go by the job's ``mode`` (its pipeline task), one entry per task in
:data:`DECODERS` and :data:`ARGUMENTS`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from imago.workers.contract.jobs import ImageToImageJob, InpaintJob, TextToImageJob


class InputError(ValueError):
    """An input image that cannot be used; ``field`` names it in the request."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class JobInputs:
    """An image job's inputs at the output size, and what was done to them."""

    image: Image.Image
    mask: Image.Image | None = None
    # The style reference of image-to-image, as sent (the IP-Adapter's own
    # preprocessing sizes it).
    style: Image.Image | None = None
    notes: list[str] = field(default_factory=list)


def _decode(data: bytes | None, field: str, mode: str) -> Image.Image:
    if not data:
        raise InputError(field, "an image is required")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            return opened.convert(mode)
    except Exception as exc:  # PIL raises many types for corrupt data, not only OSError
        raise InputError(field, f"cannot decode the image: {type(exc).__name__}: {exc}") from None


def _inpaint_inputs(job: InpaintJob, frames: list[bytes]) -> JobInputs:
    """The image (frame 0) and mask (frame 1), at the output size."""
    size = (job.params.width, job.params.height)
    image = _decode(frames[0] if frames else None, "inpaint.image.data", "RGB")
    mask = _decode(frames[1] if len(frames) > 1 else None, "inpaint.mask.data", "L")
    notes = []
    if mask.size != image.size:
        notes.append(
            f"the mask is {mask.width}x{mask.height} but the image "
            f"{image.width}x{image.height}; the mask was resized to fit"
        )
    return JobInputs(_fit(image, size), mask=_fit(mask, size), notes=notes)


def _image_to_image_inputs(job: ImageToImageJob, frames: list[bytes]) -> JobInputs:
    """The init image (frame 0) at the output size, and the style image
    (frame 1) as sent when the job restyles by one."""
    size = (job.params.width, job.params.height)
    image = _decode(frames[0] if frames else None, "image_to_image.init_image.data", "RGB")
    style = None
    if job.style_scale > 0:
        data = frames[1] if len(frames) > 1 else None
        style = _decode(data, "image_to_image.style_image.data", "RGB")
    return JobInputs(_fit(image, size), style=style)


#: How each task that brings images decodes them (text-to-image brings none).
DECODERS: dict[str, Callable[[Any, list[bytes]], JobInputs]] = {
    ImageToImageJob.mode: _image_to_image_inputs,
    InpaintJob.mode: _inpaint_inputs,
}


def job_inputs(job: TextToImageJob, frames: list[bytes]) -> JobInputs | None:
    """The inputs of ``job`` from its frames, None for a task without any.
    Raises InputError naming the request field at fault."""
    decode = DECODERS.get(job.mode)
    return None if decode is None else decode(job, frames)


def _text_to_image_arguments(job: TextToImageJob, inputs: list[JobInputs]) -> dict[str, Any]:
    return {"width": job.params.width, "height": job.params.height}


def _image_to_image_arguments(job: ImageToImageJob, inputs: list[JobInputs]) -> dict[str, Any]:
    # The pipeline takes the output size from the init images, already fitted.
    return {"image": [row.image for row in inputs], "strength": job.strength}


def _inpaint_arguments(job: InpaintJob, inputs: list[JobInputs]) -> dict[str, Any]:
    return {
        "image": [row.image for row in inputs],
        "mask_image": [row.mask for row in inputs],
        "strength": job.strength,
        "width": job.params.width,
        "height": job.params.height,
    }


#: The arguments each task's pipeline takes beyond those every call shares,
#: from the group's job (its batch key agrees across the group) and the
#: decoded inputs of each row of the call.
ARGUMENTS: dict[str, Callable[[Any, list[JobInputs]], dict[str, Any]]] = {
    TextToImageJob.mode: _text_to_image_arguments,
    ImageToImageJob.mode: _image_to_image_arguments,
    InpaintJob.mode: _inpaint_arguments,
}


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)
