"""The contract between a worker process and a model family.

A runner is loaded once per worker and then runs batches. It decodes its
inputs, predicts, and encodes its outputs through an :class:`EventSink`; it
never touches sockets. Adding a model family means adding one runner module
and naming it in :data:`imago.workers.runtime.main.FAMILIES`.
"""

from __future__ import annotations

import abc
import gc
import logging
import sys
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Protocol

from imago.workers.contract.presets import DeviceSettings
from imago.workers.contract.protocol import ArrayMeta, GeneratedText, ImageMeta, Job, ModelInfo

log = logging.getLogger("imago.worker")


@dataclass(frozen=True)
class Request:
    """One request of a batch, with its image bytes as the client sent them."""

    request_id: str
    job: Job
    images: list[bytes] = field(default_factory=list)


class Cancelled(Exception):
    """Raised inside a runner when every request of a model call was cancelled."""


class EventSink(Protocol):
    """Where a runner reports what happens to each request of its batch."""

    def started(self, request_id: str, total_steps: int = 0) -> None: ...

    def progress(
        self, request_id: str, step: int, total_steps: int, elapsed_seconds: float
    ) -> None: ...

    def preview(
        self,
        request_id: str,
        step: int,
        image_index: int,
        data: bytes,
        mime_type: str,
        width: int,
        height: int,
    ) -> None: ...

    def text_result(
        self,
        request_id: str,
        texts: list[GeneratedText],
        seed: int,
        inference_seconds: float,
        tokens: int | None = None,
    ) -> None:
        """End a request with its texts. ``tokens`` counts the new tokens of
        all of them; None: the sum of their own ``tokens``."""

    def image_result(
        self,
        request_id: str,
        images: list[tuple[ImageMeta, bytes]],
        warnings: list[str],
        inference_seconds: float,
    ) -> None: ...

    def arrays_result(
        self, request_id: str, arrays: list[tuple[ArrayMeta, bytes]], inference_seconds: float
    ) -> None:
        """End a request with float32 arrays, each with its row-major
        little-endian bytes."""

    def failed(self, request_id: str, code: str, message: str, field: str = "") -> None:
        """End a request with a gRPC status (``code`` is a StatusCode name);
        ``field`` names the request field at fault, when one is."""

    def is_cancelled(self, request_id: str) -> bool:
        """True once the frontend asked to stop this request. Cheap to call
        between steps: it also drains pending control messages."""


class Runner(abc.ABC):
    """A loaded model that runs batches of requests of its family."""

    #: Family name used in presets, e.g. "blip2" or "stable-diffusion".
    family: str

    @classmethod
    @abc.abstractmethod
    def load(
        cls,
        name: str,
        source: str,
        device: str,
        settings: DeviceSettings | None = None,
        **extras: str,
    ) -> Runner:
        """Load the model named ``name`` from ``source`` (a local directory, a
        hub id or an ``arch:`` source) onto ``device`` ("cpu", "cuda"), as
        ``settings`` say (None: the defaults). ``extras`` are further sources
        by role (see ModelSpec.extras); a role the family does not know is a
        ValueError."""

    def warm_up(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Run the model once on the shapes requests will bring, so that
        compilation happens before serving. Called after ``load`` when the
        model is compiled; nothing to do by default."""

    def reload(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Re-read what may change while serving (e.g. adapter directories).
        Called between batches; nothing to do by default."""

    @abc.abstractmethod
    def info(self) -> ModelInfo:
        """Facts the frontend validates requests against."""

    @abc.abstractmethod
    def run(self, batch: list[Request], sink: EventSink) -> None:
        """Run every request of ``batch`` and report each one's outcome on
        ``sink``: exactly one of ``text_result``, ``image_result``,
        ``arrays_result`` or ``failed`` per request. The frontend batches
        requests whose :func:`~imago.workers.contract.protocol.batch_key` agrees; a
        runner still checks, and runs requests that cannot share a call
        separately."""


def failure_of(exc: Exception) -> tuple[str, str]:
    """The gRPC status name and message for requests a runner raised ``exc``
    on: CANCELLED, RESOURCE_EXHAUSTED for running out of (device) memory,
    INTERNAL (logged with its traceback) for anything else."""
    if isinstance(exc, Cancelled):
        return "CANCELLED", "cancelled"
    if isinstance(exc, MemoryError):
        return "RESOURCE_EXHAUSTED", f"out of memory: {exc}"
    # torch.cuda.OutOfMemoryError is not a MemoryError; recognise it by name
    # so this module stays free of torch.
    if type(exc).__name__ == "OutOfMemoryError":
        return "RESOURCE_EXHAUSTED", f"out of device memory: {exc}"
    log.error("a batch failed", exc_info=exc)
    return "INTERNAL", f"{type(exc).__name__}: {exc}"


def free_memory() -> None:
    """Give back what a batch that ran out of memory left behind: unreachable
    objects (tensors in reference cycles) to the allocator, and torch's cached
    accelerator blocks to the device, so that the next batch has room. Torch
    is only asked when something else imported it."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_to_the_end(
    runner: Runner, batch: list[Request], sink: EventSink, finished: Container[str]
) -> None:
    """Run ``batch`` on ``runner`` and make sure every request gets an outcome:
    those not in ``finished`` afterwards (the runner raised, or forgot one)
    are failed on ``sink`` as :func:`failure_of` says."""
    try:
        runner.run(batch, sink)
        code, message = "INTERNAL", "the model returned no result"
    except Exception as exc:
        code, message = failure_of(exc)
    for request in batch:
        if request.request_id not in finished:
            sink.failed(request.request_id, code, message)
