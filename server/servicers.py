"""The gRPC services: validate, dispatch, translate results to protobuf."""

from __future__ import annotations

import functools

import grpc
import numpy as np

from imago.server.dispatch import Dispatcher, bulk, deadline_of
from imago.server.errors import RequestError, abort, from_failure
from imago.server.image_jobs import generate_job
from imago.server.scheduler import QueuePosition
from imago.server.validation import (
    caption_job,
    embed_images_job,
    embed_texts_job,
    match_job,
    vqa_job,
)
from imago.v1 import (
    align_pb2,
    align_pb2_grpc,
    caption_pb2,
    caption_pb2_grpc,
    common_pb2,
    imagegen_pb2,
    imagegen_pb2_grpc,
    vqa_pb2,
    vqa_pb2_grpc,
)
from imago.workers.contract import protocol
from imago.workers.contract.jobs import AlignJob

CAPTION = "imago.v1.CaptionService"
VQA = "imago.v1.VqaService"
IMAGEGEN = "imago.v1.ImageGenService"
ALIGN = "imago.v1.AlignService"
SERVICES = (CAPTION, VQA, IMAGEGEN, ALIGN)


def _texts(result: protocol.TextResult) -> list[caption_pb2.GeneratedText]:
    return [caption_pb2.GeneratedText(text=t.text, score=t.score) for t in result.texts]


class CaptionServicer(caption_pb2_grpc.CaptionServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._d = dispatcher

    async def caption(
        self, request: caption_pb2.CaptionRequest, deadline: float | None = None
    ) -> caption_pb2.CaptionResponse:
        model = self._d.model(CAPTION)
        job, images = caption_job(request, model, self._d.limits)
        ticket = self._d.ticket(model.name, job, images, deadline)
        result = await self._d.text_result(ticket)
        return caption_pb2.CaptionResponse(
            captions=_texts(result),
            info=self._d.info(ticket, result.inference_seconds),
            seed=result.seed if job.settings.do_sample else None,
        )

    async def Caption(self, request, context):
        try:
            return await self.caption(request, deadline_of(context))
        except RequestError as error:
            await abort(context, error)

    async def CaptionStream(self, request_iterator, context):
        window = self._d.limits.max_stream_inflight
        # Every item of a stream shares the stream's deadline.
        handle = functools.partial(self.caption, deadline=deadline_of(context))
        async for out in bulk(request_iterator, handle, caption_pb2.CaptionStreamResponse, window):
            yield out


class VqaServicer(vqa_pb2_grpc.VqaServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._d = dispatcher

    async def ask(
        self, request: vqa_pb2.AskRequest, deadline: float | None = None
    ) -> vqa_pb2.AskResponse:
        model = self._d.model(VQA)
        job, images = vqa_job(request, model, self._d.limits)
        ticket = self._d.ticket(model.name, job, images, deadline)
        result = await self._d.text_result(ticket)
        return vqa_pb2.AskResponse(
            answers=_texts(result),
            info=self._d.info(ticket, result.inference_seconds),
            seed=result.seed if job.settings.do_sample else None,
        )

    async def Ask(self, request, context):
        try:
            return await self.ask(request, deadline_of(context))
        except RequestError as error:
            await abort(context, error)

    async def AskStream(self, request_iterator, context):
        window = self._d.limits.max_stream_inflight
        handle = functools.partial(self.ask, deadline=deadline_of(context))
        async for out in bulk(request_iterator, handle, vqa_pb2.AskStreamResponse, window):
            yield out


class ImageGenServicer(imagegen_pb2_grpc.ImageGenServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._d = dispatcher

    async def Generate(self, request, context):
        try:
            model = self._d.model(IMAGEGEN)
            job, images = generate_job(request, model, self._d.limits)
        except RequestError as error:
            await abort(context, error)
            return
        ticket = self._d.ticket(model.name, job, images, deadline_of(context))
        rid = ticket.request_id
        events = self._d.events(ticket)
        try:
            async for message, frames in events:
                if isinstance(message, protocol.Failed):
                    raise from_failure(message)
                yield imagegen_pb2.GenerateResponse(
                    request_id=rid, **_generate_event(message, frames, ticket, self._d)
                )
        except RequestError as error:
            await abort(context, error)
        finally:
            await events.aclose()


@functools.singledispatch
def _generate_event(message, frames: list[bytes], ticket, dispatcher: Dispatcher) -> dict:
    """The GenerateResponse field that carries ``message`` (one of a ticket's
    events, with its frames), as a {field: value} dict; one converter per
    kind of event, registered below."""
    raise RequestError(grpc.StatusCode.INTERNAL, f"unexpected event {type(message).__name__}")


@_generate_event.register(QueuePosition)
def _queued(message: QueuePosition, frames, ticket, dispatcher) -> dict:
    return {"queued": imagegen_pb2.Queued(position=message.position)}


@_generate_event.register(protocol.Started)
def _started(message: protocol.Started, frames, ticket, dispatcher) -> dict:
    started = imagegen_pb2.Started(worker=ticket.worker or "", total_steps=message.total_steps)
    return {"started": started}


@_generate_event.register(protocol.Progress)
def _progress(message: protocol.Progress, frames, ticket, dispatcher) -> dict:
    progress = imagegen_pb2.Progress(
        step=message.step,
        total_steps=message.total_steps,
        elapsed_seconds=message.elapsed_seconds,
    )
    return {"progress": progress}


@_generate_event.register(protocol.Preview)
def _preview(message: protocol.Preview, frames, ticket, dispatcher) -> dict:
    image = common_pb2.Image(
        data=frames[0], mime_type=message.mime_type, width=message.width, height=message.height
    )
    preview = imagegen_pb2.Preview(step=message.step, image_index=message.image_index, image=image)
    return {"preview": preview}


@_generate_event.register(protocol.ImageResult)
def _image_result(message: protocol.ImageResult, frames, ticket, dispatcher: Dispatcher) -> dict:
    images = [
        imagegen_pb2.GeneratedImage(
            image=common_pb2.Image(
                data=data, mime_type=meta.mime_type, width=meta.width, height=meta.height
            ),
            seed=meta.seed,
            nsfw_detected=meta.nsfw_detected,
            replaced=meta.replaced,
        )
        for meta, data in zip(message.images, frames, strict=True)
    ]
    result = imagegen_pb2.Result(
        images=images,
        info=dispatcher.info(ticket, message.inference_seconds),
        warnings=message.warnings,
    )
    return {"result": result}


def _arrays(result: protocol.ArraysResult, frames: list[bytes]) -> dict[str, np.ndarray]:
    """The result's float32 arrays by name."""
    return {
        meta.name: np.frombuffer(data, dtype="<f4").reshape(meta.shape)
        for meta, data in zip(result.arrays, frames, strict=True)
    }


def _embeddings(rows: np.ndarray) -> list[align_pb2.Embedding]:
    return [align_pb2.Embedding(values=row) for row in rows.tolist()]


def _matrix(values: np.ndarray) -> align_pb2.Matrix:
    rows, columns = values.shape
    return align_pb2.Matrix(rows=rows, columns=columns, values=values.ravel().tolist())


class AlignServicer(align_pb2_grpc.AlignServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._d = dispatcher

    async def _run(
        self,
        job: AlignJob,
        images: list[bytes],
        context,
        model: protocol.ModelInfo | None = None,
    ):
        """Queue ``job`` on the alignment model; its arrays and ResponseInfo."""
        model = model or self._d.model(ALIGN)
        ticket = self._d.ticket(model.name, job, images, deadline_of(context))
        result, frames = await self._d.result(ticket)
        if not isinstance(result, protocol.ArraysResult):
            raise RequestError(grpc.StatusCode.INTERNAL, f"unexpected {type(result).__name__}")
        return _arrays(result, frames), self._d.info(ticket, result.inference_seconds)

    async def EmbedImages(self, request, context):
        try:
            # Checked before the model is looked up, which _run does.
            job, images = embed_images_job(request, None, self._d.limits)
            arrays, info = await self._run(job, images, context)
        except RequestError as error:
            await abort(context, error)
            return
        embeddings = arrays["image_embeddings"]
        return align_pb2.EmbedImagesResponse(
            embeddings=[align_pb2.ImageEmbedding(queries=_embeddings(e)) for e in embeddings],
            dimensions=embeddings.shape[-1],
            info=info,
        )

    async def EmbedTexts(self, request, context):
        try:
            job, images = embed_texts_job(request, None, self._d.limits)
            arrays, info = await self._run(job, images, context)
        except RequestError as error:
            await abort(context, error)
            return
        embeddings = arrays["text_embeddings"]
        return align_pb2.EmbedTextsResponse(
            embeddings=_embeddings(embeddings), dimensions=embeddings.shape[-1], info=info
        )

    async def Match(self, request, context):
        try:
            model = self._d.model(ALIGN)
            job, images = match_job(request, model, self._d.limits)
            arrays, info = await self._run(job, images, context, model)
        except RequestError as error:
            await abort(context, error)
            return
        probabilities = arrays.get("match_probabilities")
        return align_pb2.MatchResponse(
            similarities=_matrix(arrays["similarities"]),
            match_probabilities=None if probabilities is None else _matrix(probabilities),
            info=info,
        )
