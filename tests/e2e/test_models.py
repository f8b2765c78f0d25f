"""Choosing models: presets, overrides, and legacy BLIP-2 checkpoints served."""

from __future__ import annotations

import pytest
from conftest import png_bytes, start_server

from imago.client import ImagoClient, TextOptions
from imago.workers.contract.presets import (
    BLIP2,
    BLIP2_ALIGN,
    FAMILY_BATCHING,
    STABLE_DIFFUSION,
    BatchPolicy,
    preset,
    with_batching,
    with_overrides,
)


def test_an_override_replaces_the_presets_model_of_its_family():
    models = with_overrides(preset("tiny"), ("blip2=/models/my-blip2/",))
    by_family = {m.family: m for m in models}
    assert (by_family[BLIP2].name, by_family[BLIP2].source) == ("my-blip2", "/models/my-blip2/")
    assert by_family[STABLE_DIFFUSION] == preset("tiny")[1]


def test_models_batch_by_their_familys_policy_unless_told_otherwise():
    blip2, sd, align = with_batching(preset("tiny"), ("8", "sd-tiny=2"), ("blip2-tiny=0",))
    assert blip2.batch_policy == BatchPolicy(max_batch_size=8, max_batch_delay_ms=0.0)
    assert sd.batch_policy == BatchPolicy(2, FAMILY_BATCHING[STABLE_DIFFUSION].max_batch_delay_ms)
    assert align.batch_policy == BatchPolicy(8, FAMILY_BATCHING[BLIP2_ALIGN].max_batch_delay_ms)
    assert preset("tiny")[0].batch_policy == FAMILY_BATCHING[BLIP2]


@pytest.mark.parametrize(
    ("sizes", "delays", "message"),
    [
        (("nope=3",), (), "unknown model 'nope'"),
        (("0",), (), "valid VALUE"),
        (("blip2-tiny=x",), (), "valid VALUE"),
        ((), ("-1",), "valid VALUE"),
        ((), ("inf",), "valid VALUE"),
    ],
)
def test_malformed_batch_limits_are_refused(sizes, delays, message):
    with pytest.raises(ValueError, match=message):
        with_batching(preset("tiny"), sizes, delays)


def test_an_inpaint_override_sets_or_removes_the_dedicated_checkpoint():
    tiny_sd = {m.family: m for m in preset("tiny")}[STABLE_DIFFUSION]
    assert dict(tiny_sd.extras) == {
        "inpaint": "tiny:stable-diffusion-inpaint",
        "taesd": "tiny:taesd",
    }
    (sd,) = [m for m in with_overrides(preset("tiny"), ("inpaint=/ckpt/inpainting",)) if m.extras]
    assert dict(sd.extras)["inpaint"] == "/ckpt/inpainting"
    generic = {m.family: m for m in with_overrides(preset("tiny"), ("inpaint=",))}
    assert generic[STABLE_DIFFUSION].extras == (("taesd", "tiny:taesd"),)
    bare = {m.family: m for m in with_overrides(preset("tiny"), ("inpaint=", "taesd="))}
    assert bare[STABLE_DIFFUSION].extras == ()


def test_a_hub_id_override_is_named_after_its_repository():
    (model,) = [m for m in with_overrides((), ("blip2=Salesforce/blip2-opt-6.7b",))]
    assert model.name == "blip2-opt-6.7b"


@pytest.mark.parametrize(
    ("override", "message"),
    [("blip2", "FAMILY=SOURCE"), ("blip2=", "FAMILY=SOURCE"), ("clip=x", "unknown model family")],
)
def test_malformed_overrides_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        with_overrides(preset("tiny"), (override,))


def test_legacy_blip2_checkpoint_is_served_like_the_modern_one(server, model_cache, tmp_path):
    legacy = start_server(model_cache, tmp_path, "--model", "blip2=tiny:blip2-legacy")
    try:
        image = png_bytes(size=(33, 61), color=(120, 200, 40))
        with ImagoClient(legacy.target, timeout=60) as old, ImagoClient(server.target) as new:
            caption = old.caption(image, generation=TextOptions(max_new_tokens=12))
            assert caption.info.model == "tiny-blip2-legacy"
            expected = (
                new.caption(image, generation=TextOptions(max_new_tokens=12)).captions[0].text
            )
            assert caption.captions[0].text == expected
            answer = (
                old.ask(image, "what is it?", generation=TextOptions(max_new_tokens=6))
                .answers[0]
                .text
            )
            assert (
                answer
                == new.ask(image, "what is it?", generation=TextOptions(max_new_tokens=6))
                .answers[0]
                .text
            )
    finally:
        assert legacy.stop() == 0
