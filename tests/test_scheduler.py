"""The per-model queues: bounds, positions, hand-off, cancellation."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from imago.server.errors import RequestError
from imago.server.scheduler import QueuePosition, Scheduler, Ticket
from imago.workers.protocol import CaptionJob, Failed, TextSettings, WorkItem

SETTINGS = TextSettings(30, 0, 1, False, 1.0, 1.0, 50, 1.0, 1, 1.0, 0)


class FakeWorkers:
    """Workers that take batches while they have free slots."""

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.ran: list[tuple[str, list[str]]] = []
        self.cancelled: list[str] = []

    def idle_worker(self, model: str) -> str | None:
        return "worker-0" if self.free > 0 else None

    def run(self, worker: str, batch_id: int, model: str, tickets: list[Ticket]) -> None:
        self.free -= 1
        self.ran.append((worker, [t.request_id for t in tickets]))

    def cancel(self, ticket: Ticket) -> None:
        self.cancelled.append(ticket.request_id)


def ticket(request_id: str, model: str = "blip2") -> Ticket:
    item = WorkItem(request_id, CaptionJob("", SETTINGS), frames=0)
    return Ticket(request_id=request_id, model=model, item=item, frames=[])


def positions(t: Ticket) -> list[int]:
    seen = []
    while not t.events.empty():
        message, _ = t.events.get_nowait()
        if isinstance(message, QueuePosition):
            seen.append(message.position)
    return seen


@pytest.fixture
def scheduler():
    return Scheduler(max_queue_size=2)


def run(coroutine_function):
    return asyncio.run(coroutine_function())


def test_a_ticket_hears_its_position_before_it_starts(scheduler):
    async def scenario():
        workers = FakeWorkers(free=1)
        scheduler.attach(workers)
        first = ticket("a")
        scheduler.submit(first)
        return workers, first

    workers, first = run(scenario)
    assert positions(first) == [0]
    assert workers.ran == [("worker-0", ["a"])]
    assert first.worker == "worker-0" and first.started_at is not None


def test_positions_move_up_as_the_queue_drains(scheduler):
    async def scenario():
        workers = FakeWorkers(free=0)
        scheduler.attach(workers)
        a, b = ticket("a"), ticket("b")
        scheduler.submit(a)
        scheduler.submit(b)
        workers.free = 1
        scheduler.dispatch()
        return a, b

    a, b = run(scenario)
    assert positions(a) == [0]
    assert positions(b) == [1, 0]


def test_a_full_queue_turns_requests_away_with_a_retry_hint(scheduler):
    async def scenario():
        scheduler.attach(FakeWorkers(free=0))
        scheduler.submit(ticket("a"))
        scheduler.submit(ticket("b"))
        with pytest.raises(RequestError) as caught:
            scheduler.submit(ticket("c"))
        return caught.value

    error = run(scenario)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.retry_after_s is not None
    assert scheduler.queue_depth("blip2") == 2


def test_queues_are_per_model(scheduler):
    async def scenario():
        scheduler.attach(FakeWorkers(free=0))
        scheduler.submit(ticket("a", "blip2"))
        scheduler.submit(ticket("b", "blip2"))
        scheduler.submit(ticket("c", "sd"))

    run(scenario)
    assert (scheduler.queue_depth("blip2"), scheduler.queue_depth("sd")) == (2, 1)


def test_cancelling_a_queued_ticket_frees_its_place(scheduler):
    async def scenario():
        workers = FakeWorkers(free=0)
        scheduler.attach(workers)
        a, b = ticket("a"), ticket("b")
        scheduler.submit(a)
        scheduler.submit(b)
        scheduler.cancel(a)
        return workers, b

    workers, b = run(scenario)
    assert scheduler.queue_depth("blip2") == 1
    assert positions(b) == [1, 0]
    assert workers.cancelled == []


def test_cancelling_a_running_ticket_asks_its_worker_to_stop(scheduler):
    async def scenario():
        workers = FakeWorkers(free=1)
        scheduler.attach(workers)
        a = ticket("a")
        scheduler.submit(a)
        scheduler.cancel(a)
        return workers

    assert run(scenario).cancelled == ["a"]


def test_failing_a_models_queue_ends_every_waiting_ticket(scheduler):
    async def scenario():
        scheduler.attach(FakeWorkers(free=0))
        a = ticket("a")
        scheduler.submit(a)
        scheduler.fail_queued("blip2", "worker-0 exited")
        return a

    a = run(scenario)
    events = []
    while not a.events.empty():
        events.append(a.events.get_nowait()[0])
    assert isinstance(events[-1], Failed) and events[-1].code == "UNAVAILABLE"
    assert a.finished and scheduler.queue_depth("blip2") == 0


def test_nothing_reaches_a_ticket_after_its_last_event():
    t = ticket("a")
    t.deliver(Failed("a", "CANCELLED", "gone"))
    t.deliver(QueuePosition(3))
    assert t.events.qsize() == 1
