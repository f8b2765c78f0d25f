"""Graceful drain: how ``imago serve`` stops on SIGTERM or SIGINT.

:func:`drain` first makes grpc refuse new calls (clients see UNAVAILABLE,
which is safe to retry elsewhere), and only then has health say NOT_SERVING,
so that a client that sees NOT_SERVING can rely on being refused. (A call a
client sends on an open connection before it has read grpc's GOAWAY may
still be accepted; it is then served like any other.) Calls in flight go on:
requests running on a worker and those still queued for one are all served,
for up to the grace period (``--drain-grace-s``, default 30 s). Calls still
open when it ends are cancelled (their clients see UNAVAILABLE, never a
hang) and the workers are stopped; the process exits 0 either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc

log = logging.getLogger("imago")

#: How long the pool must have had no request queued or running before the
#: calls still open are cancelled, in seconds: time for finished calls to
#: write their last messages, and for calls still being validated to reach a
#: queue. Calls that never end by themselves (health Watch streams) would
#: otherwise hold the server for the whole grace period.
FLUSH_S = 1.0
#: How often the pool is asked whether it still has work, in seconds.
POLL_S = 0.05


class Pool(Protocol):
    def busy(self) -> bool:
        """Whether any request is queued for a worker or running on one."""
        ...


async def drain(
    server: grpc.aio.Server,
    pool: Pool,
    grace_s: float,
    announce: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Stop ``server`` as the module says: refuse new calls now, then await
    ``announce()`` (the health update), give the work in ``pool`` up to
    ``grace_s`` seconds, and cancel what is left."""
    started = time.monotonic()
    deadline = started + grace_s
    if pool.busy():
        log.info("draining: requests in flight get up to %gs to finish", grace_s)
    stopping = asyncio.ensure_future(server.stop(grace_s))
    # The stop's first step closes the listeners and tells open connections to
    # go away; it runs as soon as this task lets it.
    await asyncio.sleep(0)
    if announce is not None:
        await announce()
    idle_since = None
    busy = pool.busy()
    while not stopping.done() and time.monotonic() < deadline:
        now = time.monotonic()
        busy = pool.busy()
        if busy:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= FLUSH_S:
            break
        await asyncio.sleep(POLL_S)
    # grpc's own stop may end the grace first (on a loaded machine this loop
    # wakes late): its cancellations leave the pool idle, so work still
    # running at the last look, with the grace spent, was cut too.
    overran = stopping.done() and busy and time.monotonic() >= deadline
    if pool.busy() or overran:
        log.warning("drain grace of %gs is over; cancelling the requests left", grace_s)
    else:
        log.info("drained in %.1fs", time.monotonic() - started)
    if not stopping.done():
        # grpc allows a second stop while the first waits: it cancels every call.
        await server.stop(0)
    await stopping
