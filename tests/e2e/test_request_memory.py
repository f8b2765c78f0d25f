"""Rejected requests are freed as soon as their call ends.

A server that turns a large request away must not keep its bytes until
Python's cyclic garbage collector happens to run: a few rejected 40 MiB images
in a row would otherwise grow the frontend by hundreds of MiB. The tests run
a real ``imago serve`` frontend (tiny preset, one CPU worker) in this process,
send large requests it rejects over a real channel with the cyclic collector
off, and then ask the collector what it would have had to free: nothing of
the requests, and none of the frames they went through. The same holds for a
call whose behaviour fails with an exception of its own.

Some garbage per call is grpc's own and stays: the call's state holds the
context's done callbacks, which hold the context, which holds the state. That
state also keeps the AbortError a rejected call ends with, whose traceback
starts at the frame of the interceptor's wrapper around every behaviour. The
wrapper lets go of the request and context before re-raising it, so that
cycle holds nothing of the request.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import types
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

import imago.server
from imago.server import observability
from imago.server.app import build_server
from imago.server.config import ServeConfig
from imago.server.metrics import Metrics
from imago.server.observability import ObservabilityInterceptor
from imago.v1 import caption_pb2, caption_pb2_grpc, common_pb2, imagegen_pb2, imagegen_pb2_grpc

#: Size of each request's payload: large enough to tell it from anything else.
PAYLOAD = 4 * 2**20
#: Rejected calls per test.
CALLS = 3
#: Seconds to wait for the server to start, and for a finished call to be counted.
START_S = 300.0
SETTLE_S = 30.0
SERVER_CODE = Path(imago.server.__file__).parent
#: Where the interceptor's wrapper of every behaviour is, and its name.
WRAPPER = (Path(observability.__file__), "wrapped")

CAPTION = "imago.v1.CaptionService"
IMAGEGEN = "imago.v1.ImageGenService"


class Frontend:
    """An in-process server with its own event loop, which tests run their calls in."""

    def __init__(self, cache_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.metrics = Metrics()
        self.config = ServeConfig(host="127.0.0.1", port=0, cache_dir=cache_dir, cpu_only=True)

    def run(self, coroutine: Awaitable):
        return self.loop.run_until_complete(coroutine)

    async def start(self) -> None:
        # grpc.aio servers belong to the loop they are made in.
        self.server, self.pool, _ = build_server(self.config.resolve(), self.metrics)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{port}"
        await self.server.start()
        await self.pool.start(START_S)

    async def stop(self) -> None:
        await self.server.stop(None)
        await self.pool.stop()


@pytest.fixture(scope="module")
def frontend(model_cache) -> Iterator[Frontend]:
    running = Frontend(model_cache)
    try:
        running.run(running.start())
        yield running
    finally:
        running.run(running.stop())
        running.loop.close()


async def _code_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code one call ends with (its messages are dropped)."""
    try:
        pending = call()
        if hasattr(pending, "__aiter__"):
            async for _ in pending:
                pass
        else:
            await pending
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def garbage_after(calls: Callable[[], object]):
    """Run ``calls`` with the cyclic collector off; return what it returned and
    what the collector then finds unreachable."""
    gc.collect()
    gc.disable()
    try:
        result = calls()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()
    return result, garbage


async def settle(metrics: Metrics, labels: dict[str, str], count: float) -> None:
    """Wait until ``count`` calls with ``labels`` are counted: a call is counted,
    and its record let go, once grpc has ended it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_S
    while (metrics.registry.get_sample_value("imago_requests_total", labels) or 0) < count:
        if loop.time() > deadline:
            return
        await asyncio.sleep(0.05)


def garbage_after_rejections(
    frontend: Frontend,
    service: str,
    method: str,
    call: Callable[[grpc.aio.Channel], Callable[[], object]],
) -> list:
    """Run ``call`` CALLS times and return what the cyclic collector then finds
    unreachable. Every call must end INVALID_ARGUMENT."""
    labels = {"service": service, "method": method, "code": "INVALID_ARGUMENT"}

    async def calls() -> list[grpc.StatusCode]:
        before = frontend.metrics.registry.get_sample_value("imago_requests_total", labels) or 0
        async with grpc.aio.insecure_channel(frontend.target) as channel:
            codes = [await _code_of(call(channel)) for _ in range(CALLS)]
            # grpc's server loop holds the latest call's state until the next
            # call comes in: a plain one lets go of the last rejected call.
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=60)
        await settle(frontend.metrics, labels, before + CALLS)
        return codes

    codes, garbage = garbage_after(lambda: frontend.run(calls()))
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * CALLS
    return garbage


def payloads_in(garbage: list) -> list[str]:
    """The request-sized objects that the garbage is, or holds directly."""
    found = []
    for obj in garbage:
        for item in (obj, *gc.get_referents(obj)):
            if isinstance(item, (bytes, bytearray, str)) and len(item) >= PAYLOAD:
                found.append(f"{type(item).__name__} of {len(item)} held by {type(obj).__name__}")
            elif isinstance(item, Message) and item.ByteSize() >= PAYLOAD:
                found.append(f"{type(item).__name__} of {item.ByteSize()} bytes")
    return found


def request_path(frame: types.FrameType) -> bool:
    """Whether ``frame`` is of the server's code that handled a request: any
    but the interceptor's wrapper (see the module's docstring)."""
    path = Path(frame.f_code.co_filename)
    return path.is_relative_to(SERVER_CODE) and (path, frame.f_code.co_name) != WRAPPER


def frames_in(garbage: list) -> list[str]:
    """The frames of the request's path in the garbage, and the exceptions
    there whose traceback goes through that path."""
    found = []
    for obj in garbage:
        if isinstance(obj, types.FrameType) and request_path(obj):
            found.append(f"frame {obj.f_code.co_name} ({obj.f_code.co_filename}:{obj.f_lineno})")
        elif isinstance(obj, BaseException):
            tb = obj.__traceback__
            while tb is not None and not request_path(tb.tb_frame):
                tb = tb.tb_next
            if tb is not None:
                found.append(f"exception {obj!r:.100} with its traceback")
    return found


def assert_freed(garbage: list) -> None:
    """Nothing of the calls is in ``garbage``: no payload, no frame it went through."""
    leftovers = payloads_in(garbage) + frames_in(garbage)
    assert not leftovers, "left for the cyclic collector:\n" + "\n".join(leftovers)


def random_image() -> common_pb2.Image:
    """PAYLOAD bytes that are no image format at all."""
    return common_pb2.Image(data=os.urandom(PAYLOAD))


def test_a_caption_request_with_an_undecodable_image_is_freed_without_the_collector(frontend):
    def caption(channel):
        request = caption_pb2.CaptionRequest(image=random_image())
        return lambda: caption_pb2_grpc.CaptionServiceStub(channel).Caption(request, timeout=60)

    garbage = garbage_after_rejections(frontend, CAPTION, "Caption", caption)
    assert_freed(garbage)


def test_a_caption_request_with_a_field_out_of_range_is_freed_without_the_collector(frontend):
    def caption(channel):
        settings = common_pb2.GenerationSettings(max_new_tokens=1_000_000)
        request = caption_pb2.CaptionRequest(image=random_image(), generation=settings)
        return lambda: caption_pb2_grpc.CaptionServiceStub(channel).Caption(request, timeout=60)

    garbage = garbage_after_rejections(frontend, CAPTION, "Caption", caption)
    assert_freed(garbage)


def test_request_bytes_that_are_not_the_request_message_are_freed_without_the_collector(
    frontend,
):
    def caption(channel):
        # A field tag with no valid wire type: this never parses as a CaptionRequest.
        data = b"\xff" * PAYLOAD
        return lambda: channel.unary_unary(f"/{CAPTION}/Caption")(data, timeout=60)

    garbage = garbage_after_rejections(frontend, CAPTION, "Caption", caption)
    assert_freed(garbage)


def test_a_rejected_generate_stream_is_freed_without_the_collector(frontend):
    def generate(channel):
        task = imagegen_pb2.ImageToImage(init_image=random_image(), strength=0.5)
        request = imagegen_pb2.GenerateRequest(prompt="a lighthouse", image_to_image=task)
        return lambda: imagegen_pb2_grpc.ImageGenServiceStub(channel).Generate(request, timeout=60)

    garbage = garbage_after_rejections(frontend, IMAGEGEN, "Generate", generate)
    assert_freed(garbage)


def test_a_request_whose_behaviour_fails_is_freed_without_the_collector():
    """A behaviour that raises (a bug: UNKNOWN) rather than aborting, behind the
    interceptor alone; its request is the raw bytes."""
    metrics = Metrics()

    async def fails(request, context):
        raise RuntimeError("a bug")

    async def calls() -> list[grpc.StatusCode]:
        server = grpc.aio.server(interceptors=[ObservabilityInterceptor(metrics)])
        handlers = {"Fail": grpc.unary_unary_rpc_method_handler(fails)}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Test", handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                fail = channel.unary_unary("/t.Test/Fail")
                codes = [
                    await _code_of(lambda: fail(b"\0" * PAYLOAD, timeout=60)) for _ in range(CALLS)
                ]
            labels = {"service": "t.Test", "method": "Fail", "code": "UNKNOWN"}
            await settle(metrics, labels, CALLS)
        finally:
            await server.stop(None)
        return codes

    # grpc logs the bug with its traceback; a captured log record would keep
    # the frames reachable, hiding whether anything else holds them.
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    grpc_log.disabled = True
    try:
        codes, garbage = garbage_after(lambda: asyncio.run(calls()))
    finally:
        grpc_log.disabled = False
    assert codes == [grpc.StatusCode.UNKNOWN] * CALLS
    assert_freed(garbage)
