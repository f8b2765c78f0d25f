"""Starting and stopping: signals, orphans, workers, start-up failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import png_bytes, start_server

from imago.client import DiffusionOptions, ImagoClient


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces; the fields after its ")" do not.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def worker_pids(server_pid: int) -> list[int]:
    # multiprocessing's spawn start method adds a resource tracker: not a worker.
    return [p for p in children(server_pid) if b"spawn_main" in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_server_and_every_worker(model_cache, tmp_path, sig):
    server = start_server(model_cache, tmp_path, "--workers", "2")
    workers = worker_pids(server.process.pid)
    assert len(workers) == 2
    everything = children(server.process.pid)
    assert server.stop(sig) == 0, server.log()
    assert wait_gone(everything) == []


def test_workers_die_with_a_killed_frontend(model_cache, tmp_path):
    server = start_server(model_cache, tmp_path, "--workers", "1")
    workers = children(server.process.pid)
    assert workers
    server.process.kill()
    server.process.wait(10)
    assert wait_gone(workers) == []


def test_unknown_preset_fails_with_the_known_ones(model_cache, tmp_path):
    server = start_server(model_cache, tmp_path, "--preset", "nope", wait=False)
    assert server.process.wait(60) != 0
    assert "unknown preset 'nope'" in server.log()
    assert "tiny" in server.log()


def test_real_preset_without_weights_fails_clearly(model_cache, tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    server = start_server(model_cache, tmp_path, "--preset", "default", wait=False, env=offline)
    assert server.process.wait(120) == 1, server.log()
    log = server.log()
    assert "start-up failed" in log
    assert "Salesforce/blip2-opt-2.7b-coco" in log or "stable-diffusion-v1-5" in log
    assert wait_gone(children(server.process.pid)) == []


def test_imago_help_works_from_any_directory(tmp_path):
    script = Path(sys.executable).with_name("imago")
    result = subprocess.run(
        [str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for command in ("serve", "caption", "ask", "generate"):
        assert command in result.stdout


def test_frontend_process_never_loads_torch(server):
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "libtorch" not in maps
    assert os.path.exists(f"/proc/{server.process.pid}")


def test_a_killed_worker_fails_its_request_and_health_follows(model_cache, tmp_path):
    server = start_server(model_cache, tmp_path, "--workers", "1")
    try:
        (worker,) = worker_pids(server.process.pid)
        with ImagoClient(server.target, timeout=120) as client:
            stream = client.generate(
                "a long walk", diffusion=DiffusionOptions(steps=150, width=256, height=256)
            )
            for event in stream:
                if event.HasField("progress"):
                    os.kill(worker, signal.SIGKILL)
                    break
            with pytest.raises(grpc.RpcError) as caught:
                list(stream)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "exited" in caught.value.details()
            assert client.health("imago.v1.ImageGenService") == "NOT_SERVING"
            assert client.health("") == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as refused:
                client.caption(png_bytes())
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert server.stop() == 0


def test_a_taken_port_fails_start_up_instead_of_sharing_it(server, model_cache, tmp_path):
    port = server.target.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "imago.client.cli", "serve", "--host", "127.0.0.1"]
    result = subprocess.run(
        [*command, "--port", port, "--cache-dir", str(model_cache)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
