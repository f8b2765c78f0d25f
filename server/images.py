"""Checking client images before they are queued.

The frontend reads each input image's header, which is cheap enough for the
event loop, to prove it is a PNG, JPEG or WebP within the size limits before it
is queued. Its pixels are decoded once, by the worker that uses them: a body
that turns out truncated or corrupt fails there with the same
INVALID_ARGUMENT naming ``image.data``. The worker receives the original
bytes, untouched.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from imago.server.config import Limits
from imago.server.errors import invalid
from imago.v1 import common_pb2

# PIL format name -> MIME type, for every format accepted in requests. PIL
# names a JPEG that holds more than one picture (as cameras and phones write
# them) MPO; it is still a JPEG, and decodes as its first picture.
ACCEPTED_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "WEBP": "image/webp",
}

# Most scans a JPEG may have (counted as start-of-scan markers, embedded
# thumbnails and further pictures included). Baseline JPEGs have one per
# picture and progressive ones about ten; libjpeg decodes every scan over the
# whole image, so a few kilobytes of empty scans on a large image keep a
# worker decoding for minutes, deaf to cancellation and deadlines.
MAX_JPEG_SCANS = 100
_START_OF_SCAN = b"\xff\xda"

# ImageFormat enum value -> PIL format name, for outputs and previews.
OUTPUT_FORMATS = {
    common_pb2.IMAGE_FORMAT_PNG: "PNG",
    common_pb2.IMAGE_FORMAT_JPEG: "JPEG",
    common_pb2.IMAGE_FORMAT_WEBP: "WEBP",
}


def output_format(value: int, field: str, default: str) -> str:
    """PIL format name for an ImageFormat enum value; UNSPECIFIED -> ``default``."""
    if value == common_pb2.IMAGE_FORMAT_UNSPECIFIED:
        return default
    if value not in OUTPUT_FORMATS:
        names = ", ".join(common_pb2.ImageFormat.Name(v) for v in OUTPUT_FORMATS)
        raise invalid(field, f"unknown image format {value}; use one of {names}")
    return OUTPUT_FORMATS[value]


def check_image(image: common_pb2.Image, field: str, limits: Limits) -> bytes:
    """Return the image's bytes once its header shows an accepted format within
    the limits. Reads the header (and counts a JPEG's scan markers), never
    decodes the pixels: microseconds, or a millisecond for megabytes.

    Raises RequestError(INVALID_ARGUMENT) naming ``field.data`` or
    ``field.mime_type``.
    """
    data = image.data
    if not data:
        raise invalid(f"{field}.data", "an image is required")
    try:
        with warnings.catch_warnings():
            # Size is checked below from the header, before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises many types for garbage
        raise invalid(f"{field}.data", f"not a decodable image ({_reason(exc)})") from None
    with opened:
        fmt = opened.format or ""
        if fmt not in ACCEPTED_FORMATS:
            accepted = "send PNG, JPEG or WebP"
            raise invalid(f"{field}.data", f"format {fmt or 'unknown'} not accepted; {accepted}")
        if image.mime_type and image.mime_type.lower() != ACCEPTED_FORMATS[fmt]:
            raise invalid(
                f"{field}.mime_type",
                f"says {image.mime_type!r} but the bytes are {ACCEPTED_FORMATS[fmt]}",
            )
        width, height = opened.size
        if width < 1 or height < 1:
            raise invalid(f"{field}.data", "image has no pixels")
        if max(width, height) > limits.max_input_side:
            raise invalid(
                f"{field}.data",
                f"image is {width}x{height}; the longest side may be {limits.max_input_side}",
            )
        if width * height > limits.max_input_pixels:
            raise invalid(
                f"{field}.data",
                f"image has {width * height} pixels; at most {limits.max_input_pixels} allowed",
            )
    if ACCEPTED_FORMATS[fmt] == "image/jpeg":
        # Entropy-coded data escapes 0xFF as 0xFF00, so every 0xFFDA is a
        # marker; counting them is a memchr-speed pass over the bytes.
        scans = data.count(_START_OF_SCAN)
        if scans > MAX_JPEG_SCANS:
            raise invalid(f"{field}.data", f"JPEG has {scans} scans; at most {MAX_JPEG_SCANS}")
    return data


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of image bytes already accepted by :func:`check_image`,
    from the header."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as opened:
            return opened.size
