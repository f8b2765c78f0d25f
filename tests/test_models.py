"""Choosing models: presets, overrides, and legacy BLIP-2 checkpoints served."""

from __future__ import annotations

import pytest
from conftest import png_bytes, start_server

from imago.client import ImagoClient
from imago.workers.presets import BLIP2, STABLE_DIFFUSION, preset, with_overrides


def test_an_override_replaces_the_presets_model_of_its_family():
    models = with_overrides(preset("tiny"), ("blip2=/models/my-blip2/",))
    by_family = {m.family: m for m in models}
    assert (by_family[BLIP2].name, by_family[BLIP2].source) == ("my-blip2", "/models/my-blip2/")
    assert by_family[STABLE_DIFFUSION] == preset("tiny")[1]


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
            caption = old.caption(image, max_new_tokens=12)
            assert caption.info.model == "tiny-blip2-legacy"
            expected = new.caption(image, max_new_tokens=12).captions[0].text
            assert caption.captions[0].text == expected
            answer = old.ask(image, "what is it?", max_new_tokens=6).answers[0].text
            assert answer == new.ask(image, "what is it?", max_new_tokens=6).answers[0].text
    finally:
        assert legacy.stop() == 0
