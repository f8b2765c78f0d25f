"""Prometheus metrics of one ``imago serve`` process.

Every family lives in the :class:`Metrics` object's own registry (never the
global one), so that tests may build several servers in one process. The
frontend records what it sees of requests and queues; what happens on a
worker (steps, tokens, images, memory) reaches it in the worker's messages
and is recorded by the pool. :func:`start_http` serves the registry as
Prometheus text on its own port.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from imago.workers.contract.protocol import ImageResult, Progress, TextResult

if TYPE_CHECKING:
    from imago.workers.contract.protocol import Heartbeat

#: Buckets for request, queue and inference durations, in seconds: from a
#: cached caption (milliseconds) to a long generation (minutes).
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
#: Buckets for batch sizes, in requests or images.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: What each kind of request event adds to which counter of :class:`Metrics`.
EVENT_COUNTS: dict[type, tuple[str, Callable[[Any], float]]] = {
    Progress: ("denoise_steps", lambda event: 1),
    ImageResult: ("images_generated", lambda event: len(event.images)),
    TextResult: ("tokens_generated", lambda event: event.tokens),
}


class Metrics:
    """The metric families of design §5, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The frontend's own process_* figures (resident memory, CPU, fds).
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "imago_requests", "RPCs finished, by status code.",
            ["service", "method", "code"], registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "imago_request_duration_seconds", "Wall time of RPCs, start to status.",
            ["service", "method"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "imago_queue_duration_seconds", "Time requests waited before a worker took them.",
            ["model"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_duration = Histogram(
            "imago_inference_duration_seconds", "Worker time of each batch.",
            ["model"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "imago_queue_depth", "Requests waiting for a worker.", ["model"], registry=r
        )
        self.inflight = Gauge(
            "imago_inflight_requests", "Requests running on a worker.", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "imago_batch_size", "Requests per batch handed to a worker.",
            ["model"], buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_preview = Histogram(
            "imago_time_to_first_preview_seconds", "From arrival to a request's first preview.",
            ["model"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.denoise_steps = Counter(
            "imago_denoise_steps", "Denoising steps run.", ["model"], registry=r
        )
        self.images_generated = Counter(
            "imago_images_generated", "Images returned.", ["model"], registry=r
        )
        self.tokens_generated = Counter(
            "imago_generated_tokens", "New tokens generated.", ["model"], registry=r
        )
        self.worker_up = Gauge(
            "imago_worker_up", "1 while a worker holds its models and takes work.",
            ["worker", "device"], registry=r,
        )  # fmt: skip
        self.worker_restarts = Counter(
            "imago_worker_restarts", "Worker processes started again after one died.",
            ["worker"], registry=r,
        )  # fmt: skip
        self.device_memory = Gauge(
            "imago_device_memory_bytes",
            "Accelerator memory allocated by the workers on a device (their resident memory "
            "for cpu).",
            ["device"], registry=r,
        )  # fmt: skip
        self.worker_memory = Gauge(
            "imago_worker_resident_memory_bytes", "Resident memory of each worker process.",
            ["worker"], registry=r,
        )  # fmt: skip
        self.worker_device_memory = Gauge(
            "imago_worker_device_memory_bytes",
            "Accelerator memory each worker's tensors hold (resident memory for cpu).",
            ["worker", "device"], registry=r,
        )  # fmt: skip
        self.worker_device_peak = Gauge(
            "imago_worker_device_memory_peak_bytes",
            "Most accelerator memory each worker's tensors have held since it started "
            "(0 for cpu).",
            ["worker", "device"], registry=r,
        )  # fmt: skip
        self.worker_device_reserved = Gauge(
            "imago_worker_device_memory_reserved_bytes",
            "Accelerator memory each worker's allocator has reserved from the device (0 for cpu).",
            ["worker", "device"], registry=r,
        )  # fmt: skip
        # Latest (device, bytes) of each worker: a device's figure is their sum.
        self._on_device: dict[str, tuple[str, int]] = {}

    # Recording helpers, named for what happened.

    def request_finished(self, service: str, method: str, code: str, seconds: float) -> None:
        """An RPC ended with ``code`` (a grpc.StatusCode name) after ``seconds``."""
        self.requests.labels(service, method, code).inc()
        self.request_duration.labels(service, method).observe(seconds)

    def batch_started(self, model: str, size: int, queue_seconds: list[float]) -> None:
        """A worker took a batch of ``size`` requests that waited ``queue_seconds``."""
        self.batch_size.labels(model).observe(size)
        for seconds in queue_seconds:
            self.queue_duration.labels(model).observe(seconds)

    def request_event(
        self, model: str, event: object, first_preview_after: float | None = None
    ) -> None:
        """One event of a request of ``model`` from its worker: denoising
        steps, images and tokens are counted; ``first_preview_after`` is set
        (seconds since the request arrived) on its first preview."""
        counted = EVENT_COUNTS.get(type(event))
        if counted is not None:
            counter, amount = counted
            getattr(self, counter).labels(model).inc(amount(event))
        if first_preview_after is not None:
            self.first_preview.labels(model).observe(first_preview_after)

    def worker_memory_reported(self, worker: str, device: str, heartbeat: Heartbeat) -> None:
        """A worker's latest memory figures. For cpu workers the device
        memory is the process's resident memory, and a device's figure is the
        sum over the workers on it."""
        resident = heartbeat.resident_bytes
        held = heartbeat.device_bytes if device != "cpu" else resident
        self.worker_memory.labels(worker).set(resident)
        self.worker_device_memory.labels(worker, device).set(held)
        self.worker_device_peak.labels(worker, device).set(heartbeat.device_peak_bytes)
        self.worker_device_reserved.labels(worker, device).set(heartbeat.device_reserved_bytes)
        self._on_device[worker] = (device, held)
        total = sum(bytes_ for on, bytes_ in self._on_device.values() if on == device)
        self.device_memory.labels(device).set(total)


def start_http(metrics: Metrics, host: str, port: int) -> int:
    """Serve ``metrics`` as Prometheus text at http://host:port/metrics on a
    background thread; returns the port (useful when ``port`` is 0)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server.server_port
