"""Worker processes and the ZeroMQ channel to them.

The frontend binds one ROUTER socket on a private Unix socket; each worker
process connects a DEALER whose identity is its worker id. Headers are
msgspec/msgpack structs from :mod:`imago.workers.protocol`; image bytes
travel as extra frames. Workers are spawned (never forked), so no CUDA or
thread state leaks from the frontend into them.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path

import zmq
import zmq.asyncio

from imago.server.scheduler import Scheduler, Ticket
from imago.workers import main as worker_main
from imago.workers.presets import ModelSpec
from imago.workers.protocol import (
    AdaptersReloaded,
    BatchDone,
    Cancel,
    Failed,
    LoadFailed,
    ModelInfo,
    Outcome,
    Ready,
    ReloadAdapters,
    RunBatch,
    Shutdown,
    encode,
    from_worker_decoder,
)

log = logging.getLogger("imago.pool")

# How often dead worker processes are looked for, in seconds.
WATCH_INTERVAL_S = 0.2
# How long a worker gets to exit after Shutdown before it is terminated.
SHUTDOWN_GRACE_S = 5.0


class StartupError(RuntimeError):
    """A worker could not load its models; the message says which and why."""


def detect_devices(workers: int, cpu_only: bool) -> list[str]:
    """One "cuda:N" per visible NVIDIA GPU, else ``workers`` times "cpu".

    Asks nvidia-smi rather than torch, so the frontend never imports torch.
    """
    if not cpu_only:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            ids = [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
            if ids:
                return [f"cuda:{i}" for i in ids]
        elif shutil.which("nvidia-smi"):
            try:
                listing = subprocess.run(
                    ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
                ).stdout
                count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
                if count:
                    return [f"cuda:{i}" for i in range(count)]
            except (OSError, subprocess.SubprocessError):
                log.warning("nvidia-smi failed; starting CPU workers")
    return ["cpu"] * max(1, workers)


def cpu_threads(devices: list[str]) -> int:
    """Compute threads for each CPU worker: this process's cores shared out
    evenly, so that several CPU workers do not oversubscribe them."""
    workers = sum(1 for device in devices if device == "cpu")
    if not workers:
        return 0
    return max(1, len(os.sched_getaffinity(0)) // workers)


@dataclass(eq=False)
class WorkerHandle:
    worker_id: str
    device: str
    process: BaseProcess
    models: dict[str, ModelInfo] = field(default_factory=dict)
    state: str = "starting"  # starting | idle | busy | dead
    running: dict[str, Ticket] = field(default_factory=dict)
    # Model of the batch it is running, while busy.
    batch_model: str | None = None
    # When it last became idle: the longest-idle worker gets the next batch.
    idle_since: float = 0.0

    @property
    def live(self) -> bool:
        """Loaded and not dead: it holds its models and takes batches."""
        return self.state in ("idle", "busy")

    @property
    def identity(self) -> bytes:
        return self.worker_id.encode()


class WorkerPool:
    """Starts, feeds and stops the worker processes."""

    def __init__(
        self,
        specs: tuple[ModelSpec, ...],
        devices: list[str],
        scheduler: Scheduler,
        *,
        cache_dir: Path | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._specs = specs
        self._devices = devices
        self._scheduler = scheduler
        self._cache_dir = cache_dir
        self._on_change = on_change
        self._workers: dict[str, WorkerHandle] = {}
        self._tasks: list[asyncio.Task] = []
        self._startup: asyncio.Future[None] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="imago-"))
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # Tell us when a peer is not connected rather than silently dropping.
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._endpoint = f"ipc://{self._dir / 'workers.sock'}"
        self._socket.bind(self._endpoint)
        scheduler.attach(self)

    # ------------------------------------------------------------ lifecycle

    async def start(self, timeout_s: float) -> None:
        """Spawn one worker per device and wait until all have loaded."""
        self._startup = asyncio.get_running_loop().create_future()
        spawn = multiprocessing.get_context("spawn")
        for index, device in enumerate(self._devices):
            worker_id = f"worker-{index}"
            process = spawn.Process(
                target=worker_main.run_worker,
                name=f"imago-{worker_id}",
                kwargs={
                    "worker_id": worker_id,
                    "device": device,
                    "endpoint": self._endpoint,
                    "specs": list(self._specs),
                    "cache_dir": str(self._cache_dir) if self._cache_dir else None,
                    "parent_pid": os.getpid(),
                    "log_level": logging.getLogger().level,
                    "cpu_threads": cpu_threads(self._devices),
                },
                daemon=True,
            )
            process.start()
            self._workers[worker_id] = WorkerHandle(worker_id, device, process)
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch())]
        try:
            await asyncio.wait_for(asyncio.shield(self._startup), timeout_s)
        except TimeoutError:
            raise StartupError(f"workers did not load their models within {timeout_s:g}s") from None

    async def stop(self) -> None:
        """Ask every worker to exit, then make sure it has. Leaves no process."""
        for worker in self._workers.values():
            if worker.state != "dead":
                self._send(worker, Shutdown())
        for worker in self._workers.values():
            await asyncio.to_thread(worker.process.join, SHUTDOWN_GRACE_S)
            if worker.process.is_alive():
                log.warning("%s did not exit; terminating it", worker.worker_id)
                worker.process.terminate()
                await asyncio.to_thread(worker.process.join, 2.0)
            if worker.process.is_alive():
                worker.process.kill()
                await asyncio.to_thread(worker.process.join, 2.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._socket.close(linger=0)
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ------------------------------------------------------------ queries

    def model_info(self, model: str) -> ModelInfo | None:
        for worker in self._workers.values():
            if worker.live and model in worker.models:
                return worker.models[model]
        return None

    def live_models(self) -> set[str]:
        return {name for worker in self._workers.values() if worker.live for name in worker.models}

    def workers(self) -> list[WorkerHandle]:
        return list(self._workers.values())

    # ------------------------------------------------- scheduler interface

    def idle_worker(self, model: str) -> str | None:
        idle = [w for w in self._workers.values() if w.state == "idle" and model in w.models]
        if not idle:
            return None
        # Spread work: the worker that has waited longest goes first.
        return min(idle, key=lambda w: w.idle_since).worker_id

    def worker_count(self, model: str) -> int:
        return sum(1 for w in self._workers.values() if w.live and model in w.models)

    def run(self, worker_id: str, batch_id: int, model: str, tickets: list[Ticket]) -> None:
        worker = self._workers[worker_id]
        worker.state = "busy"
        worker.batch_model = model
        frames: list[bytes] = []
        for ticket in tickets:
            worker.running[ticket.request_id] = ticket
            frames.extend(ticket.frames)
        batch = RunBatch(batch_id=batch_id, model=model, items=[t.item for t in tickets])
        self._send(worker, batch, frames)

    def reload_adapters(self) -> None:
        """Ask every live worker to rescan its adapter directories; each
        answers between batches, and the models it reports replace the old."""
        for worker in self._workers.values():
            if worker.live:
                self._send(worker, ReloadAdapters())

    def cancel(self, ticket: Ticket) -> None:
        worker = self._workers.get(ticket.worker or "")
        if worker is not None and worker.state == "busy":
            self._send(worker, Cancel(request_ids=[ticket.request_id]))

    # ------------------------------------------------------------ internals

    def _send(self, worker: WorkerHandle, message, frames: list[bytes] = ()) -> None:
        try:
            self._socket.send_multipart([worker.identity, encode(message), *frames], copy=False)
        except zmq.ZMQError as exc:
            log.warning("could not reach %s: %s", worker.worker_id, exc)

    async def _receive(self) -> None:
        while True:
            identity, header, *frames = await self._socket.recv_multipart()
            worker = self._workers.get(identity.decode())
            if worker is None:
                continue
            try:
                self._handle(worker, from_worker_decoder.decode(header), frames)
            except Exception:
                # One bad message must not stop every later one from arriving.
                log.exception("could not handle a message from %s", worker.worker_id)

    def _handle(self, worker: WorkerHandle, message, frames: list[bytes]) -> None:
        if isinstance(message, Ready):
            worker.models = {info.name: info for info in message.models}
            worker.state = "idle"
            worker.idle_since = time.monotonic()
            log.info("%s ready on %s (pid %d)", worker.worker_id, worker.device, message.pid)
            if self._startup and not self._startup.done():
                if all(w.state != "starting" for w in self._workers.values()):
                    self._startup.set_result(None)
            self._on_change()
            self._scheduler.dispatch()
        elif isinstance(message, AdaptersReloaded):
            if worker.live:
                worker.models = {info.name: info for info in message.models}
            if message.error:
                log.error("%s could not reload adapters: %s", worker.worker_id, message.error)
            else:
                adapters = {name: info.adapters for name, info in worker.models.items()}
                log.info("%s reloaded adapters: %s", worker.worker_id, adapters)
        elif isinstance(message, LoadFailed):
            worker.state = "dead"
            if self._startup and not self._startup.done():
                self._startup.set_exception(StartupError(message.message))
        elif isinstance(message, BatchDone):
            model, worker.batch_model = worker.batch_model, None
            if worker.state == "busy":
                worker.state = "idle"
                worker.idle_since = time.monotonic()
            if model is not None:
                self._scheduler.batch_done(model)
            else:
                self._scheduler.dispatch()
        else:
            ticket = worker.running.get(message.request_id)
            if ticket is None:
                return
            if isinstance(message, Outcome):
                del worker.running[message.request_id]
                self._scheduler.left_worker(ticket)
            ticket.deliver(message, frames)

    async def _watch(self) -> None:
        """Notice worker processes that exit on their own, and fail their requests."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for worker in self._workers.values():
                if worker.state == "dead" or worker.process.is_alive():
                    continue
                was_starting = worker.state == "starting"
                worker.state = "dead"
                reason = f"{worker.worker_id} exited with code {worker.process.exitcode}"
                log.error(reason)
                for ticket in worker.running.values():
                    ticket.deliver(Failed(ticket.request_id, "UNAVAILABLE", reason))
                    self._scheduler.left_worker(ticket)
                worker.running.clear()
                # Nobody would ever take requests queued for a model no live worker holds.
                for model in set(worker.models) - self.live_models():
                    self._scheduler.fail_queued(model, f"{reason}; no worker holds {model}")
                if was_starting and self._startup and not self._startup.done():
                    self._startup.set_exception(StartupError(reason + " while loading models"))
                self._on_change()
