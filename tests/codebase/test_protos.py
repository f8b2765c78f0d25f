"""The API definition: lint clean, and the committed stubs match it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_proto_files():
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_passes():
    buf = shutil.which("buf")
    if buf is None:
        pytest.skip("buf is not installed (pip install buf-bin)")
    result = subprocess.run([buf, "lint"], cwd=ROOT / "protos", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_stubs_import_under_the_imago_namespace():
    from imago.v1 import caption_pb2, imagegen_pb2, vqa_pb2

    assert caption_pb2.DESCRIPTOR.package == "imago.v1"
    task = imagegen_pb2.GenerateRequest.DESCRIPTOR.oneofs_by_name["task"]
    assert {f.name for f in task.fields} == {"text_to_image", "image_to_image", "inpaint"}
    assert "AskStream" in vqa_pb2.DESCRIPTOR.services_by_name["VqaService"].methods_by_name


def test_frontend_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import imago.server.app, imago.client, imago.client.cli\n"
        "assert 'torch' not in sys.modules, 'frontend imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
