"""What the frontend knows about one worker process: its state, the models it
loaded, the requests it runs and the timings the scheduler and the
supervisor decide by. The pool keeps one per worker."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

from imago.server.tickets import Ticket
from imago.workers.contract.protocol import ModelInfo


@dataclass(eq=False)
class WorkerHandle:
    worker_id: str
    device: str
    process: BaseProcess
    models: dict[str, ModelInfo] = field(default_factory=dict)
    state: str = "starting"  # starting | idle | busy | dead
    running: dict[str, Ticket] = field(default_factory=dict)
    # Model and id of the batch it is running, while busy.
    batch_model: str | None = None
    batch_id: int = 0
    # When it last became idle: the longest-idle worker gets the next batch.
    idle_since: float = 0.0
    # Monotonic times: its process started, it last became ready (None while
    # it is not), its last message arrived, its current batch was handed over.
    spawned_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    heard_at: float = field(default_factory=time.monotonic)
    batch_at: float = 0.0
    # Whether it ever loaded its models: only such a worker is restarted.
    was_ready: bool = False
    # Deaths in a row (for the restart back-off), restarts so far.
    deaths: int = 0
    restarts: int = 0
    # Why loading failed, when the worker said so before it exited.
    load_error: str = ""
    # Running requests that have had a preview already.
    previewed: set[str] = field(default_factory=set)
    # The current batch's first and last progress reports, as (step, elapsed
    # seconds): its time per step, without what comes before and after them.
    first_progress: tuple[int, float] | None = None
    last_progress: tuple[int, float] | None = None

    def step_seconds(self) -> float | None:
        """Seconds per step of the current batch, None without two steps reported."""
        if self.first_progress is None or self.last_progress is None:
            return None
        (step0, at0), (step1, at1) = self.first_progress, self.last_progress
        return (at1 - at0) / (step1 - step0) if step1 > step0 else None

    @property
    def live(self) -> bool:
        """Loaded and not dead: it holds its models and takes batches."""
        return self.state in ("idle", "busy")

    @property
    def identity(self) -> bytes:
        return self.worker_id.encode()
