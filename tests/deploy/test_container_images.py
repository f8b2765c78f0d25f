"""deploy/docker/: the container images, checked offline.

hadolint and checkov lint each Dockerfile, and the semantic tests hold it to
the server it runs: its default arguments go through the real ``imago
serve`` parser, and its health check through the real ``imago health`` one.
No Docker engine or network is needed. The helpers are in deploy_tools.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from deploy_tools import (
    DOCKERFILES,
    ROOT,
    checked_config,
    checkov,
    dockerfile,
    failed_checks,
    run,
    tool,
)

from imago.client.cli import build_parser

CUDA_TORCH_INDEX = re.compile(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)")


@pytest.fixture(params=sorted(DOCKERFILES))
def image(request: pytest.FixtureRequest) -> str:
    return request.param


def test_hadolint_passes_on_the_dockerfile(image: str) -> None:
    result = run(tool("hadolint"), "--failure-threshold", "warning", DOCKERFILES[image])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_in_the_dockerfile_says_why(image: str) -> None:
    lines = DOCKERFILES[image].read_text().splitlines()
    pragma = re.compile(r"#\s*hadolint\s+ignore=([A-Z]+\d+(,[A-Z]+\d+)*)\s*$")
    for number, line in enumerate(lines):
        if "hadolint" not in line:
            continue
        assert pragma.fullmatch(line.strip()), f"line {number + 1}: malformed pragma {line!r}"
        # The reason: prose in the comment block right above the pragma.
        above = []
        for previous in reversed(lines[:number]):
            if not previous.strip().startswith("#"):
                break
            above.append(previous)
        reasons = [c for c in above if "hadolint" not in c and re.search(r"[a-z]{3}", c)]
        assert reasons, f"line {number + 1}: {line.strip()!r} has no reason comment above it"


def test_checkov_finds_no_failed_check_in_the_dockerfile(image: str) -> None:
    report = checkov(DOCKERFILES[image], "dockerfile")
    assert not report["results"]["failed_checks"], failed_checks(report)


def test_every_checkov_skip_in_the_dockerfile_gives_a_reason(image: str) -> None:
    text = DOCKERFILES[image].read_text()
    skip = re.compile(r"#\s*checkov:skip=(CKV2?_DOCKER_\d+):(.*)$")
    for line in (line.strip() for line in text.splitlines() if "checkov:skip" in line):
        match = skip.fullmatch(line)
        assert match and match.group(2).strip(), f"suppression without a reason: {line!r}"


def test_the_image_runs_imago_serve_with_defaults_the_server_accepts(image: str) -> None:
    docker = dockerfile(image)
    assert json.loads(docker.last("ENTRYPOINT")) == ["imago", "serve"]
    config = checked_config(json.loads(docker.last("CMD")))
    assert config.preset == {"cpu": "tiny", "gpu": "default"}[image]
    assert config.metrics_port is not None
    assert {config.port, config.metrics_port} <= docker.exposed()
    assert str(config.cache_dir) in docker.volumes()


def test_the_image_checks_its_health_with_imago_health_on_its_grpc_port(image: str) -> None:
    docker = dockerfile(image)
    options, _, command = docker.last("HEALTHCHECK").partition("CMD ")
    assert "--start-period=" in options
    argv = json.loads(command)
    assert argv[0] == "imago"
    assert build_parser().parse_args(argv[1:]).command == "health"
    config = checked_config(json.loads(docker.last("CMD")))
    # `imago health` connects to $IMAGO_TARGET.
    assert docker.env()["IMAGO_TARGET"] == f"localhost:{config.port}"


def test_the_image_runs_as_a_fixed_unprivileged_user_with_the_cache_on_a_volume(
    image: str,
) -> None:
    docker = dockerfile(image)
    uid, gid = docker.user_ids()
    assert uid >= 10000 and gid >= 10000
    env = docker.env()
    (volume,) = docker.volumes()
    assert env["IMAGO_CACHE"] == volume
    assert Path(env["HF_HOME"]).is_relative_to(volume)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"


def test_the_image_pins_its_base_image_and_the_torch_that_ci_tests(image: str) -> None:
    docker = dockerfile(image)
    for base in docker.base_images():
        name, _, tag = base.rpartition(":")
        assert name and "/" not in tag and tag != "latest", f"unpinned base image {base}"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{base}: pin a patch release"
    ci_torch = re.search(r"torch==(\S+)", (ROOT / ".ci" / "run").read_text()).group(1)
    installs = [rest for k, rest in docker.instructions if k == "RUN" and "torch==" in rest]
    assert len(installs) == 1
    assert re.search(rf"torch=={re.escape(ci_torch)}(\s|$)", installs[0])
    index = re.search(r"--index-url\s+(\S+)", installs[0]).group(1)
    if image == "cpu":
        assert index == "https://download.pytorch.org/whl/cpu"
    else:
        assert CUDA_TORCH_INDEX.fullmatch(index), index


def test_the_gpu_images_torch_is_built_for_the_cuda_of_its_base_image() -> None:
    docker = dockerfile("gpu")
    (base,) = docker.base_images()
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-[a-z-]+-ubuntu[\d.]+", base)
    assert cuda, f"not an nvidia/cuda image: {base}"
    index = CUDA_TORCH_INDEX.search(" ".join(rest for _, rest in docker.instructions))
    assert index.groups() == cuda.groups()
