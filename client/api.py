"""Python clients for an imago server: :class:`ImagoClient` (blocking) and
:class:`AsyncImagoClient` (``grpc.aio``).

Both speak the ``imago.v1`` API and the standard ``grpc.health.v1`` service::

    with ImagoClient("localhost:50051") as client:
        reply = client.caption("cat.jpg", num_beams=3)
        print(reply.captions[0].text)

        result = client.generate_result("a red fox in snow", seed=7)
        open("fox.png", "wb").write(result.images[0].image.data)

gRPC failures surface as :class:`grpc.RpcError` (``grpc.aio.AioRpcError`` for
the async client), carrying the status code and details the server sent.
"""

from __future__ import annotations

import inspect
import io
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imago.v1 import (
    caption_pb2,
    caption_pb2_grpc,
    common_pb2,
    imagegen_pb2,
    imagegen_pb2_grpc,
    vqa_pb2,
    vqa_pb2_grpc,
)

if TYPE_CHECKING:
    from PIL import Image as PILImage

    ImageInput = bytes | bytearray | memoryview | str | os.PathLike[str] | PILImage.Image
else:
    ImageInput = Any

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "AsyncImagoClient",
    "ImagoClient",
    "generate_request",
    "generation_settings",
    "image_bytes",
    "image_format",
]

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

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

# ------------------------------------------------------------------ helpers


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
    **settings: Any,
) -> caption_pb2.CaptionRequest:
    """A CaptionRequest; see :meth:`ImagoClient.caption`."""
    gen = generation_settings(generation, **settings)
    return caption_pb2.CaptionRequest(image=_image_message(image), prefix=prefix, generation=gen)


def ask_request(
    image: ImageInput,
    question: str,
    generation: common_pb2.GenerationSettings | None = None,
    **settings: Any,
) -> vqa_pb2.AskRequest:
    """An AskRequest; see :meth:`ImagoClient.ask`."""
    gen = generation_settings(generation, **settings)
    return vqa_pb2.AskRequest(image=_image_message(image), question=question, generation=gen)


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


class _ClientBase:
    """Channel, stubs and per-call timeout shared by both clients."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channel = self._open(target, options)
        self._caption = caption_pb2_grpc.CaptionServiceStub(self._channel)
        self._vqa = vqa_pb2_grpc.VqaServiceStub(self._channel)
        self._imagegen = imagegen_pb2_grpc.ImageGenServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @staticmethod
    def _open(target: str, options: list[tuple[str, Any]]) -> Any:
        return grpc.insecure_channel(target, options=options)


def _health_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


# ------------------------------------------------------------------ clients


class ImagoClient(_ClientBase):
    """Blocking client over one insecure gRPC channel.

    ``timeout`` (seconds) bounds every call; for :meth:`generate` it bounds the
    whole stream. ``max_message_bytes`` caps messages both ways and should
    match the server's limit.
    """

    def __enter__(self) -> ImagoClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def caption(
        self,
        image: ImageInput,
        *,
        prefix: str = "",
        generation: common_pb2.GenerationSettings | None = None,
        **settings: Any,
    ) -> caption_pb2.CaptionResponse:
        """Captions ``image`` (bytes, path or PIL image).

        ``prefix`` is text the caption must start with. Generation settings
        come from ``generation`` and/or keywords named after its fields
        (``max_new_tokens=20``, ``num_beams=3``, ``seed=1`` ...).
        """
        request = caption_request(image, prefix, generation, **settings)
        return self._caption.Caption(request, timeout=self.timeout)

    def caption_stream(
        self, requests: Iterator[caption_pb2.CaptionStreamRequest]
    ) -> Iterator[caption_pb2.CaptionStreamResponse]:
        """Captions a stream of requests, each with an id of the caller's
        choosing; responses come as they finish, ids echoed, failures in band.
        ``requests`` is read as the server asks for more (flow control)."""
        return self._caption.CaptionStream(requests, timeout=self.timeout)

    def ask_stream(
        self, requests: Iterator[vqa_pb2.AskStreamRequest]
    ) -> Iterator[vqa_pb2.AskStreamResponse]:
        """Answers a stream of questions; see :meth:`caption_stream`."""
        return self._vqa.AskStream(requests, timeout=self.timeout)

    def ask(
        self,
        image: ImageInput,
        question: str,
        *,
        generation: common_pb2.GenerationSettings | None = None,
        **settings: Any,
    ) -> vqa_pb2.AskResponse:
        """Answers ``question`` about ``image``; settings as for :meth:`caption`."""
        request = ask_request(image, question, generation, **settings)
        return self._vqa.Ask(request, timeout=self.timeout)

    def generate(self, prompt: str, **options: Any) -> Iterator[imagegen_pb2.GenerateResponse]:
        """Streams the events of one generation; ``options`` are the keywords
        of :func:`generate_request`.

        Events come in order: queued (again when the position changes),
        started, progress for every step with a preview every
        ``preview_every`` steps, and the result. Stopping the iteration early
        cancels the generation on the server.
        """
        return self._stream(generate_request(prompt, **options))

    def _stream(
        self, request: imagegen_pb2.GenerateRequest
    ) -> Iterator[imagegen_pb2.GenerateResponse]:
        call = self._imagegen.Generate(request, timeout=self.timeout)
        try:
            yield from call
        finally:
            call.cancel()

    def generate_result(
        self,
        prompt: str,
        *,
        on_event: Callable[[imagegen_pb2.GenerateResponse], object] | None = None,
        **options: Any,
    ) -> imagegen_pb2.Result:
        """Runs :meth:`generate` with the same options to the end, passing each
        event to ``on_event``, and returns the Result."""
        for event in self._stream(generate_request(prompt, **options)):
            if on_event is not None:
                on_event(event)
            if event.WhichOneof("event") == "result":
                return event.result
        raise RuntimeError("the generation stream ended without a result")

    def health(self, service: str = "") -> str:
        """Health status name ("SERVING", "NOT_SERVING", ...) of ``service``
        (full gRPC service name; "" for the server as a whole)."""
        request = health_pb2.HealthCheckRequest(service=service)
        return _health_name(self._health.Check(request, timeout=self.timeout))


class AsyncImagoClient(_ClientBase):
    """``asyncio`` client over one ``grpc.aio`` channel; mirrors :class:`ImagoClient`.

    Create it inside a running event loop and close it with ``await close()``
    or ``async with``.
    """

    @staticmethod
    def _open(target: str, options: list[tuple[str, Any]]) -> Any:
        return grpc.aio.insecure_channel(target, options=options)

    async def __aenter__(self) -> AsyncImagoClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def caption(
        self,
        image: ImageInput,
        *,
        prefix: str = "",
        generation: common_pb2.GenerationSettings | None = None,
        **settings: Any,
    ) -> caption_pb2.CaptionResponse:
        """Captions ``image``; see :meth:`ImagoClient.caption`."""
        request = caption_request(image, prefix, generation, **settings)
        return await self._caption.Caption(request, timeout=self.timeout)

    async def ask(
        self,
        image: ImageInput,
        question: str,
        *,
        generation: common_pb2.GenerationSettings | None = None,
        **settings: Any,
    ) -> vqa_pb2.AskResponse:
        """Answers ``question`` about ``image``; see :meth:`ImagoClient.ask`."""
        request = ask_request(image, question, generation, **settings)
        return await self._vqa.Ask(request, timeout=self.timeout)

    def generate(self, prompt: str, **options: Any) -> AsyncIterator[imagegen_pb2.GenerateResponse]:
        """Async iterator (``async for``) over the events of one generation;
        options those of :func:`generate_request`, events as for :meth:`ImagoClient.generate`."""
        return self._stream(generate_request(prompt, **options))

    async def _stream(
        self, request: imagegen_pb2.GenerateRequest
    ) -> AsyncIterator[imagegen_pb2.GenerateResponse]:
        call = self._imagegen.Generate(request, timeout=self.timeout)
        try:
            async for event in call:
                yield event
        finally:
            call.cancel()

    async def generate_result(
        self,
        prompt: str,
        *,
        on_event: Callable[[imagegen_pb2.GenerateResponse], object] | None = None,
        **options: Any,
    ) -> imagegen_pb2.Result:
        """Runs :meth:`generate` to the end and returns the Result. ``on_event``
        may be a plain function or a coroutine function."""
        events = self._stream(generate_request(prompt, **options))
        try:
            async for event in events:
                if on_event is not None:
                    outcome = on_event(event)
                    if inspect.isawaitable(outcome):
                        await outcome
                if event.WhichOneof("event") == "result":
                    return event.result
        finally:
            await events.aclose()
        raise RuntimeError("the generation stream ended without a result")

    async def health(self, service: str = "") -> str:
        """Health status name of ``service``; see :meth:`ImagoClient.health`."""
        request = health_pb2.HealthCheckRequest(service=service)
        return _health_name(await self._health.Check(request, timeout=self.timeout))
