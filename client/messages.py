"""Building ``imago.v1`` request messages from plain Python values.

The clients in :mod:`imago.client.api` and the command line use these; they
are public for callers that drive the stubs or bulk streams themselves.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imago.v1 import align_pb2, caption_pb2, common_pb2, imagegen_pb2, vqa_pb2

if TYPE_CHECKING:
    from PIL import Image as PILImage

    ImageInput = bytes | bytearray | memoryview | str | os.PathLike[str] | PILImage.Image
else:
    ImageInput = Any

#: Names of the GenerationSettings fields, the keywords ``caption`` and ``ask`` accept.
GENERATION_FIELDS: tuple[str, ...] = tuple(
    f.name for f in common_pb2.GenerationSettings.DESCRIPTOR.fields
)

_FORMATS = {
    "png": common_pb2.IMAGE_FORMAT_PNG,
    "jpeg": common_pb2.IMAGE_FORMAT_JPEG,
    "jpg": common_pb2.IMAGE_FORMAT_JPEG,
    "webp": common_pb2.IMAGE_FORMAT_WEBP,
}


def image_bytes(image: ImageInput) -> bytes:
    """The encoded bytes of ``image``.

    ``image`` is encoded image bytes (returned as they are), a path to an image
    file (read as it is), or a PIL image (encoded as PNG). A path that cannot
    be read raises :class:`OSError`.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if hasattr(image, "save") and hasattr(image, "mode"):
        buf = io.BytesIO()
        try:
            image.save(buf, format="PNG")
        except OSError:  # modes PNG cannot hold (CMYK, YCbCr, ...)
            buf = io.BytesIO()
            image.convert("RGBA" if "A" in image.mode else "RGB").save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"image must be bytes, a path or a PIL image, not {type(image).__name__}")


def mime_type(data: bytes) -> str:
    """MIME type of encoded image bytes from their signature; "" when unknown."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return ""


def _image_message(image: ImageInput) -> common_pb2.Image:
    data = image_bytes(image)
    return common_pb2.Image(data=data, mime_type=mime_type(data))


def image_format(name: str | int) -> int:
    """The ``ImageFormat`` value for "png", "jpeg"/"jpg" or "webp" (or an enum value)."""
    if isinstance(name, int):
        common_pb2.ImageFormat.Name(name)  # ValueError when unknown
        return name
    try:
        return _FORMATS[name.lower().lstrip(".")]
    except KeyError:
        raise ValueError(f"unknown image format {name!r}; use png, jpeg or webp") from None


def preview_method_value(name: str | int) -> int:
    """The ``PreviewMethod`` value for "latent_rgb", "taesd" or "full" (or an enum value)."""
    if isinstance(name, int):
        return name
    try:
        return imagegen_pb2.PreviewMethod.Value(f"PREVIEW_METHOD_{name.upper()}")
    except ValueError:
        raise ValueError(
            f"unknown preview method {name!r}; use latent_rgb, taesd or full"
        ) from None


def generation_settings(
    generation: common_pb2.GenerationSettings | None = None, **settings: Any
) -> common_pb2.GenerationSettings:
    """``generation`` (or empty settings) with the keyword ``settings`` set on top.

    Keywords are GenerationSettings field names; a value of None leaves the
    field as it is. An unknown keyword raises :class:`TypeError` naming it.
    """
    unknown = sorted(set(settings) - set(GENERATION_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown generation setting(s): {', '.join(unknown)}; "
            f"known: {', '.join(GENERATION_FIELDS)}"
        )
    merged = common_pb2.GenerationSettings()
    if generation is not None:
        merged.CopyFrom(generation)
    for name, value in settings.items():
        if value is not None:
            setattr(merged, name, value)
    return merged


def caption_request(
    image: ImageInput,
    prefix: str = "",
    generation: common_pb2.GenerationSettings | None = None,
    *,
    adapter: str = "",
    **settings: Any,
) -> caption_pb2.CaptionRequest:
    """A CaptionRequest; see :meth:`ImagoClient.caption`."""
    gen = generation_settings(generation, **settings)
    return caption_pb2.CaptionRequest(
        image=_image_message(image), prefix=prefix, generation=gen, adapter=adapter
    )


def ask_request(
    image: ImageInput,
    question: str,
    generation: common_pb2.GenerationSettings | None = None,
    *,
    adapter: str = "",
    **settings: Any,
) -> vqa_pb2.AskRequest:
    """An AskRequest; see :meth:`ImagoClient.ask`."""
    gen = generation_settings(generation, **settings)
    return vqa_pb2.AskRequest(
        image=_image_message(image), question=question, generation=gen, adapter=adapter
    )


def generate_request(
    prompt: str,
    *,
    negative_prompt: str = "",
    width: int = 0,
    height: int = 0,
    steps: int = 0,
    guidance_scale: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    output_format: str | int = "png",
    preview_every: int = 0,
    preview_format: str | int = "jpeg",
    preview_max_size: int = 0,
    preview_method: str | int = "latent_rgb",
    preview_all_images: bool = False,
    scheduler: str = "",
    init_image: ImageInput | None = None,
    strength: float = 0.0,
    output_quality: int = 0,
    omit_parameters: bool = False,
    mask_image: ImageInput | None = None,
    loras: dict[str, float] | None = None,
    style_image: ImageInput | None = None,
    style_scale: float = 0.0,
) -> imagegen_pb2.GenerateRequest:
    """A GenerateRequest: text-to-image; image-to-image when ``init_image``
    (bytes, a path or a PIL image) is given, redrawing it by ``strength`` in
    (0, 1] (0: the server's 0.8; the steps run are steps x strength, and the
    output takes the init image's size unless ``width`` and ``height`` say
    otherwise); inpainting with a ``mask_image`` as well, whose white pixels
    are repainted (``strength`` 0 means 1).

    0 and None take the server's defaults (native size, 30 steps, guidance
    7.5, a random seed); an empty ``scheduler`` the model's own (else e.g.
    "euler", "dpmpp_2m_karras"). ``preview_method`` is "latent_rgb" (cheap),
    "taesd" (a tiny decoder, if the model has one) or "full" (the VAE);
    previews show image 0 only unless ``preview_all_images``. ``loras`` maps
    adapter names (loaded by the server) to weights. With an ``init_image``,
    a ``style_image`` restyles it through the server's IP-Adapter at
    ``style_scale`` in (0, 2] (0: 1). ``output_quality`` (1..100, 0: 95)
    applies to JPEG and WebP; PNG results carry their generation parameters
    unless ``omit_parameters``.
    """
    request = imagegen_pb2.GenerateRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        steps=steps,
        num_images=num_images,
        output_format=image_format(output_format),
        previews=imagegen_pb2.PreviewOptions(
            every_n_steps=preview_every,
            format=image_format(preview_format),
            max_size=preview_max_size,
            method=preview_method_value(preview_method),
            all_images=preview_all_images,
        ),
        scheduler=scheduler,
        output_quality=output_quality,
        omit_parameters=omit_parameters,
        loras=[imagegen_pb2.LoraWeight(name=n, weight=w) for n, w in (loras or {}).items()],
    )
    if mask_image is not None:
        if init_image is None:
            raise ValueError("mask_image needs init_image, the image to repaint")
        request.inpaint.image.CopyFrom(_image_message(init_image))
        request.inpaint.mask.CopyFrom(_image_message(mask_image))
        request.inpaint.strength = strength
    elif init_image is None:
        request.text_to_image.SetInParent()
    else:
        request.image_to_image.init_image.CopyFrom(_image_message(init_image))
        request.image_to_image.strength = strength
        if style_image is not None:
            request.image_to_image.style_image.CopyFrom(_image_message(style_image))
            request.image_to_image.style_scale = style_scale
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale
    if seed is not None:
        request.seed = seed
    return request


def embed_images_request(images: Sequence[ImageInput]) -> align_pb2.EmbedImagesRequest:
    """EmbedImages for ``images`` (each bytes, a path or a PIL image)."""
    return align_pb2.EmbedImagesRequest(images=[_image_message(image) for image in images])


def embed_texts_request(texts: Sequence[str]) -> align_pb2.EmbedTextsRequest:
    return align_pb2.EmbedTextsRequest(texts=list(texts))


def match_request(
    images: Sequence[ImageInput], texts: Sequence[str], *, image_text_matching: bool = False
) -> align_pb2.MatchRequest:
    """Match every image of ``images`` against every text of ``texts``;
    ``image_text_matching`` also asks for the ITM head's probabilities."""
    return align_pb2.MatchRequest(
        images=[_image_message(image) for image in images],
        texts=list(texts),
        image_text_matching=image_text_matching,
    )


def matrix_rows(matrix: align_pb2.Matrix) -> list[list[float]]:
    """A Matrix as a list of its rows."""
    values, columns = list(matrix.values), matrix.columns
    return [values[row * columns : (row + 1) * columns] for row in range(matrix.rows)]
