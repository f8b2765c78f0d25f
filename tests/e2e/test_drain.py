"""Graceful drain on SIGTERM: health first, new calls refused, work in flight
finished within the grace period, exit 0."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from conftest import png_bytes, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_lifecycle import children, wait_gone

from imago.client import DiffusionOptions, ImagoClient

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Background(threading.Thread):
    """Runs ``call`` on a thread; ``result`` or ``error`` once it is done."""

    def __init__(self, call) -> None:
        super().__init__(daemon=True)
        self._call = call
        self.result = None
        self.error: grpc.RpcError | None = None
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            self.result = self._call()
        except grpc.RpcError as error:
            self.error = error
        self.ended_at = time.monotonic()


def watch_health(target: str) -> tuple[list[tuple[float, int]], threading.Event]:
    """Follow overall health with Watch on a thread: (time, status) pairs as
    they come, and an event set once the stream has said NOT_SERVING after
    SERVING."""
    statuses: list[tuple[float, int]] = []
    stopped_serving = threading.Event()

    def follow() -> None:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                for reply in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=300):
                    statuses.append((time.monotonic(), reply.status))
                    if reply.status == NOT_SERVING and SERVING in [s for _, s in statuses]:
                        stopped_serving.set()
            except grpc.RpcError:
                pass  # the server ends the stream as it goes

    threading.Thread(target=follow, daemon=True).start()
    return statuses, stopped_serving


def generation(client: ImagoClient, steps: int, size: int, wait_for: str) -> Background:
    """A generation running on a thread, returned once it has sent the event
    ``wait_for`` ("progress": it runs; "queued": it waits for a worker)."""
    seen = threading.Event()

    def on_event(event) -> None:
        if event.HasField(wait_for):
            seen.set()

    def call():
        return client.generate_result(
            "a slow sunrise",
            diffusion=DiffusionOptions(steps=steps, width=size, height=size),
            on_event=on_event,
        )

    running = Background(call)
    running.start()
    assert seen.wait(120), f"no {wait_for} event"
    return running


def test_sigterm_serves_work_in_flight_refuses_new_calls_and_exits_0(model_cache, tmp_path):
    # A generous grace: this test is about what happens within it, on a busy machine too.
    server = start_server(model_cache, tmp_path, "--drain-grace-s", "240")
    everything = children(server.process.pid)
    statuses, stopped_serving = watch_health(server.target)
    with ImagoClient(server.target, timeout=300) as client:
        running = generation(client, steps=100, size=256, wait_for="progress")
        # Behind it on the one worker: accepted, queued, not started.
        queued = generation(client, steps=2, size=64, wait_for="queued")
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert stopped_serving.wait(10), statuses
        # NOT_SERVING is said once new calls are refused.
        with ImagoClient(server.target, timeout=30) as newcomer:
            with pytest.raises(grpc.RpcError) as refused:
                newcomer.caption(png_bytes(), prefix="too late")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        running.join(300)
        queued.join(300)
    assert next(when for when, status in statuses if status == NOT_SERVING) - signalled < 2
    assert running.error is None, running.error
    assert len(running.result.images) == 1
    assert queued.error is None, queued.error
    assert len(queued.result.images) == 1
    assert server.process.wait(60) == 0, server.log()
    # The open health Watch did not hold the server until the grace ended.
    assert time.monotonic() - queued.ended_at < 30
    assert wait_gone(everything) == []


def test_a_request_outliving_a_short_grace_ends_with_a_status_and_exit_0(model_cache, tmp_path):
    server = start_server(model_cache, tmp_path, "--drain-grace-s", "0.5")
    everything = children(server.process.pid)
    with ImagoClient(server.target, timeout=120) as client:
        running = generation(client, steps=150, size=512, wait_for="progress")
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        running.join(60)
    assert not running.is_alive(), "the request hangs"
    assert running.error is not None, "the generation finished within 0.5s after all"
    assert running.error.code() == grpc.StatusCode.UNAVAILABLE
    assert running.ended_at - signalled < 10
    assert server.process.wait(30) == 0, server.log()
    assert "drain grace of 0.5s is over" in server.log()
    assert wait_gone(everything) == []
