"""Python clients for an imago server: :class:`ImagoClient` (blocking) and
:class:`AsyncImagoClient` (``grpc.aio``).

Both speak the ``imago.v1`` API and the standard ``grpc.health.v1`` service::

    with ImagoClient("localhost:50051") as client:
        reply = client.caption("cat.jpg", generation=TextOptions(num_beams=3))
        print(reply.captions[0].text)

        result = client.generate_result("a red fox in snow", diffusion=DiffusionOptions(seed=7))
        open("fox.png", "wb").write(result.images[0].image.data)

What a request asks for comes in the option objects of
:mod:`imago.client.options`, each defaulting to the server's defaults.

gRPC failures surface as :class:`grpc.RpcError` (``grpc.aio.AioRpcError`` for
the async client), carrying the status code and details the server sent.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from imago.client.balancing import channel_target
from imago.client.channels import Security, open_aio_channel, open_channel
from imago.client.messages import (
    GENERATION_FIELDS,
    ask_request,
    caption_request,
    embed_images_request,
    embed_texts_request,
    generate_request,
    generation_settings,
    image_bytes,
    image_format,
    match_request,
)
from imago.client.options import (
    DiffusionOptions,
    ImageInput,
    ImageToImage,
    Inpaint,
    OutputOptions,
    PreviewOptions,
    TextOptions,
)
from imago.v1 import (
    align_pb2,
    align_pb2_grpc,
    caption_pb2,
    caption_pb2_grpc,
    imagegen_pb2,
    imagegen_pb2_grpc,
    vqa_pb2,
    vqa_pb2_grpc,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "GENERATION_FIELDS",
    "AsyncImagoClient",
    "ImagoClient",
    "ask_request",
    "caption_request",
    "generate_request",
    "generation_settings",
    "image_bytes",
    "image_format",
]

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class _ClientBase:
    """Channel, stubs and per-call timeout shared by both clients.

    The channel is plaintext unless ``tls`` is set or a certificate is given:
    ``root_certificates`` (PEM bytes of the CAs to trust; default: the
    system's), ``client_certificate_chain`` and ``client_private_key`` (PEM
    bytes of the client's certificate, for servers requiring mutual TLS).
    ``token`` is sent as ``authorization: Bearer <token>`` on every call (in
    the clear on a plaintext channel). ``server_name_override`` is the name
    the server's certificate must carry when it is not the target's host.

    ``target`` may name several servers: a DNS name with several addresses
    (``dns:///imago-headless.ml.svc:50051``), a comma-separated
    ``HOST:PORT`` list, or a sequence of them. Calls then go to each ready
    server in turn (gRPC's ``round_robin``); see :mod:`imago.client.balancing`.
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_certificate_chain: bytes | None = None,
        client_private_key: bytes | None = None,
        token: str | None = None,
        server_name_override: str | None = None,
    ) -> None:
        resolved = channel_target(target)
        self.target = resolved.uri
        self.timeout = timeout
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *resolved.options(),
        ]
        security = Security(
            tls=tls,
            root_certificates=root_certificates,
            client_certificate_chain=client_certificate_chain,
            client_private_key=client_private_key,
            token=token,
            server_name_override=server_name_override,
        )
        self._channel = self._open(resolved.uri, options, security)
        self._caption = caption_pb2_grpc.CaptionServiceStub(self._channel)
        self._vqa = vqa_pb2_grpc.VqaServiceStub(self._channel)
        self._imagegen = imagegen_pb2_grpc.ImageGenServiceStub(self._channel)
        self._align = align_pb2_grpc.AlignServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @staticmethod
    def _open(target: str, options: list[tuple[str, Any]], security: Security) -> Any:
        return open_channel(target, options, security)


def _health_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


# ------------------------------------------------------------------ clients


class ImagoClient(_ClientBase):
    """Blocking client over one gRPC channel.

    ``timeout`` (seconds) bounds every call; for :meth:`generate` it bounds the
    whole stream. ``max_message_bytes`` caps messages both ways and should
    match the server's limit.

    The channel is plaintext unless ``tls=True`` or a certificate is given
    (``root_certificates``, ``client_certificate_chain`` with
    ``client_private_key``: PEM bytes); ``token`` is sent as a bearer token
    on every call.
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
        adapter: str = "",
        generation: TextOptions | None = None,
    ) -> caption_pb2.CaptionResponse:
        """Captions ``image`` (bytes, path or PIL image).

        ``prefix`` is text the caption must start with. ``adapter`` names an
        adapter the server has loaded (``imago serve --caption-adapter-dir``);
        "" captions with the base model. ``generation`` says how the text is
        generated (``TextOptions(max_new_tokens=20, num_beams=3)`` ...); None
        takes the model's defaults.
        """
        request = caption_request(image, prefix, generation=generation, adapter=adapter)
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
        adapter: str = "",
        generation: TextOptions | None = None,
    ) -> vqa_pb2.AskResponse:
        """Answers ``question`` about ``image``; ``adapter`` and ``generation``
        as for :meth:`caption`."""
        request = ask_request(image, question, generation=generation, adapter=adapter)
        return self._vqa.Ask(request, timeout=self.timeout)

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        diffusion: DiffusionOptions | None = None,
        previews: PreviewOptions | None = None,
        output: OutputOptions | None = None,
        edit: ImageToImage | Inpaint | None = None,
    ) -> Iterator[imagegen_pb2.GenerateResponse]:
        """Streams the events of one generation; the options are those of
        :func:`~imago.client.messages.generate_request`.

        Events come in order: queued (again when the position changes),
        started, progress for every step with a preview every
        ``previews.every_n_steps`` steps, and the result. Stopping the
        iteration early cancels the generation on the server.
        """
        request = generate_request(
            prompt, negative_prompt=negative_prompt, diffusion=diffusion,
            previews=previews, output=output, edit=edit,
        )  # fmt: skip
        return self._stream(request)

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
        """Runs :meth:`generate` with the same options (keywords) to the end,
        passing each event to ``on_event``, and returns the Result."""
        for event in self._stream(generate_request(prompt, **options)):
            if on_event is not None:
                on_event(event)
            if event.WhichOneof("event") == "result":
                return event.result
        raise RuntimeError("the generation stream ended without a result")

    def embed_images(self, images: Sequence[ImageInput]) -> align_pb2.EmbedImagesResponse:
        """Embeds ``images``: per image, one unit vector per Q-Former query."""
        return self._align.EmbedImages(embed_images_request(images), timeout=self.timeout)

    def embed_texts(self, texts: Sequence[str]) -> align_pb2.EmbedTextsResponse:
        """Embeds ``texts``: one unit vector each, in the images' space."""
        return self._align.EmbedTexts(embed_texts_request(texts), timeout=self.timeout)

    def match(
        self,
        images: Sequence[ImageInput],
        texts: Sequence[str],
        *,
        image_text_matching: bool = False,
    ) -> align_pb2.MatchResponse:
        """Scores every image against every text: contrastive similarities,
        and with ``image_text_matching`` the ITM head's match probabilities
        (see :func:`~imago.client.messages.matrix_rows`)."""
        request = match_request(images, texts, image_text_matching=image_text_matching)
        return self._align.Match(request, timeout=self.timeout)

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
    def _open(target: str, options: list[tuple[str, Any]], security: Security) -> Any:
        return open_aio_channel(target, options, security)

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
        adapter: str = "",
        generation: TextOptions | None = None,
    ) -> caption_pb2.CaptionResponse:
        """Captions ``image``; see :meth:`ImagoClient.caption`."""
        request = caption_request(image, prefix, generation=generation, adapter=adapter)
        return await self._caption.Caption(request, timeout=self.timeout)

    async def ask(
        self,
        image: ImageInput,
        question: str,
        *,
        adapter: str = "",
        generation: TextOptions | None = None,
    ) -> vqa_pb2.AskResponse:
        """Answers ``question`` about ``image``; see :meth:`ImagoClient.ask`."""
        request = ask_request(image, question, generation=generation, adapter=adapter)
        return await self._vqa.Ask(request, timeout=self.timeout)

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        diffusion: DiffusionOptions | None = None,
        previews: PreviewOptions | None = None,
        output: OutputOptions | None = None,
        edit: ImageToImage | Inpaint | None = None,
    ) -> AsyncIterator[imagegen_pb2.GenerateResponse]:
        """Async iterator (``async for``) over the events of one generation;
        options as for :meth:`ImagoClient.generate`, and so are the events."""
        request = generate_request(
            prompt, negative_prompt=negative_prompt, diffusion=diffusion,
            previews=previews, output=output, edit=edit,
        )  # fmt: skip
        return self._stream(request)

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

    async def embed_images(self, images: Sequence[ImageInput]) -> align_pb2.EmbedImagesResponse:
        """Embeds ``images``; see :meth:`ImagoClient.embed_images`."""
        return await self._align.EmbedImages(embed_images_request(images), timeout=self.timeout)

    async def embed_texts(self, texts: Sequence[str]) -> align_pb2.EmbedTextsResponse:
        """Embeds ``texts``; see :meth:`ImagoClient.embed_texts`."""
        return await self._align.EmbedTexts(embed_texts_request(texts), timeout=self.timeout)

    async def match(
        self,
        images: Sequence[ImageInput],
        texts: Sequence[str],
        *,
        image_text_matching: bool = False,
    ) -> align_pb2.MatchResponse:
        """Scores every image against every text; see :meth:`ImagoClient.match`."""
        request = match_request(images, texts, image_text_matching=image_text_matching)
        return await self._align.Match(request, timeout=self.timeout)

    async def health(self, service: str = "") -> str:
        """Health status name of ``service``; see :meth:`ImagoClient.health`."""
        request = health_pb2.HealthCheckRequest(service=service)
        return _health_name(await self._health.Check(request, timeout=self.timeout))
