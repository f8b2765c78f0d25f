"""The worker process: load models once, then run batches as they come.

This module is imported by the frontend only to name :func:`run_worker` as a
process target, so it must not import torch at module level. The worker is
single-threaded: between denoising steps or generation chunks the runner asks
:meth:`WorkerChannel.is_cancelled`, which drains control messages from the
socket without blocking.

The worker tells the frontend it is alive with a :class:`Heartbeat` (which
also carries its memory figures) about once a second while idle, after every
batch, and from inside long model calls whenever it asks about cancellation
and has sent nothing for a second. Heartbeats come from the one thread that
runs the model, never from a thread of their own: a worker stuck in a model
call must fall silent, so that the frontend's watchdog sees it.

Test-only fault injection (off by default) is described in
:mod:`imago.workers.runtime.faults`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import msgspec
import zmq

from imago.workers.contract.logs import configure_logging
from imago.workers.contract.presets import ModelSpec
from imago.workers.contract.protocol import (
    AdaptersReloaded,
    BatchDone,
    Cancel,
    Failed,
    Heartbeat,
    LoadFailed,
    Outcome,
    Ready,
    ReloadAdapters,
    RunBatch,
    Shutdown,
    Started,
    encode,
    to_worker_decoder,
)
from imago.workers.contract.worker_config import WorkerConfig
from imago.workers.runtime import faults
from imago.workers.runtime.runner import (
    Event,
    Request,
    frame_count,
    free_memory,
    run_to_the_end,
)

log = logging.getLogger("imago.worker")

# How often an idle worker sends a heartbeat and checks that the frontend is
# still alive, in ms.
PARENT_CHECK_MS = 1000
# A busy worker sends a heartbeat when it has sent nothing for this long, in seconds.
HEARTBEAT_S = 1.0
# Control messages are looked for at most this often while a batch runs, in
# seconds: a batch of 32 captions asks about every request at every token.
DRAIN_INTERVAL_S = 0.001


class WorkerChannel:
    """The worker's end of the socket, and the EventSink its runners report to."""

    def __init__(self, socket: zmq.Socket) -> None:
        self._socket = socket
        self.pending: deque[tuple[object, list[bytes]]] = deque()
        self.cancelled: set[str] = set()
        self.finished: set[str] = set()
        self.shutting_down = False
        # Whether a request of the current batch failed for lack of memory.
        self.exhausted = False
        # Injected faults by request id: waiting for the request to start,
        # then armed until its next cancellation check.
        self.faults: dict[str, str] = {}
        self._armed: dict[str, str] = {}
        self._drained_at = 0.0
        self._sent_at = 0.0

    def send(self, message: msgspec.Struct, frames: Sequence[bytes] = ()) -> None:
        self._socket.send_multipart([encode(message), *frames], copy=False)
        self._sent_at = time.monotonic()

    def beat(self, quiet_s: float = 0.0) -> None:
        """Send a Heartbeat, unless something was sent within ``quiet_s`` seconds."""
        if time.monotonic() - self._sent_at >= quiet_s:
            self.send(Heartbeat(*memory_usage()))

    def receive(self, timeout_ms: int) -> tuple[object, list[bytes]] | None:
        """Next message to act on, or None after ``timeout_ms``."""
        if self.pending:
            return self.pending.popleft()
        if not self._socket.poll(timeout_ms):
            return None
        header, *frames = self._socket.recv_multipart()
        return to_worker_decoder.decode(header), frames

    def _drain_control(self) -> None:
        now = time.monotonic()
        if now - self._drained_at < DRAIN_INTERVAL_S:
            return
        self._drained_at = now
        while self._socket.poll(0):
            header, *frames = self._socket.recv_multipart()
            message = to_worker_decoder.decode(header)
            if isinstance(message, Cancel):
                self.cancelled.update(message.request_ids)
            elif isinstance(message, Shutdown):
                self.shutting_down = True
            else:
                self.pending.append((message, frames))

    # ------------------------------------------------------------ EventSink

    def is_cancelled(self, request_id: str) -> bool:
        if request_id in self._armed:
            faults.trigger(self._armed.pop(request_id))
        self._drain_control()
        # Asked between steps and tokens: the model is making progress.
        self.beat(HEARTBEAT_S)
        return self.shutting_down or request_id in self.cancelled

    def emit(self, event: Event, frames: Sequence[bytes] = ()) -> None:
        """Send ``event`` and its ``frames`` to the frontend, and keep the
        batch's books: an outcome marks its request ``finished`` (and a
        RESOURCE_EXHAUSTED failure the batch ``exhausted``); a Started arms
        the request's injected fault, if it has one. ValueError when the
        frames do not match the event (see ``frame_count``)."""
        expected = frame_count(event)
        if len(frames) != expected:
            # The frontend pairs frames with entries by position: a mismatch
            # would hand one request's bytes to another.
            raise ValueError(f"{type(event).__name__} takes {expected} frames, got {len(frames)}")
        request_id = event.request_id
        if isinstance(event, Started):
            if request_id in self.faults:
                self._armed[request_id] = self.faults.pop(request_id)
        elif isinstance(event, Outcome):
            self.finished.add(request_id)
            if isinstance(event, Failed) and event.code == "RESOURCE_EXHAUSTED":
                self.exhausted = True
        self.send(event, frames)


def memory_usage() -> tuple[int, int, int, int]:
    """This process's resident memory, and the memory torch's tensors hold on
    its accelerator now and at most so far, and torch has reserved there (0
    without one), all in bytes: the fields of a :class:`Heartbeat`."""
    try:
        with open("/proc/self/statm") as statm:
            resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # No /proc: the peak is the best there is (ru_maxrss is in KiB on Linux).
        resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch = sys.modules.get("torch")
    if not (torch and torch.cuda.is_initialized()):
        return resident, 0, 0, 0
    cuda = torch.cuda
    return resident, cuda.memory_allocated(), cuda.max_memory_allocated(), cuda.memory_reserved()


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the frontend dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def load_runners(specs: list[ModelSpec], device: str, cache_dir: str | None) -> dict:
    """Load every model of ``specs`` on ``device`` as its device settings say,
    warming up those that are compiled; RuntimeError naming a model that
    could not be loaded."""
    from imago.workers.checkpoints import arch, tiny
    from imago.workers.runtime.device_setup import device_memory_bytes, dtype_name
    from imago.workers.runtime.registry import load_runner_class

    root = Path(cache_dir) if cache_dir else None

    def resolve(source: str) -> str:
        # Architectures have no checkpoint: the runner builds them on the device.
        return source if arch.is_arch(source) else tiny.resolve(source, root)

    runners = {}
    for spec in specs:
        runner_class = load_runner_class(spec.family)
        started, before = time.monotonic(), device_memory_bytes(device)
        try:
            source = resolve(spec.source)
            extras = {role: resolve(extra) for role, extra in spec.extras}
            runner = runner_class.load(spec.name, source, device, spec.settings, **extras)
            loaded = time.monotonic()
            if spec.settings.compile != "off":
                runner.warm_up()
                log.info("compiled and warmed up %s in %.1fs", spec.name, time.monotonic() - loaded)
        except Exception as exc:
            raise RuntimeError(f"model {spec.name!r} could not be loaded: {exc}") from exc
        gib = (device_memory_bytes(device) - before) / 2**30
        held = f", {gib:.2f} GiB of device memory" if device != "cpu" else ""
        log.info(
            "%s on %s (%s) in %.1fs%s",
            spec.name,
            device,
            replace(spec.settings, dtype=dtype_name(spec.settings.dtype, device)).describe(),
            loaded - started,
            held,
        )
        runners[spec.name] = runner
    return runners


def _reload(worker_id: str, runners: dict) -> AdaptersReloaded:
    """Let every runner re-read its adapters; report the models as they are now."""
    error = ""
    for name, runner in runners.items():
        try:
            runner.reload()
        except Exception as exc:
            log.error("reloading adapters of %s failed:\n%s", name, traceback.format_exc())
            error = f"{name}: {type(exc).__name__}: {exc}"
    return AdaptersReloaded(worker_id, [runner.info() for runner in runners.values()], error)


def _run_batch(
    runners: dict,
    batch: RunBatch,
    frames: list[bytes],
    channel: WorkerChannel,
    inject_faults: bool = False,
) -> None:
    started = time.perf_counter()
    requests, offset = [], 0
    for item in batch.items:
        requests.append(Request(item.request_id, item.job, frames[offset : offset + item.frames]))
        offset += item.frames
        if inject_faults and (kind := faults.fault_of(item.job)):
            channel.faults[item.request_id] = kind
    channel.finished.clear()
    channel.exhausted = False
    run_to_the_end(runners[batch.model], requests, channel, channel.finished)
    channel.cancelled.difference_update(r.request_id for r in requests)
    channel.faults.clear()
    if channel.exhausted:
        # Out of memory is survivable once what the batch held is given back.
        free_memory()
    channel.send(BatchDone(batch.batch_id, time.perf_counter() - started))
    channel.beat()


def run_worker(config: WorkerConfig) -> None:
    """Entry point of a worker process (spawned by the frontend), which loads
    ``config.models`` on ``config.device``; every log line names its worker id."""
    worker_id, device = config.worker_id, config.device
    _die_with_parent()
    # Ctrl-C reaches the whole process group; the frontend decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(logging.getLevelName(config.log_level), config.log_format, process=worker_id)
    # Download and load progress bars would interleave across workers in the server log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if device.startswith("cuda:"):
        # Pin before torch is imported, so this process sees exactly one GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        device = "cuda"
    elif config.cpu_threads > 0:
        # Read by torch when it is imported, which has not happened yet.
        os.environ.setdefault("OMP_NUM_THREADS", str(config.cpu_threads))
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, worker_id.encode())
    socket.setsockopt(zmq.LINGER, 1000)
    socket.connect(config.endpoint)
    channel = WorkerChannel(socket)
    try:
        started = time.monotonic()
        try:
            runners = load_runners(list(config.models), device, config.cache_dir)
        except Exception as exc:
            log.error("loading failed:\n%s", traceback.format_exc())
            channel.send(LoadFailed(worker_id, str(exc)))
            return
        log.info("loaded %s in %.1fs", ", ".join(runners), time.monotonic() - started)
        infos = [runner.info() for runner in runners.values()]
        inject_faults = faults.enabled()
        if inject_faults:
            log.warning("fault injection is on (%s=1)", faults.ENV)
        channel.send(Ready(worker_id, device, os.getpid(), infos))
        channel.beat()
        while not channel.shutting_down:
            received = channel.receive(PARENT_CHECK_MS)
            channel.beat(HEARTBEAT_S)
            if received is None:
                if os.getppid() != config.parent_pid:
                    break
                continue
            message, frames = received
            if isinstance(message, RunBatch):
                _run_batch(runners, message, frames, channel, inject_faults)
            elif isinstance(message, ReloadAdapters):
                channel.send(_reload(worker_id, runners))
            elif isinstance(message, Shutdown):
                break
            # A Cancel for a batch that already finished needs nothing.
    finally:
        socket.close()
        context.term()
