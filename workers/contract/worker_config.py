"""What a worker process is started with: one :class:`WorkerConfig`.

The frontend builds it for every worker it spawns and hands it to
:func:`imago.workers.runtime.main.run_worker`; multiprocessing pickles it on
the way (msgspec structs pickle), and ``msgspec.msgpack`` encodes and
decodes it like the IPC messages of :mod:`imago.workers.contract.protocol`.
Torch-free.
"""

from __future__ import annotations

import logging

import msgspec

from imago.workers.contract.presets import ModelSpec


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything one worker process needs to load its models and serve.

    ``device`` is "cpu" or "cuda:N" (the worker then sees only GPU N).
    ``endpoint`` is the frontend's ZeroMQ address the worker connects to.
    ``cache_dir`` is where model files are cached (None: the libraries'
    default). The worker exits when its parent is no longer ``parent_pid``.
    ``log_level`` is a :mod:`logging` level number and ``log_format`` the
    frontend's ("text" or "json"). ``cpu_threads`` caps a CPU worker's compute
    threads unless OMP_NUM_THREADS says otherwise (0: torch's default).
    """

    worker_id: str
    device: str
    endpoint: str
    models: tuple[ModelSpec, ...]
    parent_pid: int
    cache_dir: str | None = None
    log_level: int = logging.INFO
    cpu_threads: int = 0
    log_format: str = "text"
