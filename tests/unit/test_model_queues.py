"""The per-model queues: bounds, positions, hand-off, cancellation."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from imago.server.errors import RequestError
from imago.server.scheduler import RECENT_S, QueuePosition, Scheduler, Ticket
from imago.workers.contract.jobs import (
    CaptionJob,
    DiffusionParams,
    TextSettings,
    TextToImageJob,
    VqaJob,
)
from imago.workers.contract.presets import BatchPolicy
from imago.workers.contract.protocol import Failed, WorkItem

SETTINGS = TextSettings(30, 0, 1, False, 1.0, 1.0, 50, 1.0, 1, 1.0, 0)
SAMPLED = TextSettings(30, 0, 1, True, 1.0, 1.0, 50, 1.0, 1, 1.0, 0)


class FakeWorkers:
    """Workers that take batches while they have free slots."""

    def __init__(self, free: int = 0, count: int = 1) -> None:
        self.free = free
        self.count = count
        self.ran: list[tuple[str, list[str]]] = []
        self.cancelled: list[str] = []

    def idle_worker(self, model: str, exclude=frozenset()) -> str | None:
        return "worker-0" if self.free > 0 else None

    def worker_count(self, model: str) -> int:
        return self.count

    def run(self, worker: str, batch_id: int, model: str, tickets: list[Ticket]) -> None:
        self.free -= 1
        self.ran.append((worker, [t.request_id for t in tickets]))

    def cancel(self, ticket: Ticket) -> None:
        self.cancelled.append(ticket.request_id)


def ticket(request_id: str, model: str = "blip2", job=None, deadline=None) -> Ticket:
    item = WorkItem(request_id, job or CaptionJob("", SETTINGS), frames=0)
    return Ticket(request_id=request_id, model=model, item=item, frames=[], deadline=deadline)


def image_job(
    size: int = 64, num_images: int = 1, seed: int = 0, scheduler: str = "", loras=()
) -> TextToImageJob:
    params = DiffusionParams(size, size, 4, 7.5, scheduler=scheduler, loras=loras)
    return TextToImageJob("a fox", "", params, seed=seed, num_images=num_images)


def batching(max_batch_size: int = 8, max_batch_delay_ms: float = 0.0) -> Scheduler:
    policy = BatchPolicy(max_batch_size, max_batch_delay_ms)
    return Scheduler(max_queue_size=64, policies={"blip2": policy, "sd": policy})


def last_event(t: Ticket):
    message = None
    while not t.events.empty():
        message, _ = t.events.get_nowait()
    return message


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


# ------------------------------------------------------------------ batching


def test_compatible_requests_that_queued_while_busy_run_as_one_batch():
    async def scenario():
        scheduler, workers = batching(), FakeWorkers(free=0)
        scheduler.attach(workers)
        tickets = [ticket("a"), ticket("b", job=VqaJob("why?", SETTINGS)), ticket("c")]
        for t in tickets:
            scheduler.submit(t)
        workers.free = 1
        scheduler.dispatch()
        return workers, tickets

    workers, tickets = run(scenario)
    assert workers.ran == [("worker-0", ["a", "b", "c"])]
    assert [t.batch_size for t in tickets] == [3, 3, 3]


def test_seeds_do_not_split_a_greedy_batch():
    async def scenario():
        scheduler, workers = batching(), FakeWorkers(free=0)
        scheduler.attach(workers)
        for i in range(3):
            job = CaptionJob("", TextSettings(30, 0, 1, False, 1.0, 1.0, 50, 1.0, 1, 1.0, i))
            scheduler.submit(ticket(f"r{i}", job=job))
        workers.free = 1
        scheduler.dispatch()
        return workers

    assert run(scenario).ran == [("worker-0", ["r0", "r1", "r2"])]


def test_the_oldest_request_leads_and_incompatible_ones_wait_their_turn():
    async def scenario():
        scheduler, workers = batching(), FakeWorkers(free=0)
        scheduler.attach(workers)
        beams = TextSettings(30, 0, 3, False, 1.0, 1.0, 50, 1.0, 1, 1.0, 0)
        scheduler.submit(ticket("greedy-1"))
        scheduler.submit(ticket("beam", job=CaptionJob("", beams)))
        scheduler.submit(ticket("greedy-2"))
        workers.free = 2
        scheduler.dispatch()
        return workers

    assert run(scenario).ran == [("worker-0", ["greedy-1", "greedy-2"]), ("worker-0", ["beam"])]


def test_sampled_requests_always_run_alone():
    async def scenario():
        scheduler, workers = batching(), FakeWorkers(free=0)
        scheduler.attach(workers)
        scheduler.submit(ticket("s1", job=CaptionJob("", SAMPLED)))
        scheduler.submit(ticket("s2", job=CaptionJob("", SAMPLED)))
        workers.free = 2
        scheduler.dispatch()
        return workers

    assert run(scenario).ran == [("worker-0", ["s1"]), ("worker-0", ["s2"])]


def test_a_batch_holds_at_most_max_batch_size_requests():
    async def scenario():
        scheduler, workers = batching(max_batch_size=2), FakeWorkers(free=0)
        scheduler.attach(workers)
        for name in "abcde":
            scheduler.submit(ticket(name))
        workers.free = 3
        scheduler.dispatch()
        return workers

    assert [ids for _, ids in run(scenario).ran] == [["a", "b"], ["c", "d"], ["e"]]


def test_image_batches_count_images_and_need_the_same_shape_and_schedule():
    async def scenario():
        scheduler, workers = batching(max_batch_size=4), FakeWorkers(free=0)
        scheduler.attach(workers)
        scheduler.submit(ticket("two", "sd", image_job(num_images=2)))
        scheduler.submit(ticket("bigger", "sd", image_job(size=128)))
        scheduler.submit(ticket("three", "sd", image_job(num_images=3)))
        scheduler.submit(ticket("one", "sd", image_job(seed=9)))
        workers.free = 3
        scheduler.dispatch()
        return workers

    # "three" would make five images; "one" still fits beside "two".
    assert [ids for _, ids in run(scenario).ran] == [["two", "one"], ["bigger"], ["three"]]


def test_image_requests_with_different_schedulers_do_not_share_a_batch():
    async def scenario():
        scheduler, workers = batching(max_batch_size=4), FakeWorkers(free=0)
        scheduler.attach(workers)
        scheduler.submit(ticket("euler", "sd", image_job(scheduler="euler")))
        scheduler.submit(ticket("ddim", "sd", image_job(scheduler="ddim")))
        scheduler.submit(ticket("euler-2", "sd", image_job(scheduler="euler", seed=4)))
        workers.free = 2
        scheduler.dispatch()
        return workers

    assert [ids for _, ids in run(scenario).ran] == [["euler", "euler-2"], ["ddim"]]


def test_image_requests_with_different_adapters_do_not_share_a_batch():
    async def scenario():
        scheduler, workers = batching(max_batch_size=4), FakeWorkers(free=0)
        scheduler.attach(workers)
        scheduler.submit(ticket("ink", "sd", image_job(loras=(("ink", 1.0),))))
        scheduler.submit(ticket("plain", "sd", image_job()))
        scheduler.submit(ticket("ink-2", "sd", image_job(loras=(("ink", 1.0),), seed=3)))
        scheduler.submit(ticket("ink-half", "sd", image_job(loras=(("ink", 0.5),))))
        workers.free = 3
        scheduler.dispatch()
        return workers

    ran = [ids for _, ids in run(scenario).ran]
    assert ran == [["ink", "ink-2"], ["plain"], ["ink-half"]]


def test_a_lone_request_on_a_quiet_model_starts_at_once():
    async def scenario():
        scheduler, workers = batching(max_batch_delay_ms=10_000), FakeWorkers(free=1)
        scheduler.attach(workers)
        scheduler.submit(ticket("a"))
        return workers

    assert run(scenario).ran == [("worker-0", ["a"])]


def load_up(scheduler: Scheduler, workers: FakeWorkers, count: int) -> None:
    """Put ``count`` requests in flight at once (one runs, the rest queue),
    then end them all: the model was just under that load."""
    tickets = [ticket(f"load-{i}") for i in range(count)]
    for t in tickets:
        scheduler.submit(t)
    for t in tickets[1:]:
        scheduler.cancel(t)
    scheduler.left_worker(tickets[0])
    scheduler.batch_done("blip2")
    workers.ran.clear()


def test_under_load_a_short_batch_waits_for_companions_at_most_the_delay():
    async def scenario():
        scheduler, workers = batching(max_batch_delay_ms=50), FakeWorkers(free=1)
        scheduler.attach(workers)
        load_up(scheduler, workers, 4)  # four clients were just served
        workers.free = 1
        scheduler.submit(ticket("a"))
        held = list(workers.ran)
        scheduler.submit(ticket("b"))
        await asyncio.sleep(0.2)
        return held, workers

    held, workers = run(scenario)
    assert held == []
    assert workers.ran == [("worker-0", ["a", "b"])]


def test_a_held_batch_goes_as_soon_as_the_recent_load_is_back():
    async def scenario():
        scheduler, workers = batching(max_batch_delay_ms=10_000), FakeWorkers(free=1)
        scheduler.attach(workers)
        load_up(scheduler, workers, 3)
        workers.free = 1
        for name in "abc":
            scheduler.submit(ticket(name))
        return workers

    assert run(scenario).ran == [("worker-0", ["a", "b", "c"])]


def test_the_expected_load_is_shared_out_over_the_workers():
    async def scenario():
        scheduler, workers = batching(max_batch_delay_ms=10_000), FakeWorkers(free=1, count=2)
        scheduler.attach(workers)
        load_up(scheduler, workers, 4)  # two each for two workers
        workers.free = 2
        for name in "abc":
            scheduler.submit(ticket(name))
        return workers

    # Two make a worker's share; "c" waits for a companion of its own.
    assert run(scenario).ran == [("worker-0", ["a", "b"])]


def test_a_request_sent_on_an_answer_before_its_batch_ends_is_not_held():
    async def scenario():
        scheduler, workers = batching(max_batch_delay_ms=10_000), FakeWorkers(free=1)
        scheduler.attach(workers)
        first = ticket("first")
        scheduler.submit(first)
        scheduler.left_worker(first)  # answered; the worker has not said it is free
        scheduler.submit(ticket("next"))
        workers.free = 1
        scheduler.batch_done("blip2")
        return workers

    assert run(scenario).ran == [("worker-0", ["first"]), ("worker-0", ["next"])]


def test_a_request_sent_after_cancelling_a_running_one_is_not_held():
    async def scenario():
        scheduler, workers = batching(max_batch_delay_ms=10_000), FakeWorkers(free=1)
        scheduler.attach(workers)
        long = ticket("long")
        scheduler.submit(long)
        scheduler.cancel(long)  # its worker stops it at the next step
        scheduler.submit(ticket("next"))
        workers.free = 1
        scheduler.batch_done("blip2")
        return workers

    assert run(scenario).ran == [("worker-0", ["long"]), ("worker-0", ["next"])]


def test_load_long_past_does_not_hold_a_request_back(monkeypatch):
    async def scenario():
        scheduler, workers = batching(max_batch_delay_ms=10_000), FakeWorkers(free=1)
        scheduler.attach(workers)
        load_up(scheduler, workers, 4)
        now = time.monotonic()
        monkeypatch.setattr(time, "monotonic", lambda: now + RECENT_S + 1)
        workers.free = 1
        scheduler.submit(ticket("a"))
        return workers

    assert run(scenario).ran == [("worker-0", ["a"])]


# ------------------------------------------------------------------ deadlines


def test_a_request_whose_deadline_passes_in_the_queue_never_runs():
    async def scenario():
        scheduler, workers = batching(), FakeWorkers(free=0)
        scheduler.attach(workers)
        late = ticket("late", deadline=time.monotonic() + 0.05)
        behind = ticket("behind")
        scheduler.submit(late)
        scheduler.submit(behind)
        await asyncio.sleep(0.15)
        workers.free = 1
        scheduler.dispatch()
        return workers, late, behind

    workers, late, behind = run(scenario)
    failure = last_event(late)
    assert isinstance(failure, Failed) and failure.code == "DEADLINE_EXCEEDED"
    assert workers.ran == [("worker-0", ["behind"])]
    assert positions(behind) == [1, 0]


def test_a_deadline_passing_while_running_stops_the_request_on_its_worker():
    async def scenario():
        scheduler, workers = batching(), FakeWorkers(free=1)
        scheduler.attach(workers)
        running = ticket("running", deadline=time.monotonic() + 0.05)
        scheduler.submit(running)
        await asyncio.sleep(0.15)
        return workers, running

    workers, running = run(scenario)
    assert workers.cancelled == ["running"]
    failure = last_event(running)
    assert isinstance(failure, Failed) and failure.code == "DEADLINE_EXCEEDED"


def test_a_finished_request_forgets_its_deadline():
    async def scenario():
        scheduler, workers = batching(), FakeWorkers(free=1)
        scheduler.attach(workers)
        done = ticket("done", deadline=time.monotonic() + 0.05)
        scheduler.submit(done)
        done.deliver(Failed("done", "CANCELLED", "gone"))
        await asyncio.sleep(0.15)
        return workers, done

    workers, done = run(scenario)
    assert workers.cancelled == []
    assert last_event(done).code == "CANCELLED"
