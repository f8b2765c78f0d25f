"""Checks on client images: format, size, integrity."""

from __future__ import annotations

import io

import pytest
from conftest import png_bytes
from PIL import Image

from imago.server.config import Limits
from imago.server.errors import RequestError
from imago.server.images import check_image
from imago.v1 import common_pb2

LIMITS = Limits()


def check(data: bytes, mime: str = "", limits: Limits = LIMITS) -> bytes:
    return check_image(common_pb2.Image(data=data, mime_type=mime), "image", limits)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_pass_through_unchanged(fmt):
    data = png_bytes(fmt=fmt)
    assert check(data) is data or check(data) == data


def test_missing_image_names_the_data_field():
    with pytest.raises(RequestError) as caught:
        check(b"")
    assert caught.value.field == "image.data"


def test_garbage_bytes_are_not_an_image():
    with pytest.raises(RequestError, match="not a decodable image"):
        check(b"this is not an image at all")


def test_only_the_header_is_read_so_a_truncated_body_passes_to_the_worker():
    # The worker decodes the pixels and rejects the body (see test_invalid_requests).
    truncated = png_bytes(size=(300, 300))[:200]
    assert check(truncated) == truncated


def test_gif_is_not_accepted():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "GIF")
    with pytest.raises(RequestError, match="format GIF not accepted"):
        check(buffer.getvalue())


def test_mime_type_that_contradicts_the_bytes_is_rejected():
    with pytest.raises(RequestError) as caught:
        check(png_bytes(), mime="image/jpeg")
    assert caught.value.field == "image.mime_type"


def test_too_many_pixels_is_rejected_before_decoding():
    small = Limits(max_input_pixels=100)
    with pytest.raises(RequestError, match="pixels"):
        check(png_bytes(size=(20, 20)), limits=small)


def test_too_long_a_side_is_rejected():
    with pytest.raises(RequestError, match="longest side"):
        check(png_bytes(size=(50, 10)), limits=Limits(max_input_side=40))


def test_decompression_bomb_header_is_rejected_without_decoding():
    # A 20000x20000 PNG compresses to a few hundred kB of zeros.
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, "PNG")
    with pytest.raises(RequestError, match="pixels"):
        check(buffer.getvalue())
