"""deploy/k8s/finetune/: the fine-tuning Jobs, checked offline, and held to
the serving Deployment that reads what they write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from deploy_tools import (
    DEPLOY,
    Overlay,
    checkov,
    failed_checks,
    mount_at,
    parse_serve_args,
    render,
    render_overlays,
    run,
    suppressions,
    tool,
)

from imago.client.cli import build_parser
from imago.client.cli.finetune import settings_from_args

FINETUNE = DEPLOY / "k8s" / "finetune"
# What each Job trains, and the `imago serve` flag of the folder its adapters go in.
SERVE_FLAG_OF_KIND = {"imagegen": "lora_dir", "caption": "caption_adapter_dir"}


@pytest.fixture(scope="module")
def finetune(tmp_path_factory: pytest.TempPathFactory) -> Overlay:
    return render(FINETUNE, "finetune", tmp_path_factory.mktemp("finetune"))


@pytest.fixture(scope="module")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> Overlay:
    return render_overlays(tmp_path_factory.mktemp("overlays"))["gpu"]


@pytest.fixture(params=sorted(SERVE_FLAG_OF_KIND))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def job(finetune: Overlay, kind: str) -> dict[str, Any]:
    return finetune.one("Job", f"imago-finetune-{kind}")


def container(job: dict[str, Any]) -> dict[str, Any]:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    return only


def claim_at(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, bool]:
    """The claim mounted at ``path`` or a folder above it, and whether the
    mount is read-only."""
    volume, mount = mount_at(pod, container, path)
    assert "persistentVolumeClaim" in volume, f"{path} is not on a claim"
    return volume["persistentVolumeClaim"]["claimName"], bool(mount.get("readOnly"))


def finetune_args(job: dict[str, Any]) -> Any:
    """The Job's command line, parsed by the real ``imago`` parser."""
    spec = container(job)
    assert spec["command"] == ["imago"]
    try:
        return build_parser().parse_args(spec["args"])
    except SystemExit:
        pytest.fail(f"imago rejects {spec['args']}")


def test_kubernetes_validate_accepts_the_jobs_strictly(finetune: Overlay):
    result = run(tool("kubernetes-validate"), "--strict", "-k", "1.30", "-k", "1.37", finetune.path)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = sum("passed for resource" in line for line in result.stdout.splitlines())
    assert passed == 2 * len(finetune.docs), result.stdout


def test_checkov_finds_nothing_unexplained_in_the_jobs(finetune: Overlay):
    report = checkov(finetune.path, "kubernetes")
    assert report["summary"]["failed"] == 0, failed_checks(report)
    for resource, value in suppressions(finetune):
        check, _, reason = value.partition("=")
        assert check.startswith("CKV") and len(reason.strip()) > 20, (resource, value)


def test_each_job_runs_imago_finetune_with_settings_it_accepts(finetune: Overlay, kind: str):
    args = finetune_args(job(finetune, kind))
    assert (args.command, args.kind) == ("finetune", kind)
    settings = settings_from_args(args)
    assert settings.out.is_absolute() and settings.data.is_absolute()


def test_each_job_writes_its_adapter_where_the_server_looks(
    finetune: Overlay, gpu: Overlay, kind: str
):
    spec = job(finetune, kind)
    pod = spec["spec"]["template"]["spec"]
    args = finetune_args(spec)
    written_claim, read_only = claim_at(pod, container(spec), str(args.out))
    assert not read_only
    serve = parse_serve_args(gpu.container["args"])
    folder = getattr(serve, SERVE_FLAG_OF_KIND[kind])
    assert folder is not None, f"the Deployment serves no {SERVE_FLAG_OF_KIND[kind]}"
    # Same claim, same path: the adapter lands directly in the folder the server reads.
    served_claim, served_read_only = claim_at(gpu.pod, gpu.container, str(folder))
    assert served_claim == written_claim and served_read_only
    assert args.out.parent == Path(folder)
    if kind == "imagegen":
        assert args.out.suffix == ".safetensors"


def test_each_job_reads_its_data_read_only_and_shares_the_model_cache(
    finetune: Overlay, gpu: Overlay, kind: str
):
    spec = job(finetune, kind)
    pod = spec["spec"]["template"]["spec"]
    args = finetune_args(spec)
    claim, read_only = claim_at(pod, container(spec), str(args.data))
    assert claim == finetune.one("PersistentVolumeClaim")["metadata"]["name"] and read_only
    cache_claim, _ = claim_at(pod, container(spec), str(args.cache_dir))
    assert cache_claim == gpu.volume_at(gpu.config.cache_dir)["persistentVolumeClaim"]["claimName"]
    # The base model is the one the Deployment serves, already in that cache.
    assert args.preset == gpu.config.preset


def test_each_job_runs_once_on_one_gpu_as_an_unprivileged_user(finetune: Overlay, kind: str):
    spec = job(finetune, kind)
    pod = spec["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert spec["spec"]["backoffLimit"] <= 3 and spec["spec"]["activeDeadlineSeconds"] > 0
    resources = container(spec)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container(spec)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # A read-only root: only mounted folders are writable, /tmp among them.
    assert any(m["mountPath"] == "/tmp" for m in container(spec)["volumeMounts"])
