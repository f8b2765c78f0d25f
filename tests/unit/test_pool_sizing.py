"""How the worker pool sizes its workers."""

from __future__ import annotations

from imago.server.pool import cpu_threads


def test_cpu_workers_share_the_cores_out_evenly(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert cpu_threads(["cpu"]) == 8
    assert cpu_threads(["cpu"] * 3) == 2
    assert cpu_threads(["cpu"] * 16) == 1
    assert cpu_threads(["cuda:0", "cuda:1"]) == 0
