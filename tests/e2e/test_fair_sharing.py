"""Through real servers: no model, client or oversized request starves the rest.

Bounds are multiples of batch times measured in the same run, never fixed
seconds, so that a slow or shared machine does not fail them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from conftest import field_violations, png_bytes, start_server

from imago.client import DiffusionOptions
from imago.client.api import ImagoClient
from imago.client.messages import caption_request
from imago.v1 import caption_pb2

IMAGE = png_bytes()
#: Generations the busy clients send back to back: 4 of them fill a batch.
GENERATION = DiffusionOptions(steps=20, width=64, height=64)


class Looping:
    """``clients`` threads calling ``call(client)`` back to back until stopped,
    each with a client of its own; what each call returned is kept."""

    def __init__(self, target: str, clients: int, call) -> None:
        self.results: list = []
        self.errors: list[grpc.RpcError] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(target, call), daemon=True)
            for _ in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _loop(self, target: str, call) -> None:
        with ImagoClient(target, timeout=300) as client:
            while not self._stop.is_set():
                try:
                    self.results.append(call(client))
                except grpc.RpcError as error:
                    self.errors.append(error)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=300)


def generate(client: ImagoClient):
    return client.generate_result("a red fox", diffusion=GENERATION)


def caption(client: ImagoClient):
    return client.caption(IMAGE)


@pytest.fixture
def fresh_server(model_cache, tmp_path):
    """A server of its own: which model was asked first must not matter."""
    servers = []

    def start(*extra: str):
        servers.append(start_server(model_cache, tmp_path, "--workers", "1", *extra))
        return servers[-1]

    yield start
    for running in servers:
        assert running.stop() == 0, running.log()


def test_a_caption_waits_about_one_generation_batch_behind_a_generation_backlog(fresh_server):
    server = fresh_server()
    with ImagoClient(server.target, timeout=300) as client:
        generate(client)  # the server's first model queue is Stable Diffusion's
        load = Looping(server.target, 6, generate)
        try:
            time.sleep(2.0)
            captions = [client.caption(IMAGE) for _ in range(5)]
        finally:
            load.stop()
    assert not load.errors
    batch_s = max(result.info.inference_seconds for result in load.results)
    waits = [response.info.queue_seconds for response in captions]
    assert max(waits) <= 2 * batch_s + 2.0, f"caption waits {waits}, batches take {batch_s:.2f}s"


def test_a_generation_waits_about_one_caption_batch_behind_a_caption_backlog(fresh_server):
    server = fresh_server()
    with ImagoClient(server.target, timeout=300) as client:
        caption(client)  # the server's first model queue is BLIP-2's
        load = Looping(server.target, 40, caption)
        try:
            time.sleep(2.0)
            generations = [generate(client) for _ in range(3)]
        finally:
            load.stop()
    assert not load.errors
    batch_s = max(response.info.inference_seconds for response in load.results)
    waits = [result.info.queue_seconds for result in generations]
    assert max(waits) <= 2 * batch_s + 2.0, f"generation waits {waits}, batches take {batch_s:.2f}s"


def test_single_captions_are_not_starved_by_another_clients_bulk_stream(fresh_server):
    # Small batches: the stream's 64 items in flight are many batches deep.
    server = fresh_server("--max-batch-size", "blip2-tiny=8")
    items = 2000
    done: list[caption_pb2.CaptionStreamResponse] = []

    def requests() -> Iterator[caption_pb2.CaptionStreamRequest]:
        request = caption_request(IMAGE)
        for index in range(items):
            yield caption_pb2.CaptionStreamRequest(id=str(index), request=request)

    def stream() -> None:
        with ImagoClient(server.target, timeout=600) as bulk:
            done.extend(bulk.caption_stream(requests()))

    streaming = threading.Thread(target=stream, daemon=True)
    streaming.start()
    with ImagoClient(server.target, timeout=300) as client:
        while len(done) < 100 and streaming.is_alive():
            time.sleep(0.05)
        singles = [client.caption(IMAGE) for _ in range(10)]
        in_stream_meanwhile = len(done)
    streaming.join(timeout=600)
    assert len(done) == items and all(reply.HasField("response") for reply in done)
    assert in_stream_meanwhile < items, "the stream ended before the single calls"
    batch_s = max(reply.response.info.inference_seconds for reply in done)
    waits = [response.info.queue_seconds for response in singles]
    # In arrival order they would wait for the 64 items ahead: 8 batches.
    assert max(waits) <= 2 * batch_s + 0.25, f"single calls wait {waits}, batches {batch_s:.2f}s"


def test_a_generation_that_cannot_meet_its_deadline_is_refused_at_once(fresh_server):
    server = fresh_server()
    with ImagoClient(server.target, timeout=300) as client:
        timing = []
        client.generate_result(
            "timing",
            diffusion=DiffusionOptions(steps=4, width=64, height=64),
            on_event=timing.append,
        )
        steps = [e.progress.elapsed_seconds for e in timing if e.HasField("progress")]
        step_s = (steps[-1] - steps[0]) / 3
    # A tenth of the time its 150 steps take here.
    deadline = 150 * step_s / 10
    with ImagoClient(server.target, timeout=deadline) as hurried:
        events = []
        with pytest.raises(grpc.RpcError) as caught:
            hurried.generate_result(
                "too long",
                diffusion=DiffusionOptions(steps=150, width=64, height=64),
                on_event=events.append,
            )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Refused before it was queued: an expiring run would have heard Queued.
    assert "would take about" in caught.value.details() and not events


def test_a_step_longer_than_the_watchdog_is_refused_and_the_worker_stays_free(fresh_server):
    server = fresh_server("--watchdog-s", "sd-tiny=2", "--max-pixels", "100000000")
    with ImagoClient(server.target, timeout=300) as client:
        # Two sizes, so that the cost of a pixel is measured.
        for size in (64, 256, 64, 256):
            client.generate_result(
                "timing", diffusion=DiffusionOptions(steps=3, width=size, height=size)
            )
    with ImagoClient(server.target, timeout=60) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate_result(
                "huge", diffusion=DiffusionOptions(steps=150, width=2048, height=2048, num_images=8)
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "one step of 8 images of 2048x2048" in caught.value.details()
        assert "--watchdog-s" in caught.value.details()
        # Nothing of it runs: the next request starts at once.
        after = client.generate_result(
            "next", diffusion=DiffusionOptions(steps=2, width=64, height=64)
        )
    assert after.info.queue_seconds < 1.0


def test_more_pixels_than_a_cpu_worker_takes_are_refused_naming_num_images(fresh_server):
    server = fresh_server()
    with ImagoClient(server.target, timeout=300) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate_result(
                "huge", diffusion=DiffusionOptions(steps=150, width=2048, height=2048, num_images=8)
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(caught.value) == ["num_images"]
        assert "--max-pixels" in caught.value.details()
        # Exactly the bound (8 images of 512 x 512) is admitted.
        assert client.generate_result(
            "fits", diffusion=DiffusionOptions(steps=2, width=512, height=512, num_images=8)
        )
