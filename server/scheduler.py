"""Per-model request queues and their hand-off to idle workers.

A :class:`Ticket` is one request's life in the frontend: queued here, then
running on a worker, with every event for it landing in ``ticket.events``.
Queues are bounded; a full queue turns new requests away at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from imago.server.errors import RequestError
from imago.workers.protocol import Failed, ImageResult, TextResult, WorkItem

# Messages after which a ticket gets no more events.
TERMINAL = (TextResult, ImageResult, Failed)


@dataclass(frozen=True)
class QueuePosition:
    """Local event: the ticket's place in its model's queue (0 = next)."""

    position: int


@dataclass(eq=False)
class Ticket:
    request_id: str
    model: str
    item: WorkItem
    frames: list[bytes]
    # (message, frames) pairs: protocol messages from the worker, QueuePosition.
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    worker: str | None = None
    finished: bool = False
    _position: int = -1

    def deliver(self, message, frames: list[bytes] = ()) -> None:
        """Hand an event to whoever waits on this ticket; nothing after the last one."""
        if self.finished:
            return
        if isinstance(message, TERMINAL):
            self.finished = True
        self.events.put_nowait((message, list(frames)))


class Workers(Protocol):
    """What the scheduler needs of the worker pool."""

    def idle_worker(self, model: str) -> str | None: ...

    def run(self, worker: str, batch_id: int, model: str, tickets: list[Ticket]) -> None: ...

    def cancel(self, ticket: Ticket) -> None: ...


class Scheduler:
    """FIFO queue per model; a batch goes to a worker as soon as one is idle."""

    def __init__(self, max_queue_size: int) -> None:
        self._max_queue_size = max_queue_size
        self._queues: dict[str, deque[Ticket]] = {}
        self._workers: Workers | None = None
        self._batch_ids = itertools.count(1)

    def attach(self, workers: Workers) -> None:
        self._workers = workers

    def queue_depth(self, model: str) -> int:
        return len(self._queues.get(model, ()))

    def submit(self, ticket: Ticket) -> None:
        """Queue ``ticket``, or raise RESOURCE_EXHAUSTED when its queue is full."""
        queue = self._queues.setdefault(ticket.model, deque())
        if len(queue) >= self._max_queue_size:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queue for model {ticket.model} is full ({self._max_queue_size} waiting)",
                retry_after_s=1.0,
            )
        queue.append(ticket)
        # Every accepted request hears its position first, even one that
        # starts at once: clients can rely on Queued preceding Started.
        self._report_positions(ticket.model)
        self.dispatch()

    def cancel(self, ticket: Ticket) -> None:
        """Forget ``ticket``: drop it from its queue, or stop it on its worker."""
        ticket.finished = True
        queue = self._queues.get(ticket.model)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            self._report_positions(ticket.model)
        elif ticket.worker is not None and self._workers is not None:
            self._workers.cancel(ticket)

    def fail_queued(self, model: str, reason: str) -> None:
        """End every ticket queued for ``model`` with UNAVAILABLE (safe to retry)."""
        queue = self._queues.pop(model, deque())
        for ticket in queue:
            ticket.deliver(Failed(ticket.request_id, "UNAVAILABLE", reason))

    def dispatch(self) -> None:
        """Give queued tickets to idle workers. Called on submit and whenever a
        worker becomes free."""
        if self._workers is None:
            return
        for model, queue in self._queues.items():
            moved = False
            while queue:
                worker = self._workers.idle_worker(model)
                if worker is None:
                    break
                ticket = queue.popleft()
                ticket.worker = worker
                ticket.started_at = time.monotonic()
                self._workers.run(worker, next(self._batch_ids), model, [ticket])
                moved = True
            if moved:
                self._report_positions(model)

    def _report_positions(self, model: str) -> None:
        for position, ticket in enumerate(self._queues.get(model, ())):
            if ticket._position != position:
                ticket._position = position
                ticket.deliver(QueuePosition(position))
