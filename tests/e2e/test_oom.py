"""Running out of memory fails the batch's requests, never the worker.

Out-of-memory errors are injected inside the model call by marked requests
(see imago.workers.runtime.faults); the server obeys markers only with the switch on.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from conftest import png_bytes, start_server

from imago.client import DiffusionOptions, ImagoClient
from imago.workers.contract.jobs import (
    CaptionJob,
    DiffusionParams,
    MatchJob,
    TextSettings,
    TextToImageJob,
    VqaJob,
)
from imago.workers.runtime.faults import ENV, enabled, fault_of
from imago.workers.runtime.runner import failure_of

SETTINGS = TextSettings(30, 0, 1, False, 1.0, 1.0, 50, 1.0, 1, 1.0, 0)


@pytest.fixture(scope="module")
def faulty(model_cache, tmp_path_factory):
    """A server obeying fault markers."""
    running = start_server(model_cache, tmp_path_factory.mktemp("oom"), env={ENV: "1"})
    yield running
    assert running.stop() == 0, running.log()


def restarts(log: str) -> int:
    return log.count(" restarted (restart ")


# ------------------------------------------------------------------ through a server


@pytest.mark.parametrize("kind", ["oom", "memoryerror"])
def test_a_caption_out_of_memory_is_resource_exhausted_and_the_worker_serves_on(faulty, kind):
    with ImagoClient(faulty.target, timeout=120) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.caption(png_bytes(), prefix=f"a photo __imago_fault__:{kind}")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "out of" in caught.value.details()
        assert client.caption(png_bytes(), prefix="a photo").captions
        assert client.health("") == "SERVING"
    assert restarts(faulty.log()) == 0


@pytest.mark.parametrize("kind", ["oom", "memoryerror"])
def test_a_generation_out_of_memory_is_resource_exhausted_and_the_worker_serves_on(faulty, kind):
    with ImagoClient(faulty.target, timeout=120) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate_result(
                f"a fox __imago_fault__:{kind}",
                diffusion=DiffusionOptions(steps=4, width=64, height=64),
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        result = client.generate_result(
            "a fox", diffusion=DiffusionOptions(steps=4, width=64, height=64)
        )
        assert len(result.images) == 1
    assert restarts(faulty.log()) == 0


def test_alignment_out_of_memory_is_resource_exhausted_and_the_worker_serves_on(faulty):
    with ImagoClient(faulty.target, timeout=120) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.match([png_bytes()], ["a cat __imago_fault__:oom"])
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.match([png_bytes()], ["a cat"]).similarities.values
    assert restarts(faulty.log()) == 0


def test_fault_markers_are_plain_text_without_the_switch(server):
    with ImagoClient(server.target, timeout=120) as client:
        reply = client.caption(png_bytes(), prefix="__imago_fault__:oom")
    assert reply.captions[0].text.startswith("__imago_fault__:oom")


# ------------------------------------------------------------------ pure logic


def test_memory_errors_map_to_resource_exhausted():
    import torch

    assert failure_of(MemoryError())[0] == "RESOURCE_EXHAUSTED"
    assert failure_of(torch.cuda.OutOfMemoryError("CUDA out of memory"))[0] == "RESOURCE_EXHAUSTED"


def test_freeing_memory_does_not_import_torch():
    code = (
        "import sys; from imago.workers.runtime.runner import free_memory; free_memory(); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_fault_injection_needs_the_switch_set_to_one():
    assert enabled({ENV: "1"})
    assert not enabled({})
    assert not enabled({ENV: "0"})
    assert not enabled({ENV: "yes"})


def test_fault_markers_are_found_in_every_kind_of_request_text():
    params = DiffusionParams(64, 64, 4, 7.5)
    image = TextToImageJob("x", "__imago_fault__:hang", params, seed=0, num_images=1)
    assert fault_of(CaptionJob("a __imago_fault__:oom b", SETTINGS)) == "oom"
    assert fault_of(VqaJob("why?__imago_fault__:exit", SETTINGS)) == "exit"
    assert fault_of(image) == "hang"
    assert fault_of(MatchJob(1, ("fine", "__imago_fault__:memoryerror"))) == "memoryerror"
    assert fault_of(CaptionJob("__imago_fault__:unknown", SETTINGS)) is None
    assert fault_of(CaptionJob("no marker", SETTINGS)) is None
