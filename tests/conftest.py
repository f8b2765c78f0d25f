"""Shared fixtures: a real ``imago serve`` subprocess on a free port."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    target: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def wait_serving(
    target: str,
    process: subprocess.Popen,
    log_path: Path,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    """Polls health until SERVING, over TLS with ``credentials`` and sending
    ``metadata`` (a bearer token) when the server needs them."""
    deadline = time.monotonic() + START_TIMEOUT_S
    if credentials is None:
        opened = grpc.insecure_channel(target)
    else:
        opened = grpc.secure_channel(target, credentials)
    with opened as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log_path.read_text()}")
            try:
                request = health_pb2.HealthCheckRequest(service="")
                reply = stub.Check(request, timeout=2, metadata=metadata or None)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"server not SERVING after {START_TIMEOUT_S}s:\n{log_path.read_text()}")


def start_server(
    cache_dir: Path,
    log_dir: Path,
    *extra: str,
    wait: bool = True,
    env: dict | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> RunningServer:
    """Starts ``imago serve`` with ``extra`` arguments; with ``wait``, returns
    once it is SERVING (polled by :func:`wait_serving`, with ``credentials``
    and ``metadata``)."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    command = [
        sys.executable, "-m", "imago.client.cli", "serve", "--host", "127.0.0.1",
        "--port", str(port), "--cache-dir", str(cache_dir), *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    server = RunningServer(process, f"127.0.0.1:{port}", log_path)
    if wait:
        try:
            wait_serving(server.target, process, log_path, credentials, metadata)
        except Exception:
            server.stop(signal.SIGKILL)
            raise
    return server


def serve_once(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``imago serve`` with ``argv`` run to its end (for options it refuses at start)."""
    command = [sys.executable, "-m", "imago.client.cli", "serve", "--port", "0", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One cache of tiny checkpoints for the whole test session."""
    return tmp_path_factory.mktemp("imago-cache")


@pytest.fixture(scope="session")
def server(model_cache, tmp_path_factory):
    """A tiny-preset server with one CPU worker, shared by the behaviour tests."""
    running = start_server(model_cache, tmp_path_factory.mktemp("logs"), "--workers", "1")
    yield running
    code = running.stop()
    assert code == 0, running.log()


@pytest.fixture(scope="session")
def channel(server):
    with grpc.insecure_channel(server.target) as chan:
        yield chan


def field_violations(error: grpc.RpcError) -> list[str]:
    """The fields named by the BadRequest details of a failed call."""
    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [v.field for v in bad_request.field_violations]
    return fields


def png_bytes(size: tuple[int, int] = (48, 40), color=(200, 30, 60), fmt: str = "PNG") -> bytes:
    """A small solid-colour image with a stripe, encoded as ``fmt``."""
    image = Image.new("RGB", size, color)
    for x in range(size[0]):
        image.putpixel((x, size[1] // 2), (10, 220, 10))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def gradient(width: int = 96, height: int = 64) -> Image.Image:
    """A smooth colour gradient, an init image that VAEs reproduce well."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 2, y * 3, x + y], -1).astype(np.uint8))


def png(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    """The RGB pixels of encoded image bytes, as int16 for differences."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
