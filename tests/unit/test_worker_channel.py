"""WorkerChannel, the worker's EventSink: every event goes out as one
multipart message (the msgpack header, then its frames), and emit keeps the
batch's books: which requests have their outcome, whether one ran out of
memory, and when an injected fault is armed. Over a ZeroMQ PAIR of sockets in
this process, no worker process."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest
import zmq

from imago.workers.contract.jobs import EmbedTextsJob
from imago.workers.contract.protocol import (
    ArrayMeta,
    ArraysResult,
    BatchDone,
    Failed,
    GeneratedText,
    Heartbeat,
    ImageMeta,
    ImageResult,
    Preview,
    Progress,
    RunBatch,
    Started,
    TextResult,
    WorkItem,
    from_worker_decoder,
)
from imago.workers.runtime.main import WorkerChannel, _run_batch
from imago.workers.runtime.runner import EventSink, Request, Runner


@pytest.fixture
def sockets() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    """(frontend end, worker end) of a connected PAIR."""
    context = zmq.Context()
    frontend, worker = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    frontend.bind("inproc://channel")
    worker.connect("inproc://channel")
    try:
        yield frontend, worker
    finally:
        frontend.close(linger=0)
        worker.close(linger=0)
        context.term()


def received(frontend: zmq.Socket) -> list[tuple[msgspec.Struct, list[bytes]]]:
    """Every message waiting at ``frontend``, decoded, with its frames."""
    messages = []
    while frontend.poll(100):
        header, *frames = frontend.recv_multipart()
        messages.append((from_worker_decoder.decode(header), frames))
    return messages


def test_every_event_goes_out_with_its_frames(sockets):
    frontend, worker = sockets
    channel = WorkerChannel(worker)
    text = TextResult.of("t", [GeneratedText("a", tokens=3), GeneratedText("b", tokens=4)], 7, 0.5)
    images = ImageResult(
        "i", [ImageMeta(1, "image/png", 8, 8), ImageMeta(2, "image/png", 8, 8)], [], 1.0
    )
    arrays = ArraysResult("a", [ArrayMeta("text_embeddings", (1, 2))], 0.25)
    events = [
        (Started("i", 4), []),
        (Progress("i", 1, 4, 0.1), []),
        (Preview("i", 1, 0, "image/png", 8, 8), [b"preview"]),
        (images, [b"first", b"second"]),
        (text, []),
        (arrays, [b"\x00" * 8]),
        (Failed("f", "INVALID_ARGUMENT", "bad", "images"), []),
    ]
    for event, frames in events:
        channel.emit(event, frames)
    assert received(frontend) == events
    assert text.tokens == 7  # the sum of its texts' own


def test_outcomes_finish_their_requests_and_other_events_do_not(sockets):
    channel = WorkerChannel(sockets[1])
    channel.emit(Started("r"))
    channel.emit(Progress("r", 1, 2, 0.1))
    channel.emit(Preview("r", 1, 0, "image/png", 8, 8), [b"png"])
    assert channel.finished == set()
    channel.emit(TextResult.of("text", [GeneratedText("a")], 1, 0.1))
    channel.emit(ImageResult("image", [], [], 0.1))
    channel.emit(ArraysResult("arrays", [], 0.1))
    channel.emit(Failed("failed", "CANCELLED", "cancelled"))
    assert channel.finished == {"text", "image", "arrays", "failed"}


def test_only_a_resource_exhausted_failure_marks_the_batch_exhausted(sockets):
    channel = WorkerChannel(sockets[1])
    channel.emit(Failed("a", "CANCELLED", "cancelled"))
    channel.emit(Failed("b", "INTERNAL", "boom"))
    assert not channel.exhausted
    channel.emit(Failed("c", "RESOURCE_EXHAUSTED", "out of memory"))
    assert channel.exhausted
    channel.emit(Failed("d", "INTERNAL", "boom"))
    assert channel.exhausted  # stays so until the next batch


def test_a_fault_is_armed_when_its_request_starts(sockets):
    channel = WorkerChannel(sockets[1])
    channel.faults["r"] = "memoryerror"
    assert channel.is_cancelled("r") is False  # not started: nothing happens yet
    channel.emit(Started("other"))
    assert channel.is_cancelled("r") is False
    channel.emit(Started("r"))
    assert "r" not in channel.faults
    with pytest.raises(MemoryError):
        channel.is_cancelled("r")
    assert channel.is_cancelled("r") is False  # once only


@pytest.mark.parametrize(
    ("event", "frames"),
    [
        (Preview("r", 1, 0, "image/png", 8, 8), []),
        (ImageResult("r", [ImageMeta(1, "image/png", 8, 8)], [], 1.0), [b"a", b"b"]),
        (ArraysResult("r", [ArrayMeta("x", (1,))], 1.0), []),
        (Started("r"), [b"stray"]),
    ],
)
def test_frames_that_do_not_match_the_event_are_refused_and_not_sent(sockets, event, frames):
    frontend, worker = sockets
    channel = WorkerChannel(worker)
    with pytest.raises(ValueError, match="frames"):
        channel.emit(event, frames)
    assert channel.finished == set()
    assert received(frontend) == []


class _StartsThenAsks(Runner):
    """Starts every request, asks about cancellation, then ends it with a text."""

    family = "test"

    @classmethod
    def load(cls, name, source, device, settings=None, **extras):
        return cls()

    def info(self):
        raise NotImplementedError

    def run(self, batch: list[Request], sink: EventSink) -> None:
        for request in batch:
            sink.emit(Started(request.request_id))
        for request in batch:
            sink.is_cancelled(request.request_id)
            sink.emit(TextResult.of(request.request_id, [GeneratedText("ok")], 0, 0.0))


def test_a_batch_whose_request_runs_out_of_memory_ends_every_request_once(sockets):
    frontend, worker = sockets
    channel = WorkerChannel(worker)
    channel.finished.add("left over from the batch before")
    items = [
        WorkItem("ok", EmbedTextsJob(texts=("a",))),
        WorkItem("oom", EmbedTextsJob(texts=("__imago_fault__:memoryerror",))),
    ]
    batch = RunBatch(batch_id=3, model="m", items=items)
    _run_batch({"m": _StartsThenAsks()}, batch, [], channel, inject_faults=True)
    messages = [message for message, _ in received(frontend)]
    assert [type(m) for m in messages[:4]] == [Started, Started, TextResult, Failed]
    assert (messages[3].request_id, messages[3].code) == ("oom", "RESOURCE_EXHAUSTED")
    assert isinstance(messages[4], BatchDone) and messages[4].batch_id == 3
    assert all(isinstance(m, Heartbeat) for m in messages[5:])
    assert channel.finished == {"ok", "oom"}
    assert channel.exhausted
    assert channel.faults == {}
