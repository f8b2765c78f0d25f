"""A request's life in the frontend: its :class:`Ticket`, and the local
events the scheduler adds to a ticket's stream (:class:`QueuePosition`).

A ticket is queued by the :class:`~imago.server.scheduler.Scheduler`, then
runs on a worker, with every event for it landing in ``ticket.events``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from imago.workers.contract.jobs import Cost
from imago.workers.contract.protocol import Failed, Outcome, WorkItem


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
    # Monotonic time (asyncio's loop clock) by which the request must end.
    deadline: float | None = None
    # The client connection it came on: requests of one flow share a fair
    # share of their model's queue. "" : a flow of its own.
    flow: str = ""
    # (message, frames) pairs: protocol messages from the worker, QueuePosition.
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    worker: str | None = None
    # Requests in the batch this ticket ran in, itself included.
    batch_size: int = 0
    finished: bool = False
    # On a worker: dispatched and not yet answered by it.
    running: bool = False
    # Whether it ended with a result (not a failure or a cancellation).
    succeeded: bool = False
    # Its work, as admission measured it when it was queued.
    cost: Cost | None = None
    _position: int = -1
    _deadline_timer: asyncio.TimerHandle | None = None

    def deliver(self, message, frames: list[bytes] = ()) -> None:
        """Hand an event to whoever waits on this ticket; nothing after the last one."""
        if self.finished:
            return
        if isinstance(message, Outcome):
            self.finish()
            self.succeeded = not isinstance(message, Failed)
        self.events.put_nowait((message, list(frames)))

    def finish(self) -> None:
        """Take no more events, and forget the deadline."""
        self.finished = True
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
