"""Worker supervision: deaths, restarts with back-off, the watchdog, worker figures.

Behaviour runs through real servers; the back-off schedule and the parsing
of ``--watchdog-s`` entries are pure logic, tested directly.
"""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request

import grpc
import pytest
from conftest import free_port, png_bytes, start_server
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from imago.client import DiffusionOptions, ImagoClient, PreviewOptions, TextOptions
from imago.server.config import DEFAULT_WATCHDOG_S, ServeConfig, resolve_watchdogs
from imago.server.supervisor import RestartPolicy
from imago.workers.runtime.faults import ENV, EXIT_CODE

IMAGEGEN = "imago.v1.ImageGenService"
CAPTION = "imago.v1.CaptionService"
MODELS = ["blip2-tiny", "sd-tiny", "blip2-itm-tiny"]


def worker_pid(log: str) -> int:
    """Pid of the worker that became ready last, from the server log."""
    return int(re.findall(r"worker-0 ready on \S+ \(pid (\d+)\)", log)[-1])


def wait_health(client: ImagoClient, service: str, status: str, timeout: float = 60) -> float:
    """Poll until ``service`` reports ``status``; returns the seconds it took."""
    started = time.monotonic()
    while client.health(service) != status:
        assert time.monotonic() - started < timeout, f"{service} not {status} in {timeout}s"
        time.sleep(0.1)
    return time.monotonic() - started


def retry_delay(error: grpc.RpcError) -> float | None:
    """Seconds of the RetryInfo detail of ``error``, None without one."""
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


@pytest.fixture(scope="module")
def faulty(model_cache, tmp_path_factory):
    """A server obeying fault markers, with short watchdogs: 2 s for BLIP-2
    batches, 6 s for Stable Diffusion ones (a denoising step takes about 0.1 s
    here; a machine loaded by other work can stall one for seconds)."""
    logs = tmp_path_factory.mktemp("faulty")
    watchdogs = ("--watchdog-s", "sd-tiny=6", "--watchdog-s", "blip2-tiny=2")
    running = start_server(model_cache, logs, *watchdogs, env={ENV: "1"})
    yield running
    assert running.stop() == 0, running.log()


# ------------------------------------------------------------------ restart policy


def test_restart_back_off_doubles_from_one_second_up_to_thirty():
    policy = RestartPolicy()
    assert [policy.delay(deaths) for deaths in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_worker_up_for_a_minute_starts_its_back_off_afresh():
    policy = RestartPolicy()
    assert policy.deaths_in_a_row(5, up_s=60.0) == 1
    assert policy.deaths_in_a_row(5, up_s=59.0) == 6
    assert policy.deaths_in_a_row(5, up_s=None) == 6  # died while loading


# ------------------------------------------------------------------ watchdog entries


def test_watchdog_entries_resolve_per_model_and_later_ones_win():
    assert resolve_watchdogs((), MODELS) == dict.fromkeys(MODELS, DEFAULT_WATCHDOG_S)
    seconds = resolve_watchdogs(("sd-tiny=600", "20", "blip2-tiny=2.5"), MODELS)
    assert seconds == {"blip2-tiny": 2.5, "sd-tiny": 20.0, "blip2-itm-tiny": 20.0}


@pytest.mark.parametrize("entry", ["nope=3", "sd-tiny=0", "sd-tiny=-1", "inf", "nan", "x", ""])
def test_a_bad_watchdog_entry_is_refused_by_name(entry):
    with pytest.raises(ValueError, match=re.escape(repr(entry))):
        resolve_watchdogs((entry,), MODELS)


def test_serve_config_resolves_watchdogs_for_its_models():
    config = ServeConfig(watchdog_s=("blip2-itm-tiny=7",)).resolve()
    assert config.watchdogs["blip2-itm-tiny"] == 7.0
    assert config.watchdogs["sd-tiny"] == DEFAULT_WATCHDOG_S


def test_imago_serve_exits_2_on_a_watchdog_for_an_unknown_model(model_cache, tmp_path):
    server = start_server(model_cache, tmp_path, "--watchdog-s", "nope=3", wait=False)
    assert server.process.wait(60) == 2
    assert "unknown model 'nope'" in server.log()


# ------------------------------------------------------------------ deaths and restarts


def test_a_killed_worker_fails_its_request_at_once_and_is_restarted(model_cache, tmp_path):
    server = start_server(model_cache, tmp_path, "--workers", "1")
    try:
        pid = worker_pid(server.log())
        with ImagoClient(server.target, timeout=120) as client:
            stream = client.generate(
                "a long walk", diffusion=DiffusionOptions(steps=150, width=512, height=512)
            )
            for event in stream:
                if event.HasField("progress"):
                    os.kill(pid, signal.SIGKILL)
                    killed_at = time.monotonic()
                    break
            with pytest.raises(grpc.RpcError) as caught:
                list(stream)
            latency = time.monotonic() - killed_at
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert latency < 2.0, latency
            # While the only worker restarts, requests are refused as retryable.
            with pytest.raises(grpc.RpcError) as refused:
                client.caption(png_bytes())
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert retry_delay(refused.value) is not None
            assert client.health(IMAGEGEN) == "NOT_SERVING"
            wait_health(client, IMAGEGEN, "SERVING", timeout=60)
            assert client.health("") == "SERVING"
            assert client.caption(png_bytes()).captions
        log = server.log()
        assert "worker-0 exited with code -9" in log
        assert "worker-0 restarted (restart 1" in log
        assert worker_pid(log) != pid
    finally:
        assert server.stop() == 0, server.log()


def test_a_worker_that_crashes_mid_batch_is_restarted(faulty):
    with ImagoClient(faulty.target, timeout=120) as client:
        wait_health(client, "", "SERVING")
        with pytest.raises(grpc.RpcError) as caught:
            client.ask(png_bytes(), "what now? __imago_fault__:exit")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"exited with code {EXIT_CODE}" in caught.value.details()
        wait_health(client, CAPTION, "SERVING", timeout=60)
        assert client.ask(png_bytes(), "what now?").answers


def test_a_silent_worker_is_killed_by_its_models_watchdog_and_restarted(faulty):
    with ImagoClient(faulty.target, timeout=120) as client:
        wait_health(client, "", "SERVING")
        before = worker_pid(faulty.log())
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            client.caption(png_bytes(), prefix="__imago_fault__:hang")
        elapsed = time.monotonic() - started
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "reported nothing for 2s while running blip2-tiny" in caught.value.details()
        assert 2.0 <= elapsed < 6.0, elapsed
        wait_health(client, CAPTION, "SERVING", timeout=60)
        assert client.caption(png_bytes()).captions
        assert worker_pid(faulty.log()) != before


def test_a_batch_outlasting_its_watchdog_while_making_progress_is_not_killed(faulty):
    # Progress on every step keeps the worker heard however long the batch.
    with ImagoClient(faulty.target, timeout=300) as client:
        wait_health(client, "", "SERVING")
        before = worker_pid(faulty.log())
        started = time.monotonic()
        result = client.generate_result(
            "patience", diffusion=DiffusionOptions(steps=150, width=448, height=448)
        )
        elapsed = time.monotonic() - started
    assert result.images
    assert elapsed > 6.0, "too quick to show anything; use more pixels"
    assert worker_pid(faulty.log()) == before


# ------------------------------------------------------------------ worker figures


def test_worker_figures_reach_the_metrics(model_cache, tmp_path):
    port = free_port()
    server = start_server(model_cache, tmp_path, "--metrics-port", str(port))
    try:
        with ImagoClient(server.target, timeout=120) as client:
            client.caption(png_bytes(), generation=TextOptions(max_new_tokens=5, min_new_tokens=5))
            client.generate_result(
                "figures",
                diffusion=DiffusionOptions(steps=4, width=64, height=64),
                previews=PreviewOptions(every_n_steps=2),
            )
        time.sleep(1.5)  # an idle heartbeat carries the memory figures
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        assert server.stop() == 0, server.log()

    def value(sample: str) -> float:
        match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
        assert match, f"{sample} missing from\n{text}"
        return float(match.group(1))

    assert value('imago_worker_up{device="cpu",worker="worker-0"}') == 1
    assert value('imago_generated_tokens_total{model="blip2-tiny"}') == 5
    assert value('imago_denoise_steps_total{model="sd-tiny"}') == 4
    assert value('imago_images_generated_total{model="sd-tiny"}') == 1
    assert value('imago_time_to_first_preview_seconds_count{model="sd-tiny"}') == 1
    assert value('imago_inference_duration_seconds_count{model="sd-tiny"}') == 1
    assert value('imago_worker_resident_memory_bytes{worker="worker-0"}') > 50e6
    assert value('imago_device_memory_bytes{device="cpu"}') > 50e6
