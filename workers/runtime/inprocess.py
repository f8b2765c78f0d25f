"""Running a loaded runner in this process, without a server: the baseline
that ``imago bench --baseline`` measures the server against.

:class:`CollectingSink` is an :class:`~imago.workers.runtime.runner.EventSink` that
keeps every outcome in memory; :func:`run_direct` hands requests to
``runner.run`` in batches of a chosen size and times each request and call;
:func:`run_calls` runs a list of prepared calls, each on its own runner, and
:func:`load_for_services` loads the runners of a preset. This module imports
no torch itself; the runners it loads and drives do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from imago.workers.contract.presets import model_for_service, preset
from imago.workers.contract.protocol import (
    ArraysResult,
    ImageResult,
    Outcome,
    Preview,
    Progress,
    TextResult,
)
from imago.workers.runtime.runner import Event, EventSink, Request, Runner, run_to_the_end


@dataclass
class DirectResult:
    """The outcome of one request run in process.

    ``code`` is "OK" or a gRPC status code name. ``seconds`` runs from the
    start of the ``runner.run`` call the request was part of to the moment
    the runner reported its result or failure (what a client of a server
    waits for, less the transport); ``call_seconds`` is the wall time of the
    whole call and ``batch_size`` the number of requests in it (a runner may
    split a call into several model calls: Stable Diffusion runs one per
    batch key).
    """

    request_id: str
    code: str = "OK"
    message: str = ""
    seconds: float = 0.0
    call_seconds: float = 0.0
    batch_size: int = 1
    texts: list[str] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    # Float32 arrays by name, as (shape, row-major little-endian bytes).
    arrays: dict[str, tuple[tuple[int, ...], bytes]] = field(default_factory=dict)
    previews: int = 0
    steps: int = 0


class CollectingSink(EventSink):
    """An EventSink that records what a runner reports, per request id.

    Nothing is ever cancelled. ``results`` holds one :class:`DirectResult`
    per request id seen; a request is finished once an outcome (a result or
    a failure) was reported for it (see :attr:`finished`), at
    ``finished_at[id]`` (``time.perf_counter``; the first outcome counts).
    """

    def __init__(self) -> None:
        self.results: dict[str, DirectResult] = {}
        self.finished: set[str] = set()
        self.finished_at: dict[str, float] = {}

    def emit(self, event: Event, frames: Sequence[bytes] = ()) -> None:
        request_id = event.request_id
        result = self.results.setdefault(request_id, DirectResult(request_id))
        if isinstance(event, Progress):
            result.steps = event.step
        elif isinstance(event, Preview):
            result.previews += 1
        elif isinstance(event, Outcome):
            self.finished.add(request_id)
            self.finished_at.setdefault(request_id, time.perf_counter())
            if isinstance(event, TextResult):
                result.texts = [text.text for text in event.texts]
            elif isinstance(event, ImageResult):
                result.images = list(frames)
            elif isinstance(event, ArraysResult):
                pairs = zip(event.arrays, frames, strict=True)
                result.arrays = {meta.name: (meta.shape, data) for meta, data in pairs}
            else:
                result.code, result.message = event.code, event.message

    def is_cancelled(self, request_id: str) -> bool:
        return False


def run_direct(runner: Runner, requests: list[Request], batch_size: int = 1) -> list[DirectResult]:
    """Run ``requests`` on ``runner``, ``batch_size`` at a time (consecutive
    slices, one ``runner.run`` call each), and return one result per request
    in order.

    Each result's ``seconds`` and ``call_seconds`` are as :class:`DirectResult`
    says, from ``time.perf_counter``. An exception from the runner fails the
    requests of that call it had not finished, as a worker process would
    (CANCELLED, RESOURCE_EXHAUSTED for running out of memory, INTERNAL
    otherwise).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sink = CollectingSink()
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        started = time.perf_counter()
        run_to_the_end(runner, batch, sink, sink.finished)
        ended = time.perf_counter()
        for request in batch:
            rid = request.request_id
            result = sink.results[rid]
            result.seconds = min(sink.finished_at[rid], ended) - started
            result.call_seconds, result.batch_size = ended - started, len(batch)
    return [sink.results[request.request_id] for request in requests]


def run_calls(calls: Sequence[tuple[Runner, list[Request]]]) -> tuple[list[DirectResult], float]:
    """Run each ``(runner, requests)`` of ``calls`` as one ``runner.run`` call
    (:func:`run_direct`), in order. Returns the results of all requests in
    order and the wall seconds of all the calls together; empty calls are
    skipped."""
    results: list[DirectResult] = []
    started = time.perf_counter()
    for runner, requests in calls:
        if requests:
            results += run_direct(runner, requests, len(requests))
    return results, time.perf_counter() - started


def quiet_libraries() -> None:
    """Turn off the libraries' progress bars and info logs in this process,
    unless the environment already says otherwise."""
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def load_for_services(
    preset_name: str, services: Iterable[str], device: str, cache_dir: str | None = None
) -> dict[str, Runner]:
    """The runner that answers each of ``services`` (full gRPC service names)
    in preset ``preset_name``, each model loaded once onto ``device``, with
    the libraries' progress bars and info logs off. ValueError for an unknown
    preset or a service it has no model for; RuntimeError for a model that
    cannot be loaded."""
    quiet_libraries()
    from imago.workers.runtime.main import load_runners

    models = preset(preset_name)
    specs = {service: model_for_service(models, service) for service in services}
    missing = sorted(service for service, spec in specs.items() if spec is None)
    if missing:
        raise ValueError(f"preset {preset_name!r} has no model for {', '.join(missing)}")
    loaded = load_runners(list({s.name: s for s in specs.values()}.values()), device, cache_dir)
    return {service: loaded[spec.name] for service, spec in specs.items()}
