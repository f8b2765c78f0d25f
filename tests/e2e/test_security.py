"""Security of a real ``imago serve``: TLS, mutual TLS, bearer tokens, start-up
checks of those settings, and the bounds that keep hostile input harmless.

Three servers are shared by the module and started side by side: ``tls``
(TLS and a token), ``mutual`` (mutual TLS) and ``guarded`` (plaintext, the
token needed for health and reflection too, 1 MiB messages). Certificates
come from throwaway CAs (certificates.py).
"""

from __future__ import annotations

import ast
import asyncio
import io
import secrets
import signal
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from certificates import Pki, make_pki
from conftest import RunningServer, png_bytes, start_server, wait_serving
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from imago.client import DiffusionOptions, TextOptions
from imago.client.api import AsyncImagoClient, ImagoClient, caption_request
from imago.client.cli import main
from imago.v1 import caption_pb2

TOKEN = "t0ken-" + secrets.token_hex(16)
BEARER = (("authorization", f"Bearer {TOKEN}"),)
# Seconds any one call may take: far more than these calls need.
TIMEOUT_S = 30
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), TOKEN)


# ------------------------------------------------------------------ servers


@dataclass
class Servers:
    tls: RunningServer
    mutual: RunningServer
    guarded: RunningServer


@pytest.fixture(scope="module")
def servers(model_cache, pki, tmp_path_factory) -> Iterator[Servers]:
    logs = tmp_path_factory.mktemp("security-logs")
    tls = ("--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key"))
    token = ("--auth-token-file", pki.path("token"))
    guarded = (*token, "--auth-health", "--max-message-mb", "1")
    mutual = (*tls, "--tls-client-ca", pki.path("ca.pem"))
    # Started together, they load their models side by side.
    started = [
        start_server(model_cache, logs, *extra, wait=False)
        for extra in ((*tls, *token), mutual, guarded)
    ]
    waits = [(pki.credentials(), ()), (pki.credentials("client"), ()), (None, BEARER)]
    try:
        for server, (credentials, metadata) in zip(started, waits, strict=True):
            wait_serving(server.target, server.process, server.log_path, credentials, metadata)
    except Exception:
        for server in started:
            server.stop(signal.SIGKILL)
        raise
    yield Servers(*started)
    # Stopped together too: each drains and stops its worker in parallel.
    for server in started:
        server.process.send_signal(signal.SIGTERM)
    codes = [server.process.wait(60) for server in started]
    assert codes == [0, 0, 0], "\n".join(server.log() for server in started)


def tls_client(
    server: RunningServer, pki: Pki, client: str | None = None, **options
) -> ImagoClient:
    """A client trusting ca, presenting the certificate ``client`` if named."""
    if client is not None:
        options["client_certificate_chain"] = pki.read(f"{client}.pem")
        options["client_private_key"] = pki.read(f"{client}.key")
    ca = pki.read("ca.pem")
    return ImagoClient(server.target, timeout=TIMEOUT_S, root_certificates=ca, **options)


def refusal(call: Callable[[], object]) -> grpc.RpcError:
    """The RpcError ``call`` raises."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def list_services(channel: grpc.Channel, metadata: tuple = ()) -> list[str]:
    """The service names server reflection lists."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT_S, metadata=metadata)
    return [service.name for reply in replies for service in reply.list_services_response.service]


# ------------------------------------------------------------------ TLS and mutual TLS


def test_a_tls_client_trusting_the_ca_captions(servers, pki):
    with tls_client(servers.tls, pki, token=TOKEN) as client:
        assert client.caption(png_bytes(), generation=TextOptions(max_new_tokens=3)).captions


def test_a_plaintext_client_cannot_reach_a_tls_server(servers):
    with ImagoClient(servers.tls.target, timeout=TIMEOUT_S, token=TOKEN) as client:
        assert refusal(client.health).code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_does_not_connect(servers, pki):
    other = pki.read("other-ca.pem")
    with ImagoClient(servers.tls.target, timeout=TIMEOUT_S, root_certificates=other) as client:
        assert refusal(client.health).code() == grpc.StatusCode.UNAVAILABLE


def test_the_async_client_speaks_tls_with_a_token(servers, pki):
    async def caption() -> caption_pb2.CaptionResponse:
        ca = pki.read("ca.pem")
        async with AsyncImagoClient(servers.tls.target, root_certificates=ca, token=TOKEN) as c:
            return await c.caption(png_bytes(), generation=TextOptions(max_new_tokens=3))

    assert asyncio.run(caption()).captions


def test_mutual_tls_refuses_a_client_without_a_certificate(servers, pki):
    with tls_client(servers.mutual, pki) as client:
        assert refusal(client.health).code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_certificate_another_ca_signed(servers, pki):
    with tls_client(servers.mutual, pki, "stranger") as client:
        assert refusal(client.health).code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_accepts_a_certificate_the_ca_signed(servers, pki):
    with tls_client(servers.mutual, pki, "client") as client:
        assert client.caption(png_bytes(), generation=TextOptions(max_new_tokens=3)).captions


# ------------------------------------------------------------------ bearer tokens


def _stream_item() -> caption_pb2.CaptionStreamRequest:
    return caption_pb2.CaptionStreamRequest(id="1", request=caption_request(png_bytes()))


CALLS = {
    "unary Caption": lambda c: c.caption(png_bytes(), generation=TextOptions(max_new_tokens=3)),
    "server-streaming Generate": lambda c: list(
        c.generate("a fox", diffusion=DiffusionOptions(steps=2, width=64, height=64))
    ),
    "bidirectional CaptionStream": lambda c: list(c.caption_stream(iter([_stream_item()]))),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_a_call_without_the_token_is_unauthenticated(servers, pki, call):
    with tls_client(servers.tls, pki) as client:
        error = refusal(lambda: call(client))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in error.details()


def test_a_bidirectional_stream_is_refused_before_its_client_sends_anything(servers, pki):
    release = threading.Event()

    def silent() -> Iterator[caption_pb2.CaptionStreamRequest]:
        release.wait(TIMEOUT_S)
        yield from ()

    with tls_client(servers.tls, pki) as client:
        try:
            error = refusal(lambda: list(client.caption_stream(silent())))
        finally:
            release.set()
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_wrong_token_is_unauthenticated_and_not_repeated(servers, pki):
    with tls_client(servers.tls, pki, token="guess-123") as client:
        error = refusal(lambda: client.caption(png_bytes()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "guess-123" not in error.details() and TOKEN not in error.details()


def test_the_right_token_opens_a_generation_stream(servers, pki):
    with tls_client(servers.tls, pki, token=TOKEN) as client:
        result = client.generate_result(
            "a fox", diffusion=DiffusionOptions(steps=2, width=64, height=64, seed=1)
        )
    assert len(result.images) == 1


def test_health_checks_need_no_token_by_default(servers, pki):
    with tls_client(servers.tls, pki) as client:
        assert client.health() == "SERVING"


def test_reflection_needs_no_token_by_default(servers, pki):
    with grpc.secure_channel(servers.tls.target, pki.credentials()) as channel:
        assert "imago.v1.CaptionService" in list_services(channel)


def test_auth_health_makes_health_checks_need_the_token(servers):
    target = servers.guarded.target
    with ImagoClient(target, timeout=TIMEOUT_S) as client:
        assert refusal(client.health).code() == grpc.StatusCode.UNAUTHENTICATED
    # Over plaintext the client adds the token itself: gRPC sends call
    # credentials over TLS only.
    with ImagoClient(target, timeout=TIMEOUT_S, token=TOKEN) as client:
        assert client.health() == "SERVING"


def test_auth_health_makes_reflection_need_the_token(servers):
    with grpc.insecure_channel(servers.guarded.target) as channel:
        error = refusal(lambda: list_services(channel))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "imago.v1.CaptionService" in list_services(channel, BEARER)


def test_the_async_client_sends_its_token_over_plaintext(servers):
    async def health() -> str:
        async with AsyncImagoClient(servers.guarded.target, token=TOKEN) as client:
            return await client.health()

    assert asyncio.run(health()) == "SERVING"


# ------------------------------------------------------------------ command line


def test_the_cli_captions_over_tls_with_a_token_file(servers, pki, tmp_path, capsys):
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    security = ["--tls", "--tls-ca", pki.path("ca.pem"), "--token-file", pki.path("token")]
    argv = ["--target", servers.tls.target, *security, "caption", str(image)]
    assert main([*argv, "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}\t")


def test_cli_health_waits_over_tls(servers, pki, capsys):
    argv = ["--target", servers.tls.target, "--tls-ca", pki.path("ca.pem")]
    assert main([*argv, "health", "--wait", "30"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_cli_reads_the_token_file_named_by_the_environment(servers, pki, monkeypatch, capsys):
    monkeypatch.setenv("IMAGO_TOKEN_FILE", pki.path("token"))
    assert main(["--target", servers.guarded.target, "health", "--wait", "30"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_cli_takes_a_client_certificate_only_with_its_key(pki, capsys):
    assert main(["--tls-cert", pki.path("client.pem"), "health"]) == 2
    assert "--tls-key" in capsys.readouterr().err


def test_cli_health_does_not_wait_out_a_refused_token(servers, pki, capsys):
    argv = ["--target", servers.guarded.target, "--token-file", pki.path("wrong-token")]
    began = time.monotonic()
    assert main([*argv, "health", "--wait", "30"]) == 1
    assert time.monotonic() - began < 10
    assert "UNAUTHENTICATED" in capsys.readouterr().err


# ------------------------------------------------------------------ start-up errors


STARTUP_ERRORS = {
    "certificate without key": (["--tls-cert", "server.pem"], "--tls-key"),
    "key of another certificate": (
        ["--tls-cert", "server.pem", "--tls-key", "client.key"],
        "client.key",
    ),
    "missing token file": (["--auth-token-file", "absent-token"], "absent-token"),
    "empty token file": (["--auth-token-file", "empty-token"], "empty-token is empty"),
}


@pytest.mark.parametrize("args, named", STARTUP_ERRORS.values(), ids=STARTUP_ERRORS.keys())
def test_a_bad_security_setting_stops_the_server_with_a_message(
    model_cache, pki, tmp_path, args, named
):
    extra = [pki.path(arg) if not arg.startswith("--") else arg for arg in args]
    server = start_server(model_cache, tmp_path, *extra, wait=False)
    code = server.process.wait(60)
    log = server.log()
    assert code != 0 and named in log and "Traceback" not in log, log


# ------------------------------------------------------------------ hostile input


def _png_header(width: int, height: int) -> bytes:
    """A PNG that is nothing but a header claiming ``width`` x ``height`` RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_an_image_claiming_20000x20000_pixels_is_refused_from_its_header(servers):
    # The file has no pixel data at all: only the header can have been read.
    with ImagoClient(servers.guarded.target, timeout=TIMEOUT_S, token=TOKEN) as client:
        error = refusal(lambda: client.caption(_png_header(20_000, 20_000)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image.data" in error.details()


def test_a_decompression_bomb_is_refused_before_decoding(servers):
    # 8 kB of PNG that would decode to 64 megapixels (192 MB of RGB): each side
    # is within bounds, the pixel count the header promises is not.
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, "PNG")
    with ImagoClient(servers.guarded.target, timeout=TIMEOUT_S, token=TOKEN) as client:
        error = refusal(lambda: client.caption(buffer.getvalue()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "64000000 pixels" in error.details()


def test_a_message_over_the_size_limit_is_resource_exhausted(servers):
    oversized = png_bytes() + secrets.token_bytes(3 * 1024 * 1024 // 2)
    with ImagoClient(servers.guarded.target, timeout=TIMEOUT_S, token=TOKEN) as client:
        error = refusal(lambda: client.caption(oversized))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_absolute_path_is_no_adapter_name(servers):
    # Relative paths ("../ink") are refused in test_loras; a name is checked
    # (workers/adapters.py check_name) before anything looks it up.
    loras = {"/etc/passwd": 1.0}
    with ImagoClient(servers.guarded.target, timeout=TIMEOUT_S, token=TOKEN) as client:
        error = refusal(
            lambda: client.generate_result(
                "a fox", diffusion=DiffusionOptions(steps=2, loras=loras)
            )
        )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "loras[0].name" in error.details()


# ------------------------------------------------------------------ unpickling

# Unpickling runs code the data names, so only trusted bytes may ever be
# unpickled. The frontend and its workers exchange msgspec structs and raw
# image frames over ZeroMQ, and weights load from safetensors, so none of
# these packages needs an unpickling call: any that appears is a new path by
# which client bytes could execute, and this check stops it at review time.
UNPICKLING = {"pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.load", "marshal.loads"}
UNPICKLING |= {
    f"{m}.{f}" for m in ("_pickle", "dill", "cloudpickle", "joblib") for f in ("load", "loads")
}


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value, aliases)}.{node.attr}"
    return aliases.get(node.id, node.id) if isinstance(node, ast.Name) else ""


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unpickling_calls(source: str) -> list[str]:
    """Calls in ``source`` that may unpickle, as "line: name"."""
    tree = ast.parse(source)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}
        if (
            name in UNPICKLING
            or name.endswith(".recv_pyobj")
            or (name == "torch.load" and not _is_true(keywords.get("weights_only")))
            or (name == "numpy.load" and _is_true(keywords.get("allow_pickle")))
        ):
            found.append(f"{node.lineno}: {name}")
    return found


BAD_SOURCES = [
    "import pickle\npickle.loads(data)",
    "from pickle import load as l\nl(f)",
    "import torch\ntorch.load(path)",
    "import numpy as np\nnp.load(path, allow_pickle=True)",
    "import marshal\nmarshal.loads(data)",
    "socket.recv_pyobj()",
]


@pytest.mark.parametrize("source", BAD_SOURCES)
def test_the_unpickling_check_finds_unpickling_calls(source):
    assert unpickling_calls(source)


def test_the_unpickling_check_passes_safe_loading():
    safe = "import torch, numpy\ntorch.load(p, weights_only=True)\nnumpy.load(p)\njson.loads(s)"
    assert unpickling_calls(safe) == []


def test_nothing_in_the_server_workers_or_client_unpickles():
    found = {
        str(path.relative_to(ROOT)): calls
        for package in ("server", "workers", "client")
        for path in sorted((ROOT / package).rglob("*.py"))
        if (calls := unpickling_calls(path.read_text(encoding="utf-8")))
    }
    assert found == {}
