"""The Node.js client in client/node against a real server: its command line
(``node client/node/cli.js``) and, for what the command line does not show,
its library. Needs ``npm ci --prefix client/node`` first."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from certificates import Pki, make_pki
from conftest import RunningServer, png_bytes, start_server, wait_serving
from PIL import Image

from imago.client import DiffusionOptions, TextOptions
from imago.client.api import ImagoClient

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "client" / "node"
CLI = NODE_DIR / "cli.js"
TOKEN = "t0ken-" + secrets.token_hex(16)
# Seconds any one command may take: far more than these need.
TIMEOUT_S = 120


def node_executable() -> str:
    """The node binary, failing the test with what to do when the client
    cannot run: no node, or its packages not installed."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: install Node.js 18 or later")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("client/node/node_modules is missing: run `npm ci --prefix client/node`")
    return node


def node_cli(target: str, *args: str) -> subprocess.CompletedProcess:
    """Runs the Node command line against ``target``."""
    return subprocess.run(
        [node_executable(), str(CLI), "--target", target, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
    )


def node_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """Runs ``script`` with ``node -e`` in client/node (so that ``require('./imago')``
    finds the library); ``args`` are its ``process.argv.slice(1)``."""
    return subprocess.run(
        [node_executable(), "-e", script, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=NODE_DIR,
    )


def write_image(path: Path) -> Path:
    path.write_bytes(png_bytes())
    return path


# ------------------------------------------------------------------ caption and ask


def test_caption_prints_a_caption(server, tmp_path):
    result = node_cli(server.target, "caption", str(write_image(tmp_path / "a.png")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_ask_prints_an_answer(server, tmp_path):
    image = write_image(tmp_path / "a.png")
    result = node_cli(server.target, "ask", str(image), "what is in the picture?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_caption_matches_the_python_clients_with_the_same_settings(server, tmp_path):
    image = write_image(tmp_path / "a.png")
    result = node_cli(server.target, "caption", str(image), "--num-beams", "2", "--prefix", "a")
    assert result.returncode == 0, result.stderr
    with ImagoClient(server.target, timeout=TIMEOUT_S) as client:
        reply = client.caption(image.read_bytes(), prefix="a", generation=TextOptions(num_beams=2))
    assert result.stdout == reply.captions[0].text + "\n"


def test_health_prints_serving(server):
    result = node_cli(server.target, "health", "imago.v1.ImageGenService")
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING")


# ------------------------------------------------------------------ generate


def test_generate_saves_a_png_of_the_requested_size_and_prints_its_seed(server, tmp_path):
    out = tmp_path / "fox.png"
    args = ["a fox", "--out", str(out), "--steps", "3", "--seed", "9"]
    result = node_cli(server.target, "generate", *args, "--width", "96", "--height", "72")
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert (image.format, image.size) == ("PNG", (96, 72))
    assert result.stdout.strip() == f"{out}\tseed=9"


def test_generate_saves_a_preview_for_every_step(server, tmp_path):
    out, previews = tmp_path / "fox.png", tmp_path / "previews"
    args = ["a fox", "--out", str(out), "--steps", "4", "--previews-dir", str(previews)]
    result = node_cli(server.target, "generate", *args)
    assert result.returncode == 0, result.stderr
    names = sorted(path.name for path in previews.iterdir())
    assert names == ["step-0001.jpg", "step-0002.jpg", "step-0003.jpg", "step-0004.jpg"]
    with Image.open(previews / "step-0004.jpg") as preview:
        assert preview.format == "JPEG"


def test_generate_prints_progress_lines_on_stderr(server, tmp_path):
    args = ["a fox", "--out", str(tmp_path / "o.png"), "--steps", "4"]
    result = node_cli(server.target, "generate", *args)
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert progress == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]


def test_generate_makes_the_python_clients_image_for_the_same_seed(server, tmp_path):
    out = tmp_path / "fox.png"
    args = ["a red fox", "--out", str(out), "--steps", "3", "--seed", "1234567890123"]
    more = ["--width", "64", "--height", "80", "--guidance", "5", "--negative", "blur"]
    result = node_cli(server.target, "generate", *args, *more)
    assert result.returncode == 0, result.stderr
    with ImagoClient(server.target, timeout=TIMEOUT_S) as client:
        expected = client.generate_result(
            "a red fox",
            negative_prompt="blur",
            diffusion=DiffusionOptions(
                steps=3, seed=1234567890123, width=64, height=80, guidance_scale=5
            ),
        )
    # Same bytes: same pixels, and the same generation parameters in the PNG.
    assert out.read_bytes() == expected.images[0].image.data


def test_generate_passes_progress_events_to_on_event_in_step_order(server):
    script = """
const { ImagoClient } = require('./imago');
const client = new ImagoClient(process.argv[1], { deadline: 120 });
const steps = [];
const onEvent = (event) => {
  if (event.event === 'progress') steps.push([event.progress.step, event.progress.total_steps]);
};
client.generate('a fox', { steps: 5, seed: 3 }, onEvent)
  .then((result) => console.log(JSON.stringify({ steps, seed: result.images[0].seed })))
  .finally(() => client.close());
"""
    result = node_script(script, server.target)
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)
    assert reported["steps"] == [[step, 5] for step in range(1, 6)]
    assert reported["seed"] == "3"


# ------------------------------------------------------------------ errors


def test_steps_beyond_the_servers_limit_exit_1_naming_the_field(server, tmp_path):
    args = ["a fox", "--out", str(tmp_path / "o.png"), "--steps", "151"]
    result = node_cli(server.target, "generate", *args)
    assert result.returncode == 1
    assert result.stderr.startswith("error: INVALID_ARGUMENT: ")
    # The field from the google.rpc.BadRequest details, on a line of its own.
    assert "\n  steps: " in result.stderr
    assert not (tmp_path / "o.png").exists()


def test_an_empty_prompt_exits_1_naming_the_field(server, tmp_path):
    result = node_cli(server.target, "generate", "", "--out", str(tmp_path / "o.png"))
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "\n  prompt: " in result.stderr


def test_an_unreachable_target_exits_1_with_unavailable(tmp_path):
    image = write_image(tmp_path / "a.png")
    result = node_cli("127.0.0.1:1", "caption", str(image))
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: ")


def test_generate_without_an_output_file_exits_2(server):
    result = node_cli(server.target, "generate", "a fox")
    assert result.returncode == 2 and "--out" in result.stderr


def test_an_unreadable_image_exits_2_naming_it(server, tmp_path):
    missing = tmp_path / "missing.png"
    result = node_cli(server.target, "caption", str(missing))
    assert result.returncode == 2 and f"cannot read {missing}" in result.stderr


# ------------------------------------------------------------------ TLS and tokens


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("node-pki"), TOKEN)


@pytest.fixture(scope="module")
def tls_server(model_cache, pki, tmp_path_factory) -> Iterator[RunningServer]:
    """A server that takes TLS only and needs the bearer token."""
    tls = ("--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key"))
    logs = tmp_path_factory.mktemp("node-tls-logs")
    token = ("--auth-token-file", pki.path("token"))
    running = start_server(model_cache, logs, *tls, *token, wait=False)
    try:
        wait_serving(running.target, running.process, running.log_path, pki.credentials())
    except Exception:
        running.stop(signal.SIGKILL)
        raise
    yield running
    assert running.stop() == 0, running.log()


def tls_target(server: RunningServer) -> str:
    """The server's address by the name its certificate carries: Node warns
    (DEP0123) when a TLS connection is made to an IP address."""
    return server.target.replace("127.0.0.1:", "localhost:")


def test_a_tls_server_answers_given_its_ca_and_the_token(tls_server, pki, tmp_path):
    image = write_image(tmp_path / "a.png")
    security = ["--tls-ca", pki.path("ca.pem"), "--token-file", pki.path("token")]
    result = node_cli(tls_target(tls_server), *security, "caption", str(image))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_a_tls_server_refuses_a_call_without_the_token(tls_server, pki, tmp_path):
    image = write_image(tmp_path / "a.png")
    security = ["--tls-ca", pki.path("ca.pem")]
    result = node_cli(tls_target(tls_server), *security, "caption", str(image))
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAUTHENTICATED: ")
