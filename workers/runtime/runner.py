"""The contract between a worker process and a model family.

A :class:`Runner` is loaded once per worker and then runs batches. It decodes
its inputs, predicts, and reports what happens to each request as
:data:`Event` messages on an :class:`EventSink`; it never touches sockets.
The worker process's sink sends each event to the frontend as it is, so a
runner speaks the wire protocol of :mod:`imago.workers.contract.protocol`
directly; the in-process sink of :mod:`imago.workers.runtime.inprocess`
collects the same events. Model families, and the runner class of each, are
registered in :mod:`imago.workers.contract.families`.
"""

from __future__ import annotations

import abc
import gc
import logging
import sys
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from imago.workers.contract.jobs import Job
from imago.workers.contract.presets import DeviceSettings
from imago.workers.contract.protocol import (
    ArraysResult,
    Failed,
    ImageResult,
    ModelInfo,
    Outcome,
    Preview,
    Progress,
    Started,
)

log = logging.getLogger("imago.worker")


@dataclass(frozen=True)
class Request:
    """One request of a batch, with its image bytes as the client sent them."""

    request_id: str
    job: Job
    images: list[bytes] = field(default_factory=list)


class Cancelled(Exception):
    """Raised inside a runner when every request of a model call was cancelled."""


#: What a runner reports about one request: it started (with its step count),
#: a step ended, a preview of a step, and then exactly one :data:`Outcome`
#: (TextResult, ImageResult, ArraysResult or Failed), after which nothing more.
Event = Started | Progress | Preview | Outcome


def frame_count(event: Event) -> int:
    """How many byte frames travel after ``event`` on the wire: one encoded
    image for a Preview, one per entry of an ImageResult's ``images`` or an
    ArraysResult's ``arrays``, none otherwise."""
    if isinstance(event, Preview):
        return 1
    if isinstance(event, ImageResult):
        return len(event.images)
    if isinstance(event, ArraysResult):
        return len(event.arrays)
    return 0


class EventSink(Protocol):
    """Where a runner reports what happens to each request of its batch."""

    def emit(self, event: Event, frames: Sequence[bytes] = ()) -> None:
        """Report ``event`` with the bytes that travel after it, as
        :func:`frame_count` says: a Preview's encoded image, an ImageResult's
        encoded images and an ArraysResult's float32 arrays (row-major,
        little-endian), each in the order of the event's entries."""

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
        """Run every request of ``batch`` and report each one's events on
        ``sink``, ending with exactly one :data:`Outcome` per request. The
        frontend batches requests whose jobs' ``batch_key()`` agrees; a runner
        still checks, and runs requests that cannot share a call separately."""


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
            sink.emit(Failed(request.request_id, code, message))
