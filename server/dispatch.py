"""The path every request takes between a servicer and a worker.

A servicer validates its request into a job, then asks the
:class:`Dispatcher` for a ticket and waits on the ticket's events. Leaving
early (the client cancelled or went away) takes the ticket out of the queue,
or stops it on its worker.

A ticket's request id is the RPC's (see :mod:`imago.server.observability`),
so that log lines, ``ResponseInfo.request_id`` and the ``x-request-id``
header agree. Each item of a bulk stream is a request of its own, with the id
``{stream's id}-{item's index}`` (0 for the first item read). Ids must be
unique among live tickets, because workers answer by id: an id a client sent
again while its earlier request is still alive gets a random suffix.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from imago.server.config import Limits
from imago.server.errors import RequestError, from_failure
from imago.server.fairness import current_flow, set_flow
from imago.server.pool import WorkerPool
from imago.server.scheduler import Scheduler, Ticket
from imago.v1 import common_pb2
from imago.workers.contract.jobs import Job
from imago.workers.contract.logs import current_request_id, set_request_id
from imago.workers.contract.presets import ModelSpec, model_for_service
from imago.workers.contract.protocol import Failed, ModelInfo, Outcome, TextResult, WorkItem

log = logging.getLogger("imago.dispatch")


class Dispatcher:
    """Finds the model for a service, queues tickets and follows them to the end."""

    def __init__(
        self,
        models: tuple[ModelSpec, ...],
        scheduler: Scheduler,
        pool: WorkerPool,
        limits: Limits,
    ) -> None:
        self.models = models
        self.scheduler = scheduler
        self.pool = pool
        self.limits = limits
        # Tickets by request id while anything (queue, worker, servicer) holds them.
        self._live: weakref.WeakValueDictionary[str, Ticket] = weakref.WeakValueDictionary()

    def model(self, service: str) -> ModelInfo:
        """The loaded model answering ``service``, or a status explaining why none."""
        spec = model_for_service(self.models, service)
        if spec is None:
            raise RequestError(
                grpc.StatusCode.UNIMPLEMENTED, f"no model for {service} is configured here"
            )
        info = self.pool.model_info(spec.name)
        if info is None:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"model {spec.name} has no live worker yet",
                retry_after_s=1.0,
            )
        return info

    def ticket(
        self, model: str, job: Job, images: list[bytes], deadline: float | None = None
    ) -> Ticket:
        """A ticket for ``job`` on ``model``; ``deadline`` is a ``time.monotonic()``
        instant by which it must end (see :func:`deadline_of`).

        Its request id is the current request's (a fresh uuid4 hex outside an
        RPC), made unique among live tickets."""
        request_id = current_request_id()
        if request_id is None:
            request_id = uuid.uuid4().hex
        elif request_id in self._live:
            request_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        item = WorkItem(request_id=request_id, job=job, frames=len(images))
        ticket = Ticket(
            request_id=request_id,
            model=model,
            item=item,
            frames=images,
            deadline=deadline,
            flow=current_flow(),
        )
        self._live[request_id] = ticket
        return ticket

    async def events(self, ticket: Ticket) -> AsyncIterator[tuple[object, list[bytes]]]:
        """Queue ``ticket`` and yield its events up to and including the last one.

        Raises RequestError when the queue is full. Whoever stops iterating
        early must ``aclose()`` the iterator so that the ticket is cancelled.
        """
        self.scheduler.submit(ticket)
        try:
            while True:
                message, frames = await ticket.events.get()
                yield message, frames
                if isinstance(message, Outcome):
                    return
        finally:
            if not ticket.finished:
                self.scheduler.cancel(ticket)

    async def result(self, ticket: Ticket) -> tuple[Outcome, list[bytes]]:
        """Run a ticket to its end and return its result with its frames; a
        failure raises RequestError."""
        events = self.events(ticket)
        try:
            async for message, frames in events:
                if isinstance(message, Failed):
                    raise from_failure(message)
                if isinstance(message, Outcome):
                    return message, frames
        finally:
            await events.aclose()
        raise RequestError(grpc.StatusCode.INTERNAL, "request ended without a result")

    async def text_result(self, ticket: Ticket) -> TextResult:
        """Run a text job to its end; a failure raises RequestError."""
        result, _ = await self.result(ticket)
        if not isinstance(result, TextResult):
            raise RequestError(grpc.StatusCode.INTERNAL, f"unexpected {type(result).__name__}")
        return result

    def info(self, ticket: Ticket, inference_seconds: float) -> common_pb2.ResponseInfo:
        queued = (ticket.started_at or ticket.enqueued_at) - ticket.enqueued_at
        return common_pb2.ResponseInfo(
            request_id=ticket.request_id,
            model=ticket.model,
            queue_seconds=queued,
            inference_seconds=inference_seconds,
            worker=ticket.worker or "",
            batch_size=ticket.batch_size,
        )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` instant, None without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


Request = TypeVar("Request")
Response = TypeVar("Response")


async def bulk(
    items: AsyncIterator,
    handle: Callable[[Request], Awaitable[Response]],
    wrap: Callable[..., object],
    window: int,
) -> AsyncIterator:
    """Serve a bidirectional bulk stream.

    Each incoming item (with ``id`` and ``request``) is handled concurrently;
    results go out as they finish, wrapped as ``wrap(id=..., response=...)`` or
    ``wrap(id=..., error=ItemError)``. At most ``window`` items are in flight
    or waiting to be written: past that the stream is not read, so HTTP/2 flow
    control holds a fast client back instead of the server buffering without
    bound, and a client that stops reading results stops being read.

    Inside an RPC with request id ``S``, the item read ``n``-th (from 0) is
    handled as request ``S-n``. The stream's items are a flow of their own in
    their model's fair queue (:mod:`imago.server.fairness`).
    """
    done: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    finished = object()

    stream_id = current_request_id()
    stream_flow = f"{current_flow()}/stream:{stream_id or id(items)}"

    async def one(item, index: int) -> None:
        # Each item runs in a task of its own, whose context this changes alone.
        if stream_id is not None:
            set_request_id(f"{stream_id}-{index}")
        set_flow(stream_flow)
        try:
            out = wrap(id=item.id, response=await handle(item.request))
        except RequestError as error:
            out = wrap(id=item.id, error=error.to_item_error())
        except Exception:
            # A bug must not leave the stream waiting for this item forever.
            log.exception("bulk item %r failed", item.id)
            error = RequestError(grpc.StatusCode.INTERNAL, "internal error; see the server log")
            out = wrap(id=item.id, error=error.to_item_error())
        done.put_nowait(out)

    async def read() -> None:
        tasks: set[asyncio.Task] = set()
        try:
            index = 0
            async for item in items:
                await slots.acquire()
                task = asyncio.create_task(one(item, index))
                index += 1
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            done.put_nowait(finished)

    reader = asyncio.create_task(read())
    try:
        while (out := await done.get()) is not finished:
            yield out
            slots.release()  # written to the client: room for one more
        await reader  # re-raise a broken input stream
    finally:
        reader.cancel()
