"""Prometheus metrics: what a scrape of ``imago serve --metrics-port`` shows,
that promtool and a real Prometheus accept it, and how calls are counted."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from conftest import free_port, png_bytes, start_server
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from imago.server.metrics import Metrics
from imago.server.observability import ObservabilityInterceptor, final_code
from imago.server.scheduler import Scheduler, Ticket
from imago.v1 import caption_pb2, caption_pb2_grpc, common_pb2, imagegen_pb2, imagegen_pb2_grpc
from imago.workers.contract.jobs import CaptionJob, TextSettings
from imago.workers.contract.presets import BatchPolicy
from imago.workers.contract.protocol import Heartbeat, WorkItem

CAPTION = {"service": "imago.v1.CaptionService", "method": "Caption"}
GENERATE = {"service": "imago.v1.ImageGenService", "method": "Generate"}
CAPTIONS = 3
#: Seconds a finished call may take to show up: it is counted just after its status is sent.
SETTLE_S = 5.0


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` with exactly ``labels`` in a scrape, None if absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def scrape_until(port: int, ready: Callable[[str], bool], timeout: float = SETTLE_S) -> str:
    """A scrape for which ``ready`` holds, or the last one after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(port)
        if ready(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def caption_request(data: bytes | None = None) -> caption_pb2.CaptionRequest:
    return caption_pb2.CaptionRequest(image=common_pb2.Image(data=data or png_bytes()))


def generate_request(steps: int, previews: int = 0) -> imagegen_pb2.GenerateRequest:
    return imagegen_pb2.GenerateRequest(
        prompt="a lighthouse",
        text_to_image=imagegen_pb2.TextToImage(),
        steps=steps,
        previews=imagegen_pb2.PreviewOptions(every_n_steps=previews),
    )


@pytest.fixture(scope="module")
def metrics_server(model_cache, tmp_path_factory):
    """A server with a /metrics port that has answered CAPTIONS captions, one
    generation with previews and one malformed caption; yields (server, metrics port)."""
    port = free_port()
    logs = tmp_path_factory.mktemp("metrics-logs")
    running = start_server(model_cache, logs, "--workers", "1", "--metrics-port", str(port))
    try:
        with running.channel() as channel:
            captions = caption_pb2_grpc.CaptionServiceStub(channel)
            for _ in range(CAPTIONS):
                captions.Caption(caption_request(), timeout=60)
            stub = imagegen_pb2_grpc.ImageGenServiceStub(channel)
            list(stub.Generate(generate_request(steps=2, previews=1), timeout=60))
            with pytest.raises(grpc.RpcError):
                captions.Caption(caption_request(b"not an image"), timeout=60)
        yield running, port
    finally:
        code = running.stop()
    assert code == 0, running.log()


@pytest.fixture(scope="module")
def scraped(metrics_server) -> str:
    """A scrape taken once the traffic of ``metrics_server`` has been counted."""
    _, port = metrics_server
    invalid = {**CAPTION, "code": "INVALID_ARGUMENT"}
    return scrape_until(port, lambda text: value(text, "imago_requests_total", **invalid))


def test_requests_are_counted_by_service_method_and_code(scraped):
    assert value(scraped, "imago_requests_total", **CAPTION, code="OK") >= CAPTIONS
    assert value(scraped, "imago_requests_total", **GENERATE, code="OK") >= 1
    assert value(scraped, "imago_requests_total", **CAPTION, code="INVALID_ARGUMENT") >= 1


def test_request_durations_are_a_histogram_per_method(scraped):
    assert value(scraped, "imago_request_duration_seconds_count", **CAPTION) >= CAPTIONS + 1
    assert value(scraped, "imago_request_duration_seconds_bucket", **CAPTION, le="+Inf") >= 4
    assert value(scraped, "imago_request_duration_seconds_sum", **CAPTION) > 0


def test_queue_time_and_batch_size_are_recorded_per_model(scraped):
    assert value(scraped, "imago_queue_duration_seconds_count", model="blip2-tiny") >= CAPTIONS
    assert value(scraped, "imago_queue_duration_seconds_count", model="sd-tiny") >= 1
    assert value(scraped, "imago_batch_size_count", model="blip2-tiny") >= 1
    assert value(scraped, "imago_batch_size_sum", model="sd-tiny") >= 1


def test_queue_depth_and_inflight_are_exported_for_every_model_and_idle_at_zero(scraped):
    for model in ("blip2-tiny", "sd-tiny", "blip2-itm-tiny"):
        assert value(scraped, "imago_queue_depth", model=model) == 0
        assert value(scraped, "imago_inflight_requests", model=model) == 0


def test_worker_figures_reach_the_scrape(metrics_server, scraped):
    _, port = metrics_server
    # Memory comes with the worker's heartbeats, about once a second while it is idle.
    text = scrape_until(
        port, lambda t: value(t, "imago_device_memory_bytes", device="cpu"), timeout=10
    )
    assert value(text, "imago_worker_up", worker="worker-0", device="cpu") == 1
    assert value(text, "imago_worker_resident_memory_bytes", worker="worker-0") > 0
    assert value(text, "imago_device_memory_bytes", device="cpu") > 0
    on_cpu = {"worker": "worker-0", "device": "cpu"}
    assert value(text, "imago_worker_device_memory_bytes", **on_cpu) > 0
    # A CPU worker has no allocator of its own to report.
    assert value(text, "imago_worker_device_memory_peak_bytes", **on_cpu) == 0
    assert value(text, "imago_worker_device_memory_reserved_bytes", **on_cpu) == 0
    assert value(text, "imago_denoise_steps_total", model="sd-tiny") >= 2
    assert value(text, "imago_images_generated_total", model="sd-tiny") >= 1
    assert value(text, "imago_time_to_first_preview_seconds_count", model="sd-tiny") >= 1
    assert value(text, "imago_generated_tokens_total", model="blip2-tiny") >= 1
    assert value(text, "imago_inference_duration_seconds_count", model="blip2-tiny") >= 1


def test_a_generation_the_client_cancels_counts_as_cancelled(metrics_server):
    running, port = metrics_server
    cancelled = {**GENERATE, "code": "CANCELLED"}
    before = value(scrape(port), "imago_requests_total", **cancelled) or 0
    with running.channel() as channel:
        events = imagegen_pb2_grpc.ImageGenServiceStub(channel).Generate(
            generate_request(steps=150), timeout=60
        )
        next(events)  # queued: the call has reached the servicer
        events.cancel()

    def counted(text: str) -> bool:
        return (value(text, "imago_requests_total", **cancelled) or 0) > before

    assert value(scrape_until(port, counted), "imago_requests_total", **cancelled) == before + 1


def test_a_generation_past_its_deadline_counts_as_deadline_exceeded(metrics_server):
    running, port = metrics_server
    late = {**GENERATE, "code": "DEADLINE_EXCEEDED"}
    before = value(scrape(port), "imago_requests_total", **late) or 0
    with running.channel() as channel:
        stub = imagegen_pb2_grpc.ImageGenServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            list(stub.Generate(generate_request(steps=150), timeout=0.5))
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def counted(text: str) -> bool:
        return (value(text, "imago_requests_total", **late) or 0) > before

    assert value(scrape_until(port, counted), "imago_requests_total", **late) == before + 1


def test_promtool_accepts_a_live_scrape(scraped):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus)")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=scraped, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_prometheus_scrapes_the_request_counter(metrics_server, scraped, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian/Ubuntu: apt-get install prometheus)")
    _, metrics_port = metrics_server
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: imago\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],  # fmt: skip
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    query = 'imago_requests_total{service="imago.v1.CaptionService",method="Caption",code="OK"}'
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    seen: list = []
    try:
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    seen = json.load(reply)["data"]["result"]
            except OSError:
                pass  # not listening yet
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    assert seen, log_path.read_text(errors="replace")
    assert seen[0]["metric"]["job"] == "imago"
    assert float(seen[0]["value"][1]) >= CAPTIONS


# ------------------------------------------------- how calls are counted


@pytest.mark.parametrize(
    ("outcome", "completed", "set_code", "deadline_passed", "expected"),
    [
        (None, True, None, False, grpc.StatusCode.OK),
        (None, True, grpc.StatusCode.NOT_FOUND, False, grpc.StatusCode.NOT_FOUND),
        (grpc.aio.AbortError(), False, grpc.StatusCode.INVALID_ARGUMENT, False,
         grpc.StatusCode.INVALID_ARGUMENT),
        (asyncio.CancelledError(), False, None, False, grpc.StatusCode.CANCELLED),
        (asyncio.CancelledError(), False, None, True, grpc.StatusCode.DEADLINE_EXCEEDED),
        # A stream stopped between two writes: its behaviour saw nothing.
        (None, False, None, False, grpc.StatusCode.CANCELLED),
        (RuntimeError("bug"), False, None, False, grpc.StatusCode.UNKNOWN),
        (RuntimeError("bug"), False, grpc.StatusCode.DATA_LOSS, False, grpc.StatusCode.DATA_LOSS),
    ],
    ids=[
        "returned", "returned-with-code", "aborted", "cancelled", "deadline", "stopped-stream",
        "raised", "raised-with-code",
    ],
)  # fmt: skip
def test_final_code_follows_how_the_behaviour_ended(
    outcome, completed, set_code, deadline_passed, expected
):
    assert final_code(outcome, completed, set_code, deadline_passed) == expected


async def _call_each_kind(metrics: Metrics) -> None:
    """Serve one method of each kind through the interceptor and call each once."""

    async def boom(request, context):
        raise RuntimeError("a bug")

    async def total(requests, context):
        return b"".join([r async for r in requests])

    async def echo(requests, context):
        async for request in requests:
            yield request

    async def denied(request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        yield b""

    handlers = {
        "Boom": grpc.unary_unary_rpc_method_handler(boom),
        "Total": grpc.stream_unary_rpc_method_handler(total),
        "Echo": grpc.stream_stream_rpc_method_handler(echo),
        "Denied": grpc.unary_stream_rpc_method_handler(denied),
    }
    server = grpc.aio.server(interceptors=[ObservabilityInterceptor(metrics)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Test", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary("/t.Test/Boom")(b"x", timeout=10)
            assert await channel.stream_unary("/t.Test/Total")(iter([b"a", b"b"])) == b"ab"
            replies = [r async for r in channel.stream_stream("/t.Test/Echo")(iter([b"a"]))]
            assert replies == [b"a"]
            with pytest.raises(grpc.aio.AioRpcError):
                [r async for r in channel.unary_stream("/t.Test/Denied")(b"x")]
    finally:
        await server.stop(None)


def test_every_kind_of_method_is_counted_with_its_final_code():
    metrics = Metrics()
    asyncio.run(_call_each_kind(metrics))

    def count(method: str, code: str) -> float | None:
        labels = {"service": "t.Test", "method": method, "code": code}
        return metrics.registry.get_sample_value("imago_requests_total", labels)

    assert count("Boom", "UNKNOWN") == 1
    assert count("Total", "OK") == 1
    assert count("Echo", "OK") == 1
    assert count("Denied", "PERMISSION_DENIED") == 1


class BusyWorkers:
    """One worker that takes a batch whenever ``free`` says so."""

    def __init__(self) -> None:
        self.free = False

    def idle_worker(self, model: str, exclude=frozenset()) -> str | None:
        return "worker-0" if self.free else None

    def worker_count(self, model: str) -> int:
        return 1

    def run(self, worker: str, batch_id: int, model: str, tickets: list[Ticket]) -> None:
        self.free = False

    def cancel(self, ticket: Ticket) -> None:
        pass


def test_device_memory_is_reported_per_worker_and_summed_per_device():
    metrics = Metrics()
    gib = 2**30
    metrics.worker_memory_reported("worker-0", "cuda:0", Heartbeat(gib, 3 * gib, 4 * gib, 5 * gib))
    metrics.worker_memory_reported("worker-1", "cuda:0", Heartbeat(gib, 2 * gib, 2 * gib, 2 * gib))
    metrics.worker_memory_reported("worker-2", "cuda:1", Heartbeat(gib, 1 * gib, 1 * gib, 1 * gib))
    metrics.worker_memory_reported("worker-0", "cuda:0", Heartbeat(gib, 6 * gib, 7 * gib, 8 * gib))
    text = generate_latest(metrics.registry).decode()
    zero = {"worker": "worker-0", "device": "cuda:0"}
    assert value(text, "imago_worker_device_memory_bytes", **zero) == 6 * gib
    assert value(text, "imago_worker_device_memory_peak_bytes", **zero) == 7 * gib
    assert value(text, "imago_worker_device_memory_reserved_bytes", **zero) == 8 * gib
    assert value(text, "imago_device_memory_bytes", device="cuda:0") == 8 * gib
    assert value(text, "imago_device_memory_bytes", device="cuda:1") == gib


def test_scheduler_keeps_queue_depth_inflight_and_batch_figures():
    settings = TextSettings(30, 0, 1, False, 1.0, 1.0, 50, 1.0, 1, 1.0, 0)
    metrics = Metrics()
    scheduler = Scheduler(64, {"blip2": BatchPolicy(8, 0.0)}, metrics=metrics)
    workers = BusyWorkers()
    scheduler.attach(workers)

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model": "blip2"})

    def depth_and_inflight() -> tuple[float | None, float | None]:
        return sample("imago_queue_depth"), sample("imago_inflight_requests")

    async def scenario() -> list[Ticket]:
        tickets = []
        for name in ("a", "b", "c"):
            item = WorkItem(name, CaptionJob("", settings), frames=0)
            tickets.append(Ticket(request_id=name, model="blip2", item=item, frames=[]))
            scheduler.submit(tickets[-1])
        assert depth_and_inflight() == (3, 0)
        workers.free = True
        scheduler.dispatch()
        return tickets

    tickets = asyncio.run(scenario())
    assert depth_and_inflight() == (0, 3)
    assert (sample("imago_batch_size_count"), sample("imago_batch_size_sum")) == (1, 3)
    assert sample("imago_queue_duration_seconds_count") == 3
    scheduler.left_worker(tickets[0])
    assert depth_and_inflight() == (0, 2)
