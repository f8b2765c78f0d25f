"""Resolving ``imago serve``'s configuration once, and the worker's start-up config."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import msgspec
import pytest

from imago.server import config as config_module
from imago.server.admission import CPU_MAX_PIXELS, GPU_MAX_PIXELS
from imago.server.config import DEFAULT_WATCHDOG_S, ResolvedConfig, ServeConfig
from imago.workers.contract.presets import BatchPolicy, DeviceSettings, ModelSpec, preset
from imago.workers.contract.settings import SettingEntries
from imago.workers.contract.worker_config import WorkerConfig

TINY = ("blip2-tiny", "sd-tiny", "blip2-itm-tiny")


def test_resolve_turns_every_entry_into_plain_values():
    config = ServeConfig(
        overrides=("taesd=",),
        max_batch_sizes=("8", "sd-tiny=2"),
        max_batch_delays_ms=("blip2-tiny=5",),
        device_settings=SettingEntries(dtype=("bf16",), compile=("sd-tiny=default",)),
        watchdog_s=("20", "blip2-tiny=2.5"),
        max_pixels=("sd-tiny=1000000",),
        model_weights=("sd-tiny=0.5",),
    )
    resolved = config.resolve(devices=["cpu", "cpu"])
    assert isinstance(resolved, ResolvedConfig)
    assert resolved.given is config
    assert resolved.devices == ("cpu", "cpu")
    models = {spec.name: spec for spec in resolved.models}
    assert tuple(models) == TINY
    assert models["blip2-tiny"].batching == BatchPolicy(8, 5.0)
    assert models["sd-tiny"].batching == BatchPolicy(2, 20.0)
    assert models["sd-tiny"].settings == DeviceSettings(dtype="bf16", compile="default")
    assert models["blip2-tiny"].settings == DeviceSettings(dtype="bf16")
    assert dict(models["sd-tiny"].extras) == {"inpaint": "tiny:stable-diffusion-inpaint"}
    assert dict(resolved.watchdogs) == {"blip2-tiny": 2.5, "sd-tiny": 20.0, "blip2-itm-tiny": 20.0}
    assert dict(resolved.pixel_limits) == {"sd-tiny": 1_000_000}
    assert dict(resolved.weights) == {"blip2-tiny": 1.0, "sd-tiny": 0.5, "blip2-itm-tiny": 1.0}


def test_the_resolved_config_cannot_be_changed():
    resolved = ServeConfig().resolve(devices=["cpu"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.models = ()  # type: ignore[misc]
    for mapping in (resolved.watchdogs, resolved.pixel_limits, resolved.weights):
        with pytest.raises(TypeError):
            mapping["sd-tiny"] = 1  # type: ignore[index]


def test_the_default_pixel_bound_follows_the_devices_resolved_with():
    assert ServeConfig().resolve(devices=["cpu"]).pixel_limits == {"sd-tiny": CPU_MAX_PIXELS}
    gpus = ServeConfig().resolve(devices=["cuda:0", "cuda:1"])
    assert gpus.pixel_limits == {"sd-tiny": GPU_MAX_PIXELS}
    assert gpus.devices == ("cuda:0", "cuda:1")
    # Without a device list the workers' devices are detected, as at start.
    detected = ServeConfig(workers=3, cpu_only=True).resolve()
    assert detected.devices == ("cpu", "cpu", "cpu")
    assert detected.pixel_limits == {"sd-tiny": CPU_MAX_PIXELS}


def test_defaults_resolve_for_every_model():
    resolved = ServeConfig().resolve(devices=["cpu"])
    # Each model's batching is spelled out: the family's unless an entry changed it.
    assert [(spec.name, spec.batching) for spec in resolved.models] == [
        (spec.name, spec.batch_policy) for spec in preset("tiny")
    ]
    assert dict(resolved.watchdogs) == dict.fromkeys(TINY, DEFAULT_WATCHDOG_S)
    assert dict(resolved.weights) == dict.fromkeys(TINY, 1.0)


def test_resolve_parses_the_preset_and_its_entries_once(monkeypatch):
    calls: list[str] = []

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        return wrapper

    for name in ("preset", "with_overrides", "with_batching", "with_device_settings", "per_model"):
        monkeypatch.setattr(config_module, name, counted(name, getattr(config_module, name)))
    config = ServeConfig(watchdog_s=("7",), max_pixels=("9000",), model_weights=("2",))
    resolved = config.resolve(devices=["cpu"])
    # One per_model each for --watchdog-s, --max-pixels and --model-weight.
    assert sorted(calls) == sorted(
        ["preset", "with_overrides", "with_batching", "with_device_settings", *["per_model"] * 3]
    )
    calls.clear()
    # Reading the resolved values parses nothing again.
    assert resolved.watchdogs["sd-tiny"] == 7.0
    assert resolved.pixel_limits["sd-tiny"] == 9000
    assert resolved.weights["blip2-tiny"] == 2.0
    assert [spec.name for spec in resolved.models] == list(TINY)
    assert calls == []


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (ServeConfig(preset="nope"), "unknown preset 'nope'"),
        (ServeConfig(overrides=("blip2",)), "model override 'blip2' is not FAMILY=SOURCE"),
        (ServeConfig(max_batch_sizes=("nope=3",)), "max batch size 'nope=3' names unknown model"),
        (ServeConfig(max_batch_delays_ms=("-1",)), "max batch delay '-1' is not"),
        (ServeConfig(device_settings=SettingEntries(dtype=("half",))), "--dtype 'half'"),
        (ServeConfig(watchdog_s=("sd-tiny=0",)), "watchdog 'sd-tiny=0' is not"),
        (ServeConfig(max_pixels=("blip2-tiny=9000",)), "--max-pixels 'blip2-tiny=9000' names"),
        (ServeConfig(max_pixels=("lots",)), "--max-pixels 'lots' is not [MODEL=]N"),
        (ServeConfig(model_weights=("sd-tiny=-1",)), "--model-weight 'sd-tiny=-1' is not"),
    ],
)
def test_resolve_refuses_a_bad_entry_naming_its_option(config, named):
    with pytest.raises(ValueError) as raised:
        config.resolve(devices=["cpu"])
    assert named in str(raised.value)


def test_a_bad_model_entry_is_reported_before_devices_are_detected(monkeypatch):
    def detect(workers, cpu_only):
        raise AssertionError("devices detected for a configuration that does not resolve")

    monkeypatch.setattr(config_module, "detect_devices", detect)
    with pytest.raises(ValueError, match="watchdog 'x'"):
        ServeConfig(watchdog_s=("x",)).resolve()


def worker_config(**changes) -> WorkerConfig:
    models = ServeConfig(
        max_batch_sizes=("sd-tiny=2",),
        device_settings=SettingEntries(compile=("sd-tiny=reduce-overhead",)),
        overrides=("adapters=/srv/adapters",),
    ).resolve(devices=["cpu"])
    fields = {
        "worker_id": "worker-1",
        "device": "cuda:1",
        "endpoint": "ipc:///tmp/imago-x/workers.sock",
        "models": models.models,
        "parent_pid": 4321,
        "cache_dir": str(Path("/srv/cache")),
        "log_level": 10,
        "cpu_threads": 3,
        "log_format": "json",
    }
    return WorkerConfig(**{**fields, **changes})


def test_a_worker_config_round_trips_through_msgpack():
    config = worker_config()
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(config), type=WorkerConfig)
    assert decoded == config
    sd = next(spec for spec in decoded.models if spec.name == "sd-tiny")
    assert isinstance(sd, ModelSpec)
    assert sd.batch_policy == BatchPolicy(2, 20.0)
    assert sd.settings.compile == "reduce-overhead"
    blip2 = next(spec for spec in decoded.models if spec.name == "blip2-tiny")
    assert blip2.extras == (("adapters", "/srv/adapters"),)
    without_cache = worker_config(cache_dir=None)
    encoded = msgspec.msgpack.encode(without_cache)
    assert msgspec.msgpack.decode(encoded, type=WorkerConfig).cache_dir is None


def test_a_worker_config_pickles_as_a_spawned_process_receives_it():
    config = worker_config()
    assert pickle.loads(pickle.dumps(config)) == config


def test_a_worker_config_is_frozen_and_needs_its_identity():
    config = worker_config()
    with pytest.raises(AttributeError):
        config.device = "cpu"  # type: ignore[misc]
    with pytest.raises(TypeError):
        WorkerConfig(device="cpu", endpoint="ipc://x", models=(), parent_pid=1)  # type: ignore[call-arg]
