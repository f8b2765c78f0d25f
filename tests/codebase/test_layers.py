"""The layers of the code base, as the import-linter contracts in
pyproject.toml state them: the frontend reaches workers only through the
torch-free contract package, workers never import the frontend, and the
client library stands on the API stubs alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# Where each imago package lives in the repository.
PACKAGES = {"server": "server", "workers": "workers", "client": "client", "v1": "protos/imago/v1"}


def lint_imports(root: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def copy_with(tmp_path: Path, module_path: str, line: str) -> Path:
    """A copy of the sources laid out as the installed ``imago`` package, with
    ``line`` appended to ``module_path`` (a path under the copy's imago/)."""
    for name, folder in PACKAGES.items():
        shutil.copytree(
            ROOT / folder, tmp_path / "imago" / name, ignore=shutil.ignore_patterns("node_modules")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "imago" / module_path, "a") as module:
        module.write(f"\n{line}\n")
    return tmp_path


def test_every_layer_contract_holds():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module_path", "line", "contract"),
    [
        (
            "server/app.py",
            "import imago.workers.families.diffusion.runner",
            "The frontend imports only the contract from workers",
        ),
        (
            "workers/contract/presets.py",
            "import torch",
            "The contract package imports neither torch nor the rest of imago",
        ),
        (
            "workers/runtime/main.py",
            "import imago.server.app",
            "Workers never import the frontend or the client",
        ),
        (
            "client/api.py",
            "import imago.client.cli",
            "The client library imports only the API stubs",
        ),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path, module_path, line, contract):
    copy = copy_with(tmp_path, module_path, line)
    result = lint_imports(copy, PYTHONPATH=str(copy))
    assert result.returncode != 0, result.stdout
    assert f"{contract}" in result.stdout
    broken = result.stdout.split("Broken contracts", 1)[1]
    assert line.split()[-1] in broken
