"""Decoding the images an image job brings: the init image of image-to-image,
the image and mask of inpainting. Each is decoded once, here in the worker
(the frontend has checked only their headers), and brought to the output size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from PIL import Image

from imago.workers.contract.protocol import ImageToImageJob, InpaintJob


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


def job_inputs(job: ImageToImageJob, frames: list[bytes]) -> JobInputs:
    """The inputs of ``job`` from its frames (image, then mask for inpainting).
    Raises InputError naming the request field at fault."""
    size = (job.width, job.height)
    if isinstance(job, InpaintJob):
        image = _decode(frames[0] if frames else None, "inpaint.image.data", "RGB")
        mask = _decode(frames[1] if len(frames) > 1 else None, "inpaint.mask.data", "L")
        notes = []
        if mask.size != image.size:
            notes.append(
                f"the mask is {mask.width}x{mask.height} but the image "
                f"{image.width}x{image.height}; the mask was resized to fit"
            )
        return JobInputs(_fit(image, size), mask=_fit(mask, size), notes=notes)
    image = _decode(frames[0] if frames else None, "image_to_image.init_image.data", "RGB")
    style = None
    if job.style_scale > 0:
        data = frames[1] if len(frames) > 1 else None
        style = _decode(data, "image_to_image.style_image.data", "RGB")
    return JobInputs(_fit(image, size), style=style)


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)
