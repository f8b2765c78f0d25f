"""Building ``imago.v1`` request messages from plain Python values and the
option objects of :mod:`imago.client.options`.

The clients in :mod:`imago.client.api` and the command line use these; they
are public for callers that drive the stubs or bulk streams themselves.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imago.client.options import (
    DiffusionOptions,
    ImageInput,
    ImageToImage,
    Inpaint,
    OutputOptions,
    PreviewOptions,
    TextOptions,
)
from imago.v1 import align_pb2, caption_pb2, common_pb2, imagegen_pb2, vqa_pb2

#: Names of the GenerationSettings fields, those of :class:`TextOptions` too.
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


#: Preview method names a request may use, from the API's enum
#: (PREVIEW_METHOD_LATENT_RGB is "latent_rgb"), in the enum's order.
PREVIEW_METHODS = tuple(
    name.removeprefix("PREVIEW_METHOD_").lower()
    for name in imagegen_pb2.PreviewMethod.keys()
    if name != "PREVIEW_METHOD_UNSPECIFIED"
)


def preview_method_value(name: str | int) -> int:
    """The ``PreviewMethod`` value for one of :data:`PREVIEW_METHODS` (e.g.
    "latent_rgb", "taesd" or "full"), or an enum value as it is."""
    if isinstance(name, int):
        return name
    if name.lower() not in PREVIEW_METHODS:
        known = ", ".join(PREVIEW_METHODS[:-1]) + f" or {PREVIEW_METHODS[-1]}"
        raise ValueError(f"unknown preview method {name!r}; use {known}")
    return imagegen_pb2.PreviewMethod.Value(f"PREVIEW_METHOD_{name.upper()}")


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


def text_settings(options: TextOptions | None = None) -> common_pb2.GenerationSettings:
    """The GenerationSettings ``options`` stand for: the fields that are not
    None set, the others unset (the model's defaults); None: all unset."""
    if options is None:
        return common_pb2.GenerationSettings()
    return generation_settings(
        **{field.name: getattr(options, field.name) for field in dataclasses.fields(options)}
    )


def caption_request(
    image: ImageInput,
    prefix: str = "",
    *,
    generation: TextOptions | None = None,
    adapter: str = "",
) -> caption_pb2.CaptionRequest:
    """A CaptionRequest; see :meth:`ImagoClient.caption`."""
    return caption_pb2.CaptionRequest(
        image=_image_message(image),
        prefix=prefix,
        generation=text_settings(generation),
        adapter=adapter,
    )


def ask_request(
    image: ImageInput,
    question: str,
    *,
    generation: TextOptions | None = None,
    adapter: str = "",
) -> vqa_pb2.AskRequest:
    """An AskRequest; see :meth:`ImagoClient.ask`."""
    return vqa_pb2.AskRequest(
        image=_image_message(image),
        question=question,
        generation=text_settings(generation),
        adapter=adapter,
    )


def _preview_message(previews: PreviewOptions) -> imagegen_pb2.PreviewOptions:
    return imagegen_pb2.PreviewOptions(
        every_n_steps=previews.every_n_steps,
        format=image_format(previews.format),
        max_size=previews.max_size,
        method=preview_method_value(previews.method),
        all_images=previews.all_images,
    )


def _set_task(request: imagegen_pb2.GenerateRequest, edit: ImageToImage | Inpaint | None) -> None:
    if edit is None:
        request.text_to_image.SetInParent()
    elif isinstance(edit, Inpaint):
        request.inpaint.image.CopyFrom(_image_message(edit.image))
        request.inpaint.mask.CopyFrom(_image_message(edit.mask))
        request.inpaint.strength = edit.strength
    elif isinstance(edit, ImageToImage):
        request.image_to_image.init_image.CopyFrom(_image_message(edit.init_image))
        request.image_to_image.strength = edit.strength
        if edit.style_image is not None:
            request.image_to_image.style_image.CopyFrom(_image_message(edit.style_image))
            request.image_to_image.style_scale = edit.style_scale
    else:
        raise TypeError(f"edit must be ImageToImage, Inpaint or None, not {type(edit).__name__}")


def generate_request(
    prompt: str,
    *,
    negative_prompt: str = "",
    diffusion: DiffusionOptions | None = None,
    previews: PreviewOptions | None = None,
    output: OutputOptions | None = None,
    edit: ImageToImage | Inpaint | None = None,
) -> imagegen_pb2.GenerateRequest:
    """A GenerateRequest for ``prompt``, steered away from ``negative_prompt``.

    ``diffusion`` says how to draw (size, steps, guidance, seed, images,
    scheduler, LoRA adapters), ``previews`` how often and how to show
    progress, ``output`` how to encode the results; None takes each one's
    defaults (the server's). ``edit`` None draws from the prompt alone
    (text-to-image); an :class:`ImageToImage` redraws (and may restyle) an
    image, an :class:`Inpaint` repaints the masked part of one. A format or
    preview method name that is not known raises :class:`ValueError`.
    """
    diffusion = DiffusionOptions() if diffusion is None else diffusion
    output = OutputOptions() if output is None else output
    request = imagegen_pb2.GenerateRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=diffusion.width,
        height=diffusion.height,
        steps=diffusion.steps,
        num_images=diffusion.num_images,
        output_format=image_format(output.format),
        previews=_preview_message(PreviewOptions() if previews is None else previews),
        scheduler=diffusion.scheduler,
        output_quality=output.quality,
        omit_parameters=not output.embed_parameters,
        loras=[imagegen_pb2.LoraWeight(name=n, weight=w) for n, w in diffusion.loras],
    )
    _set_task(request, edit)
    # Unset (not 0) takes the server's default: only values given are set.
    if diffusion.guidance_scale is not None:
        request.guidance_scale = diffusion.guidance_scale
    if diffusion.seed is not None:
        request.seed = diffusion.seed
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
