"""Worker processes and the ZeroMQ channel to them.

The frontend binds one ROUTER socket on a private Unix socket; each worker
process connects a DEALER whose identity is its worker id. Headers are
msgspec/msgpack structs from :mod:`imago.workers.contract.protocol`; image bytes
travel as extra frames. Workers are spawned (never forked), so no CUDA or
thread state leaks from the frontend into them.

Dead and stuck workers are noticed and restarted by the
:class:`~imago.server.supervisor.Supervisor` (see there for the restart
policy and the watchdog). The pool records what workers report in the
server's :class:`~imago.server.metrics.Metrics`: steps, images, tokens, time
to first preview, batch durations, memory, and whether each worker is up.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

import zmq
import zmq.asyncio

from imago.server.config import ResolvedConfig
from imago.server.devices import cpu_threads
from imago.server.metrics import Metrics
from imago.server.scheduler import Scheduler, Ticket
from imago.server.supervisor import Supervisor
from imago.server.worker_handle import WorkerHandle
from imago.workers.contract.logs import current_format
from imago.workers.contract.protocol import (
    AdaptersReloaded,
    BatchDone,
    Cancel,
    Failed,
    Heartbeat,
    LoadFailed,
    ModelInfo,
    Outcome,
    Preview,
    Progress,
    Ready,
    ReloadAdapters,
    RunBatch,
    Shutdown,
    encode,
    from_worker_decoder,
)
from imago.workers.contract.worker_config import WorkerConfig
from imago.workers.runtime import main as worker_main

log = logging.getLogger("imago.pool")

# How long a worker gets to exit after Shutdown before it is terminated.
SHUTDOWN_GRACE_S = 5.0


class StartupError(RuntimeError):
    """A worker could not load its models; the message says which and why."""


class WorkerPool:
    """Starts, feeds and stops the worker processes."""

    def __init__(
        self,
        config: ResolvedConfig,
        scheduler: Scheduler,
        *,
        on_change: Callable[[], None] = lambda: None,
        metrics: Metrics | None = None,
    ) -> None:
        """One worker per device of ``config``, each loading all its models;
        its watchdogs say how long a busy worker may stay silent.
        ``on_change`` is called whenever the set of live workers changes."""
        self._specs = config.models
        self._devices = list(config.devices)
        self._scheduler = scheduler
        self._cache_dir = config.given.cache_dir
        self._on_change = on_change
        self._metrics = metrics
        self._watchdog_s = config.watchdogs
        self._supervisor: Supervisor | None = None
        # Set once stop() begins: exits are expected, nothing is restarted.
        self.stopping = False
        self._workers: dict[str, WorkerHandle] = {}
        self._tasks: list[asyncio.Task] = []
        self._startup: asyncio.Future[None] | None = None
        # What each message about a worker itself (not about one of its
        # requests) does; request events go to their tickets.
        self._lifecycle: dict[type, Callable] = {
            Ready: self._ready,
            LoadFailed: self._load_failed,
            Heartbeat: self._heartbeat,
            AdaptersReloaded: self._adapters_reloaded,
            BatchDone: self._batch_done,
        }
        self._dir = Path(tempfile.mkdtemp(prefix="imago-"))
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # Tell us when a peer is not connected rather than silently dropping.
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A restarted worker reuses its identity: its connection takes over.
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._endpoint = f"ipc://{self._dir / 'workers.sock'}"
        self._socket.bind(self._endpoint)
        scheduler.attach(self)

    # ------------------------------------------------------------ lifecycle

    async def start(self, timeout_s: float) -> None:
        """Spawn one worker per device and wait until all have loaded, at most
        ``timeout_s`` seconds (restarted workers get as long)."""
        self._startup = asyncio.get_running_loop().create_future()
        for index, device in enumerate(self._devices):
            worker_id = f"worker-{index}"
            worker = WorkerHandle(worker_id, device, self._spawn(worker_id, device))
            self._workers[worker_id] = worker
            if self._metrics is not None:
                self._metrics.worker_up.labels(worker_id, device).set(0)
        self._supervisor = Supervisor(self, self._watchdog_s, timeout_s)
        self._tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._supervisor.run()),
        ]
        try:
            await asyncio.wait_for(asyncio.shield(self._startup), timeout_s)
        except TimeoutError:
            raise StartupError(f"workers did not load their models within {timeout_s:g}s") from None

    async def stop(self) -> None:
        """Ask every worker to exit, then make sure it has. Leaves no process."""
        self.stopping = True
        if self._supervisor is not None:
            self._supervisor.stop()
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

    def busy(self) -> bool:
        """Whether any request is queued for a worker or running on one."""
        queued = any(self._scheduler.queue_depth(spec.name) for spec in self._specs)
        return queued or any(worker.running for worker in self._workers.values())

    # ------------------------------------------------ supervisor interface

    def lose(self, worker: WorkerHandle, reason: str) -> None:
        """Handle ``worker`` as dead for ``reason``: its running requests, and
        those queued for a model no live worker holds any more, end with
        UNAVAILABLE (safe to retry)."""
        worker.state = "dead"
        worker.ready_at = None
        if worker.batch_model is not None:
            self._scheduler.batch_lost(worker.batch_id)
        worker.batch_model = None
        log.error(reason)
        if self._metrics is not None:
            self._metrics.worker_up.labels(worker.worker_id, worker.device).set(0)
        for ticket in worker.running.values():
            ticket.deliver(Failed(ticket.request_id, "UNAVAILABLE", reason))
            self._scheduler.left_worker(ticket)
        worker.running.clear()
        worker.previewed.clear()
        # Nobody would ever take requests queued for a model no live worker holds.
        for model in set(worker.models) - self.live_models():
            self._scheduler.fail_queued(model, f"{reason}; no worker holds {model}")
        if not worker.was_ready and self._startup and not self._startup.done():
            self._startup.set_exception(StartupError(reason + " while loading models"))
        self._on_change()

    def respawn(self, worker: WorkerHandle) -> None:
        """Start a new process for dead ``worker``; it is live again once it is ready."""
        worker.process = self._spawn(worker.worker_id, worker.device)
        worker.state = "starting"
        worker.spawned_at = worker.heard_at = time.monotonic()
        worker.load_error = ""
        worker.restarts += 1
        if self._metrics is not None:
            self._metrics.worker_restarts.labels(worker.worker_id).inc()
        name, pid = worker.worker_id, worker.process.pid
        log.warning("%s restarted (restart %d, pid %d)", name, worker.restarts, pid)

    # ------------------------------------------------- scheduler interface

    def idle_worker(self, model: str, exclude: set[str] = frozenset()) -> str | None:
        idle = [
            w
            for w in self._workers.values()
            if w.state == "idle" and model in w.models and w.worker_id not in exclude
        ]
        if not idle:
            return None
        # Spread work: the worker that has waited longest goes first.
        return min(idle, key=lambda w: w.idle_since).worker_id

    def worker_count(self, model: str) -> int:
        return sum(1 for w in self._workers.values() if w.live and model in w.models)

    def run(self, worker_id: str, batch_id: int, model: str, tickets: list[Ticket]) -> None:
        worker = self._workers[worker_id]
        worker.state = "busy"
        worker.batch_model, worker.batch_id = model, batch_id
        worker.first_progress = worker.last_progress = None
        # The watchdog counts silence from the hand-over on.
        worker.batch_at = worker.heard_at = time.monotonic()
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

    def _spawn(self, worker_id: str, device: str) -> BaseProcess:
        """Start a worker process for ``device``; it says Ready once loaded."""
        config = WorkerConfig(
            worker_id=worker_id,
            device=device,
            endpoint=self._endpoint,
            models=self._specs,
            parent_pid=os.getpid(),
            cache_dir=str(self._cache_dir) if self._cache_dir else None,
            log_level=logging.getLogger().level,
            cpu_threads=cpu_threads(self._devices),
            log_format=current_format(),
        )
        # Pickled into the new process, which is spawned (never forked).
        process = multiprocessing.get_context("spawn").Process(
            target=worker_main.run_worker,
            name=f"imago-{worker_id}",
            args=(config,),
            daemon=True,
        )
        process.start()
        return process

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
            worker.heard_at = time.monotonic()
            try:
                self._handle(worker, from_worker_decoder.decode(header), frames)
            except Exception:
                # One bad message must not stop every later one from arriving.
                log.exception("could not handle a message from %s", worker.worker_id)

    def _handle(self, worker: WorkerHandle, message, frames: list[bytes]) -> None:
        if isinstance(message, Ready | LoadFailed):
            self._lifecycle[type(message)](worker, message)
        elif not worker.live:
            return  # left over from a process that has died since
        elif (handler := self._lifecycle.get(type(message))) is not None:
            handler(worker, message)
        else:
            self._request_event(worker, message, frames)

    def _ready(self, worker: WorkerHandle, message: Ready) -> None:
        if message.pid != worker.process.pid or worker.state != "starting":
            return  # from a process that has been replaced since
        worker.models = {info.name: info for info in message.models}
        worker.state = "idle"
        worker.idle_since = worker.ready_at = time.monotonic()
        worker.was_ready = True
        log.info("%s ready on %s (pid %d)", worker.worker_id, worker.device, message.pid)
        for name, info in worker.models.items():
            if info.adapters:
                log.info("%s loaded adapters for %s: %s", worker.worker_id, name, info.adapters)
        if self._metrics is not None:
            self._metrics.worker_up.labels(worker.worker_id, worker.device).set(1)
        if self._startup and not self._startup.done():
            if all(w.state != "starting" for w in self._workers.values()):
                self._startup.set_result(None)
        self._on_change()
        self._scheduler.dispatch()

    def _load_failed(self, worker: WorkerHandle, message: LoadFailed) -> None:
        # The process exits next; the supervisor then handles it as dead.
        worker.load_error = message.message
        if not worker.was_ready and self._startup and not self._startup.done():
            self._startup.set_exception(StartupError(message.message))

    def _heartbeat(self, worker: WorkerHandle, message: Heartbeat) -> None:
        if self._metrics is not None:
            self._metrics.worker_memory_reported(worker.worker_id, worker.device, message)

    def _adapters_reloaded(self, worker: WorkerHandle, message: AdaptersReloaded) -> None:
        worker.models = {info.name: info for info in message.models}
        if message.error:
            log.error("%s could not reload adapters: %s", worker.worker_id, message.error)
        else:
            adapters = {name: info.adapters for name, info in worker.models.items()}
            log.info("%s reloaded adapters: %s", worker.worker_id, adapters)

    def _batch_done(self, worker: WorkerHandle, message: BatchDone) -> None:
        model, worker.batch_model = worker.batch_model, None
        if worker.state == "busy":
            worker.state = "idle"
            worker.idle_since = time.monotonic()
        if model is None:
            self._scheduler.dispatch()
            return
        if self._metrics is not None:
            seconds = message.seconds or worker.idle_since - worker.batch_at
            self._metrics.inference_duration.labels(model).observe(seconds)
        self._scheduler.batch_done(model, message.batch_id, message.seconds, worker.step_seconds())

    def _request_event(self, worker: WorkerHandle, message, frames: list[bytes]) -> None:
        """Hand one request's event (Started, Progress, Preview or an outcome)
        to its ticket, counting it in the metrics on the way."""
        ticket = worker.running.get(message.request_id)
        if ticket is None:
            return
        if isinstance(message, Progress):
            mark = (message.step, message.elapsed_seconds)
            worker.first_progress = worker.first_progress or mark
            worker.last_progress = mark
        if self._metrics is not None:
            first_preview = (
                isinstance(message, Preview) and ticket.request_id not in worker.previewed
            )
            if first_preview:
                worker.previewed.add(ticket.request_id)
            waited = time.monotonic() - ticket.enqueued_at if first_preview else None
            self._metrics.request_event(ticket.model, message, first_preview_after=waited)
        if isinstance(message, Outcome):
            del worker.running[message.request_id]
            worker.previewed.discard(message.request_id)
            self._scheduler.left_worker(ticket)
        ticket.deliver(message, frames)
