"""Running a loaded runner in this process, without a server: the baseline
that ``imago bench --baseline`` measures the server against.

:class:`CollectingSink` is an :class:`~imago.workers.runner.EventSink` that
keeps every outcome in memory; :func:`run_direct` hands requests to
``runner.run`` in batches of a chosen size and times each call. This module
imports no torch itself; the runners it drives do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from imago.workers.protocol import GeneratedText, ImageMeta
from imago.workers.runner import Cancelled, EventSink, Request, Runner


@dataclass
class DirectResult:
    """The outcome of one request run in process.

    ``code`` is "OK" or a gRPC status code name. ``seconds`` is the wall time
    of the ``runner.run`` call the request was part of (for a batch: the whole
    batch), ``batch_size`` the number of requests in that call.
    """

    request_id: str
    code: str = "OK"
    message: str = ""
    seconds: float = 0.0
    batch_size: int = 1
    texts: list[str] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    previews: int = 0
    steps: int = 0


class CollectingSink(EventSink):
    """An EventSink that records what a runner reports, per request id.

    Nothing is ever cancelled. ``results`` holds one :class:`DirectResult`
    per request id seen; a request is finished once a result or a failure
    was reported for it (see :attr:`finished`).
    """

    def __init__(self) -> None:
        self.results: dict[str, DirectResult] = {}
        self.finished: set[str] = set()

    def _result(self, request_id: str) -> DirectResult:
        return self.results.setdefault(request_id, DirectResult(request_id))

    def started(self, request_id: str, total_steps: int = 0) -> None:
        self._result(request_id)

    def progress(
        self, request_id: str, step: int, total_steps: int, elapsed_seconds: float
    ) -> None:
        self._result(request_id).steps = step

    def preview(
        self,
        request_id: str,
        step: int,
        image_index: int,
        data: bytes,
        mime_type: str,
        width: int,
        height: int,
    ) -> None:
        self._result(request_id).previews += 1

    def text_result(
        self,
        request_id: str,
        texts: list[GeneratedText],
        seed: int,
        inference_seconds: float,
    ) -> None:
        self.finished.add(request_id)
        self._result(request_id).texts = [t.text for t in texts]

    def image_result(
        self,
        request_id: str,
        images: list[tuple[ImageMeta, bytes]],
        warnings: list[str],
        inference_seconds: float,
    ) -> None:
        self.finished.add(request_id)
        self._result(request_id).images = [data for _, data in images]

    def failed(self, request_id: str, code: str, message: str, field: str = "") -> None:
        self.finished.add(request_id)
        result = self._result(request_id)
        result.code, result.message = code, message

    def is_cancelled(self, request_id: str) -> bool:
        return False


def run_direct(runner: Runner, requests: list[Request], batch_size: int = 1) -> list[DirectResult]:
    """Run ``requests`` on ``runner``, ``batch_size`` at a time (consecutive
    slices, one ``runner.run`` call each), and return one result per request
    in order.

    Each result's ``seconds`` is the wall time of its call, in seconds, from
    ``time.perf_counter``. An exception from the runner fails the requests of
    that call it had not finished, as a worker process would (CANCELLED,
    RESOURCE_EXHAUSTED for running out of memory, INTERNAL otherwise).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sink = CollectingSink()
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        code, message = "INTERNAL", "the model returned no result"
        started = time.perf_counter()
        try:
            runner.run(batch, sink)
        except Cancelled:
            code, message = "CANCELLED", "cancelled"
        except MemoryError as exc:
            code, message = "RESOURCE_EXHAUSTED", f"out of memory: {exc}"
        except Exception as exc:
            name = type(exc).__name__
            code = "RESOURCE_EXHAUSTED" if name == "OutOfMemoryError" else "INTERNAL"
            message = f"{name}: {exc}"
        seconds = time.perf_counter() - started
        for request in batch:
            if request.request_id not in sink.finished:
                sink.failed(request.request_id, code, message)
            result = sink.results[request.request_id]
            result.seconds, result.batch_size = seconds, len(batch)
    return [sink.results[request.request_id] for request in requests]
