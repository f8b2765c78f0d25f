"""Per-model device settings: how ``imago serve``'s --dtype, --attention,
--channels-last, --compile, --vae-slicing and --vae-tiling reach each model,
and which entries are refused before any worker starts."""

from __future__ import annotations

import re

import pytest
from conftest import serve_once

from imago.client.cli import build_parser
from imago.client.cli.serve import serve_config
from imago.workers.contract.presets import DeviceSettings, preset
from imago.workers.contract.settings import SettingEntries, with_device_settings

TINY = preset("tiny")


def settings_of(**entries: tuple[str, ...]) -> dict[str, DeviceSettings]:
    models = with_device_settings(TINY, SettingEntries(**entries))
    return {spec.name: spec.settings for spec in models}


def test_models_keep_the_default_settings_when_no_option_is_given():
    assert set(settings_of().values()) == {DeviceSettings()}
    assert DeviceSettings() == DeviceSettings("auto", "sdpa", False, "off", False, False)


def test_a_bare_dtype_sets_every_model_and_a_named_one_wins_after_it():
    settings = settings_of(dtype=("bf16", "sd-tiny=fp32"))
    assert settings["blip2-tiny"].dtype == "bf16"
    assert settings["blip2-itm-tiny"].dtype == "bf16"
    assert settings["sd-tiny"].dtype == "fp32"


def test_later_entries_win():
    assert settings_of(dtype=("sd-tiny=fp32", "fp16"))["sd-tiny"].dtype == "fp16"


def test_attention_applies_to_every_family():
    settings = settings_of(attention=("eager",))
    assert {s.attention for s in settings.values()} == {"eager"}


def test_stable_diffusion_options_without_a_model_set_only_stable_diffusion_models():
    settings = settings_of(
        channels_last=("on",), compile=("max-autotune",), vae_slicing=("on",), vae_tiling=("on",)
    )
    assert settings["sd-tiny"] == DeviceSettings("auto", "sdpa", True, "max-autotune", True, True)
    assert settings["blip2-tiny"] == DeviceSettings()
    assert settings["blip2-itm-tiny"] == DeviceSettings()


def test_a_switch_can_be_turned_off_again():
    settings = settings_of(vae_tiling=("on", "sd-tiny=off"), compile=("default", "off"))
    assert settings["sd-tiny"].vae_tiling is False
    assert settings["sd-tiny"].compile == "off"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"dtype": ("fp8",)}, "--dtype 'fp8': 'fp8' is not one of auto, fp32, fp16, bf16"),
        ({"attention": ("flash",)}, "--attention 'flash': 'flash' is not one of sdpa, eager"),
        ({"compile": ("sd-tiny=fast",)}, "--compile 'sd-tiny=fast': 'fast' is not one of"),
        ({"vae_tiling": ("yes",)}, "--vae-tiling 'yes': 'yes' is not one of on, off"),
        ({"dtype": ("sd15=fp16",)}, "--dtype 'sd15=fp16' names unknown model 'sd15'"),
        (
            {"channels_last": ("blip2-tiny=on",)},
            "--channels-last 'blip2-tiny=on': blip2-tiny is a blip2 model; "
            "--channels-last applies to stable-diffusion models only",
        ),
        (
            {"compile": ("blip2-itm-tiny=default",)},
            "--compile 'blip2-itm-tiny=default': blip2-itm-tiny is a blip2-align model",
        ),
    ],
)
def test_malformed_or_misplaced_entries_are_refused_naming_the_option(entries, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        settings_of(**entries)


def test_compilation_is_refused_for_a_model_serving_loras():
    from imago.workers.contract.presets import with_overrides

    models = with_overrides(TINY, ("loras=/srv/loras",))
    with pytest.raises(ValueError, match="--compile: sd-tiny also serves loras"):
        with_device_settings(models, SettingEntries(compile=("default",)))


def test_describe_names_what_differs_from_plain_eager_execution():
    settings = DeviceSettings("fp16", "sdpa", True, "reduce-overhead", False, True)
    assert settings.describe() == "fp16, sdpa, channels_last, vae_tiling, compile=reduce-overhead"


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_serve_options_reach_the_models_of_the_config():
    args = serve_args(
        "--dtype", "bf16", "--attention", "sd-tiny=eager", "--channels-last", "--compile",
        "--vae-slicing", "sd-tiny=on", "--vae-tiling", "off",
    )  # fmt: skip
    models = {spec.name: spec.settings for spec in serve_config(args).resolve().models}
    assert models["sd-tiny"] == DeviceSettings("bf16", "eager", True, "default", True, False)
    assert models["blip2-tiny"] == DeviceSettings(dtype="bf16")


def test_serve_options_work_on_the_arch_presets():
    args = serve_args("--preset", "arch", "--compile", "sd15-arch=reduce-overhead")
    models = {spec.name: spec for spec in serve_config(args).resolve().models}
    assert models["sd15-arch"].source == "arch:sd15"
    assert models["sd15-arch"].settings.compile == "reduce-overhead"
    assert models["blip2-opt-2.7b-arch"].source == "arch:blip2-opt-2.7b"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--dtype", "half"], "--dtype 'half'"),
        (["--vae-tiling", "sd-tiny"], "--vae-tiling 'sd-tiny'"),
        (["--compile", "blip2-tiny=default"], "--compile 'blip2-tiny=default'"),
        (["--attention", "nope=sdpa"], "--attention 'nope=sdpa' names unknown model"),
    ],
)
def test_imago_serve_exits_2_naming_a_bad_device_option(argv, named):
    result = serve_once(*argv)
    assert result.returncode == 2
    assert named in result.stderr
