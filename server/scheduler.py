"""Per-model request queues, dynamic batching and the hand-off to idle workers.

A :class:`~imago.server.tickets.Ticket` is one request's life in the
frontend: queued here, then running on a worker, with every event for it
landing in ``ticket.events``.

Which batch a free worker runs is decided fairly (:mod:`imago.server.fairness`):
among the models it holds, the one with the lowest virtual start time goes
next (oldest waiting request as tie-break); within a model's queue, requests
are ordered fairly over client connections, so that neither a busy model nor
one client's bulk stream starves the rest.

Batching follows each model's :class:`BatchPolicy`. The first request in fair
order leads a batch and takes with it every later request whose
job has the same ``batch_key()``, up to ``max_batch_size`` (counted in each
job's ``weight()``) and the model's ``--max-pixels``; see
:mod:`imago.workers.contract.jobs` for which jobs batch.

A batch that is not full is held back for companions only while more are
expected: while the model's peak load within the last :data:`RECENT_S`
(requests running plus waiting, in batch weight), shared out over the workers
holding the model, exceeds what the batch holds.
It is held at most ``max_batch_delay_ms`` past the later of its leader's
arrival and the moment the model's last batch finished, so holding adds at
most that delay to anyone's wait. A lone request on a quiet model therefore
starts at once, while clients returning from a big batch are gathered into
one call again instead of splitting into a small batch and a big one that take
almost the same time.

Queues are bounded; a full queue turns new requests away at once, and so does
:class:`~imago.server.admission.Admission` for a request too big for its model
or too slow for its deadline. A deadline ends a ticket wherever it is: taken
out of its queue, or stopped on its worker. Each finished batch's measured
seconds feed the per-model rates that admission and the fair share estimate with.

With a :class:`~imago.server.metrics.Metrics`, the scheduler keeps
``imago_queue_depth`` and ``imago_inflight_requests`` (requests, not batch
weight) current, and records each batch's size and its requests' queue times
when a worker takes it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import grpc

from imago.server.admission import Admission
from imago.server.costs import StepTimes
from imago.server.errors import RequestError
from imago.server.fairness import FairQueue, ModelShares
from imago.server.metrics import Metrics
from imago.server.tickets import QueuePosition, Ticket
from imago.workers.contract.presets import BatchPolicy
from imago.workers.contract.protocol import Failed

__all__ = ["QueuePosition", "Scheduler", "Ticket", "Workers"]

log = logging.getLogger("imago.scheduler")

#: Seconds a model's peak load is remembered.
RECENT_S = 1.0
#: Policy of a model the scheduler was told nothing about: no batching.
UNBATCHED = BatchPolicy(max_batch_size=1, max_batch_delay_ms=0.0)
#: Seconds a batch of a model that has not finished one yet is charged in the
#: fair share between models (its true cost replaces this once it is done).
UNMEASURED_BATCH_S = 0.1


class Workers(Protocol):
    """What the scheduler needs of the worker pool."""

    def idle_worker(self, model: str, exclude: set[str] = frozenset()) -> str | None:
        """An idle live worker holding ``model`` and not in ``exclude``."""
        ...

    def worker_count(self, model: str) -> int:
        """Live workers holding ``model``."""
        ...

    def run(self, worker: str, batch_id: int, model: str, tickets: list[Ticket]) -> None: ...

    def cancel(self, ticket: Ticket) -> None: ...


@dataclass
class _Batch:
    """A batch on a worker: what it was charged, and who is in it."""

    model: str
    charged_s: float
    tickets: list[Ticket]


class Scheduler:
    """Fair queues per model; batches go to workers as soon as one is idle."""

    def __init__(
        self,
        max_queue_size: int,
        policies: dict[str, BatchPolicy] | None = None,
        metrics: Metrics | None = None,
        admission: Admission | None = None,
        weights: dict[str, float] | None = None,
    ) -> None:
        """``admission`` checks each request before it is queued (by default
        only once rates are measured, with no limits); ``weights`` are the
        models' shares of a worker they share (1 each by default)."""
        self._max_queue_size = max_queue_size
        self._policies = dict(policies or {})
        self._queues: dict[str, FairQueue[Ticket]] = {}
        self._workers: Workers | None = None
        self._batch_ids = itertools.count(1)
        self.admission = admission or Admission({}, StepTimes())
        self._shares = ModelShares(weights)
        self._batches: dict[int, _Batch] = {}
        # Per model: weight of the batches running, the recent peak of running
        # plus queued weight (and when it was seen), when a batch last finished.
        self._running: dict[str, int] = {}
        self._peak: dict[str, tuple[int, float]] = {}
        self._freed_at: dict[str, float] = {}
        self._wake_timers: dict[str, asyncio.TimerHandle] = {}
        self._metrics = metrics
        if metrics is not None:
            # Known models show up at 0 before their first request.
            for model in self._policies:
                metrics.queue_depth.labels(model).set(0)
                metrics.inflight.labels(model).set(0)

    def attach(self, workers: Workers) -> None:
        self._workers = workers

    def policy(self, model: str) -> BatchPolicy:
        return self._policies.get(model, UNBATCHED)

    def queue_depth(self, model: str) -> int:
        return len(self._queues.get(model, ()))

    def submit(self, ticket: Ticket) -> None:
        """Queue ``ticket``; RequestError when its queue is full
        (RESOURCE_EXHAUSTED) or admission turns it away."""
        queue = self._queues.setdefault(ticket.model, FairQueue())
        if len(queue) >= self._max_queue_size:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queue for model {ticket.model} is full ({self._max_queue_size} waiting)",
                retry_after_s=1.0,
            )
        ticket.cost = self.admission.check(ticket.model, ticket.item.job, ticket.deadline)
        if not queue:
            self._shares.backlogged(ticket.model)
        queue.push(ticket, ticket.flow or f"request:{ticket.request_id}", ticket.cost.units)
        self._queue_changed(ticket.model)
        log.debug("queued for %s behind %d", ticket.model, len(queue) - 1)
        self._note_load(ticket.model)
        if ticket.deadline is not None:
            loop = asyncio.get_running_loop()
            ticket._deadline_timer = loop.call_at(ticket.deadline, self.expire, ticket)
        # Every accepted request hears its position first, even one that
        # starts at once: clients can rely on Queued preceding Started.
        self._report_positions(ticket.model)
        self.dispatch()

    def cancel(self, ticket: Ticket) -> None:
        """Forget ``ticket``: drop it from its queue, or stop it on its worker."""
        ticket.finish()
        if not self._unqueue(ticket) and ticket.worker is not None and self._workers:
            self._workers.cancel(ticket)
            # It stops at the next step: nobody is waiting for it any more.
            self.left_worker(ticket)

    def expire(self, ticket: Ticket) -> None:
        """End ``ticket`` with DEADLINE_EXCEEDED: a queued one never runs, a
        running one is stopped on its worker at the next step."""
        if ticket.finished:
            return
        if self._unqueue(ticket):
            where = "while queued"
        else:
            where = "while running"
            if ticket.worker is not None and self._workers:
                self._workers.cancel(ticket)
                self.left_worker(ticket)
        ticket.deliver(Failed(ticket.request_id, "DEADLINE_EXCEEDED", f"deadline passed {where}"))

    def fail_queued(self, model: str, reason: str) -> None:
        """End every ticket queued for ``model`` with UNAVAILABLE (safe to retry)."""
        queue = self._queues.pop(model, FairQueue())
        self._queue_changed(model)
        for ticket in queue:
            ticket.deliver(Failed(ticket.request_id, "UNAVAILABLE", reason))

    def left_worker(self, ticket: Ticket) -> None:
        """The worker answered ``ticket`` (or died): it no longer counts as load."""
        if ticket.running:
            ticket.running = False
            self._running[ticket.model] -= ticket.item.job.weight()
            if self._metrics is not None:
                self._metrics.inflight.labels(ticket.model).dec()

    def batch_done(
        self,
        model: str,
        batch_id: int | None = None,
        seconds: float = 0.0,
        step_seconds: float | None = None,
    ) -> None:
        """A worker finished batch ``batch_id`` of ``model`` in ``seconds`` (0:
        not measured), ``step_seconds`` a step where it reported its steps;
        its clients may be about to return."""
        self._freed_at[model] = time.monotonic()
        batch = self._batches.pop(batch_id, None) if batch_id is not None else None
        if batch is not None and seconds > 0:
            self._shares.correct(model, seconds - batch.charged_s)
            # A batch cut short by a failure or a cancellation says nothing
            # about how fast the model is.
            if all(ticket.succeeded for ticket in batch.tickets):
                costs = [ticket.cost for ticket in batch.tickets if ticket.cost is not None]
                if step_seconds is None and costs:
                    step_seconds = seconds / max(cost.steps for cost in costs)
                if step_seconds is not None:
                    self.admission.step_times.observe(model, costs, step_seconds)
        self.dispatch()

    def batch_lost(self, batch_id: int) -> None:
        """Batch ``batch_id`` will never be done: its worker died."""
        self._batches.pop(batch_id, None)

    def dispatch(self) -> None:
        """Give queued tickets to idle workers, fairly. Called on submit,
        whenever a worker becomes free, and when a held-back batch has waited
        long enough."""
        if self._workers is None:
            return
        changed = {model for model, queue in self._queues.items() if self._drop_expired(queue)}
        # Models holding their batch back for companions keep a worker for it.
        held: set[str] = set()
        kept: set[str] = set()
        while True:
            candidates = []
            for model, queue in self._queues.items():
                if queue and model not in held:
                    worker = self._workers.idle_worker(model, kept)
                    if worker is not None:
                        candidates.append(
                            (self._shares.tag(model), queue.head().enqueued_at, model, worker)
                        )
            if not candidates:
                break
            _, _, model, worker = min(candidates)
            queue = self._queues[model]
            batch = self._take_batch(model, queue)
            if not batch:
                held.add(model)
                kept.add(worker)
                continue
            self._start(model, worker, batch)
            changed.add(model)
        for model in changed:
            self._queue_changed(model)
            self._report_positions(model)

    # ------------------------------------------------------------ internals

    def _start(self, model: str, worker: str, batch: list[Ticket]) -> None:
        """Hand ``batch`` (taken from ``model``'s queue) to ``worker``."""
        now = time.monotonic()
        for ticket in batch:
            ticket.worker = worker
            ticket.started_at = now
            ticket.batch_size = len(batch)
            ticket.running = True
        weight = sum(t.item.job.weight() for t in batch)
        self._running[model] = self._running.get(model, 0) + weight
        costs = [ticket.cost for ticket in batch if ticket.cost is not None]
        speed = self.admission.step_times.of(model)
        charged = UNMEASURED_BATCH_S
        if speed is not None and costs:
            steps = max(cost.steps for cost in costs)
            charged = steps * speed.step_seconds(sum(cost.step_units for cost in costs))
        self._shares.charge(model, charged)
        batch_id = next(self._batch_ids)
        self._batches[batch_id] = _Batch(model, charged, batch)
        self._batch_started(model, batch, now)
        if log.isEnabledFor(logging.DEBUG):
            ids = " ".join(t.request_id for t in batch)
            log.debug("batch %d of %s to %s: %s", batch_id, model, worker, ids)
        self._workers.run(worker, batch_id, model, batch)

    def _queue_changed(self, model: str) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(model).set(self.queue_depth(model))

    def _batch_started(self, model: str, batch: list[Ticket], now: float) -> None:
        """Count ``batch`` (started at ``now``, monotonic seconds) as running."""
        if self._metrics is None:
            return
        self._metrics.inflight.labels(model).inc(len(batch))
        waited = [now - ticket.enqueued_at for ticket in batch]
        self._metrics.batch_started(model, len(batch), waited)

    def _take_batch(self, model: str, queue: FairQueue[Ticket]) -> list[Ticket]:
        """Remove and return the next batch from ``queue``; [] to wait for
        companions (a timer then calls :meth:`dispatch` again)."""
        head = queue.head()
        limit = self.policy(model).max_batch_size
        max_pixels = self.admission.limits(model).max_pixels
        key = head.item.job.batch_key()
        batch, weight, pixels = [head], head.item.job.weight(), _pixels(head)
        if key is not None:
            for ticket in itertools.islice(queue, 1, None):
                if weight >= limit:
                    break
                more = ticket.item.job.weight()
                if weight + more > limit or ticket.item.job.batch_key() != key:
                    continue
                if max_pixels is not None and pixels + _pixels(ticket) > max_pixels:
                    continue
                batch.append(ticket)
                weight += more
                pixels += _pixels(ticket)
            if weight < limit and self._hold_back(model, head, weight):
                return []
        queue.take(batch)
        return batch

    def _hold_back(self, model: str, head: Ticket, weight: int) -> bool:
        """Whether a batch of ``weight`` led by ``head`` should wait for more."""
        delay_s = self.policy(model).max_batch_delay_ms / 1000
        now = time.monotonic()
        release_at = max(head.enqueued_at, self._freed_at.get(model, 0.0)) + delay_s
        if delay_s <= 0 or now >= release_at:
            return False
        peak, seen_at = self._peak.get(model, (0, float("-inf")))
        # The load is shared by every worker holding the model.
        expected = -(-peak // max(1, self._workers.worker_count(model)))
        if now - seen_at > RECENT_S or weight >= expected:
            return False
        timer = self._wake_timers.get(model)
        if timer is None or timer.when() > release_at:
            if timer is not None:
                timer.cancel()
            loop = asyncio.get_running_loop()
            self._wake_timers[model] = loop.call_at(release_at, self._wake, model)
        return True

    def _note_load(self, model: str) -> None:
        """Remember the peak of running plus queued weight; it fades after RECENT_S."""
        now = time.monotonic()
        queued = sum(t.item.job.weight() for t in self._queues.get(model, ()))
        load = self._running.get(model, 0) + queued
        peak, seen_at = self._peak.get(model, (0, float("-inf")))
        if load >= peak or now - seen_at > RECENT_S:
            self._peak[model] = (load, now)

    def _wake(self, model: str) -> None:
        self._wake_timers.pop(model, None)
        self.dispatch()

    def _drop_expired(self, queue: FairQueue[Ticket]) -> bool:
        """End queued tickets whose deadline passed before their timer ran."""
        now = time.monotonic()
        expired = [t for t in queue if t.deadline is not None and t.deadline <= now]
        for ticket in expired:
            queue.remove(ticket)
            ticket.deliver(
                Failed(ticket.request_id, "DEADLINE_EXCEEDED", "deadline passed while queued")
            )
        return bool(expired)

    def _unqueue(self, ticket: Ticket) -> bool:
        """Take ``ticket`` out of its queue; False when it was not queued."""
        queue = self._queues.get(ticket.model)
        if queue is None or not queue.remove(ticket):
            return False
        self._queue_changed(ticket.model)
        self._report_positions(ticket.model)
        # The ticket may have led a batch that was waiting for companions.
        self.dispatch()
        return True

    def _report_positions(self, model: str) -> None:
        for position, ticket in enumerate(self._queues.get(model, ())):
            if ticket._position != position:
                ticket._position = position
                ticket.deliver(QueuePosition(position))


def _pixels(ticket: Ticket) -> int:
    return ticket.cost.pixels if ticket.cost is not None else 0
