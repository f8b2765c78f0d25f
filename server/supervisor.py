"""Supervision of the worker processes: deaths, the watchdog and restarts.

Every :data:`WATCH_INTERVAL_S` the :class:`Supervisor` looks at each worker:

- A worker process that exited (a crash, ``kill -9``, the kernel's OOM
  killer) is dead. Its running requests end at once with UNAVAILABLE (safe to
  retry), so do requests queued for a model no live worker holds any more, and
  health turns NOT_SERVING for every service whose model no live worker holds.
- A busy worker that has sent nothing (no Started, Progress, Preview, result
  or Heartbeat) for longer than the watchdog of its batch's model
  (``--watchdog-s [MODEL=]SECONDS``, default 300 s) is stuck: it is killed
  with SIGKILL and handled as dead. Workers send a heartbeat from inside long
  model calls at least once a second while they make progress, so only a
  worker that is truly stuck stays silent.
- A restarted worker that has not loaded its models within the load timeout
  (``ServeConfig.load_timeout_s``) is killed and handled as dead as well.

Restart policy: a dead worker that had loaded its models at least once is
started again after a back-off of 1 s, doubled for each death in a row and
capped at 30 s (1, 2, 4, 8, 16, 30, 30, ... s). A worker that stayed up for
60 s or longer before it died starts the count afresh: its restart waits 1 s
again. A worker that dies before it ever loaded its models is not restarted:
start-up fails instead. Until a restarted worker is ready, requests for a
model no other live worker holds are refused with UNAVAILABLE and RetryInfo,
and health says NOT_SERVING; its Ready turns health back to SERVING. Each
restart is logged and counted in ``imago_worker_restarts_total``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from imago.server.config import DEFAULT_WATCHDOG_S

if TYPE_CHECKING:
    from imago.server.worker_handle import WorkerHandle

log = logging.getLogger("imago.pool")

#: How often workers are looked at, in seconds: a dead worker's requests fail
#: within this long of its death.
WATCH_INTERVAL_S = 0.2
#: How long a killed process may take to be gone before its successor starts, in seconds.
REAP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential back-off between restarts of a worker that keeps dying."""

    #: Wait before the first restart after a death, in seconds.
    first_s: float = 1.0
    #: Each further death in a row multiplies the wait by this.
    factor: float = 2.0
    #: Longest wait, in seconds.
    max_s: float = 30.0
    #: A worker up at least this long before it died starts the count afresh, in seconds.
    stable_s: float = 60.0

    def delay(self, deaths: int) -> float:
        """Seconds to wait before restarting a worker after its ``deaths``-th
        death in a row (1 for the first)."""
        return min(self.max_s, self.first_s * self.factor ** max(0, deaths - 1))

    def deaths_in_a_row(self, before: int, up_s: float | None) -> int:
        """The count of deaths in a row after one more, given ``before`` until
        now and that the worker was up (ready) for ``up_s`` seconds before it
        died (None: it died while loading)."""
        if up_s is not None and up_s >= self.stable_s:
            return 1
        return before + 1


class Supervised(Protocol):
    """What the supervisor needs of the worker pool."""

    stopping: bool

    def workers(self) -> list[WorkerHandle]: ...

    def lose(self, worker: WorkerHandle, reason: str) -> None:
        """Handle ``worker`` as dead: fail its requests, update health."""
        ...

    def respawn(self, worker: WorkerHandle) -> None:
        """Start a new process for ``worker``."""
        ...


class Supervisor:
    """Notices dead and stuck workers and restarts them, as the module says."""

    def __init__(
        self,
        pool: Supervised,
        watchdog_s: Mapping[str, float] | None = None,
        load_timeout_s: float = 600.0,
        policy: RestartPolicy | None = None,
    ) -> None:
        self._pool = pool
        self._watchdog_s = dict(watchdog_s or {})
        self._load_timeout_s = load_timeout_s
        self._policy = policy or RestartPolicy()
        self._restarts: set[asyncio.Task] = set()

    def watchdog(self, model: str | None) -> float:
        """Seconds a busy worker running a batch of ``model`` may stay silent."""
        return self._watchdog_s.get(model or "", DEFAULT_WATCHDOG_S)

    async def run(self) -> None:
        """Look at every worker every WATCH_INTERVAL_S, until cancelled."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if not self._pool.stopping:
                self.check(time.monotonic())

    def stop(self) -> None:
        """Give up pending restarts (the pool is stopping)."""
        for task in self._restarts:
            task.cancel()

    def check(self, now: float) -> None:
        """Handle every worker found dead, stuck or too slow to load at ``now``."""
        for worker in self._pool.workers():
            if worker.state == "dead":
                continue
            reason = self._fault(worker, now)
            if reason is None:
                continue
            up_s = None if worker.ready_at is None else now - worker.ready_at
            self._pool.lose(worker, reason)
            if worker.was_ready:
                self._schedule_restart(worker, up_s)

    def _fault(self, worker: WorkerHandle, now: float) -> str | None:
        """Why ``worker`` must be handled as dead, or None while it is fine."""
        name = worker.worker_id
        if not worker.process.is_alive():
            detail = f": {worker.load_error}" if worker.load_error else ""
            return f"{name} exited with code {worker.process.exitcode}{detail}"
        if worker.state == "busy":
            limit = self.watchdog(worker.batch_model)
            if now - worker.heard_at > limit:
                worker.process.kill()
                model = worker.batch_model
                return f"{name} reported nothing for {limit:g}s while running {model}; killed it"
        elif worker.state == "starting" and worker.was_ready:
            if now - worker.spawned_at > self._load_timeout_s:
                worker.process.kill()
                limit = self._load_timeout_s
                return f"{name} did not load its models within {limit:g}s; killed it"
        return None

    def _schedule_restart(self, worker: WorkerHandle, up_s: float | None) -> None:
        worker.deaths = self._policy.deaths_in_a_row(worker.deaths, up_s)
        delay = self._policy.delay(worker.deaths)
        log.warning(
            "restarting %s in %gs (death %d in a row)", worker.worker_id, delay, worker.deaths
        )
        task = asyncio.create_task(self._restart(worker, delay))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, worker: WorkerHandle, delay: float) -> None:
        await asyncio.sleep(delay)
        # The successor takes over the socket identity: the old process must be gone.
        await asyncio.to_thread(worker.process.join, REAP_TIMEOUT_S)
        if not self._pool.stopping and worker.state == "dead":
            self._pool.respawn(worker)
