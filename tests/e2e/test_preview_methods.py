"""Preview methods and which images are previewed, through a real server."""

from __future__ import annotations

import io

import grpc
import pytest
from conftest import start_server
from PIL import Image

from imago.client import DiffusionOptions, PreviewOptions
from imago.client.api import ImagoClient


@pytest.fixture(scope="module")
def client(server):
    with ImagoClient(server.target, timeout=120) as imago:
        yield imago


def previews(
    client: ImagoClient, method: str = "latent_rgb", num_images: int = 1, all_images: bool = False
) -> list:
    events = []
    client.generate_result(
        "a fox",
        diffusion=DiffusionOptions(steps=3, seed=9, width=96, height=64, num_images=num_images),
        previews=PreviewOptions(
            every_n_steps=1, format="png", method=method, all_images=all_images
        ),
        on_event=events.append,
    )
    return [event.preview for event in events if event.HasField("preview")]


@pytest.mark.parametrize("method", ["latent_rgb", "taesd", "full"])
def test_every_method_previews_each_step_at_the_outputs_shape(client, method):
    shown = previews(client, method=method)
    assert [p.step for p in shown] == [1, 2, 3]
    for preview in shown:
        image = Image.open(io.BytesIO(preview.image.data))
        assert image.size == (96, 64) == (preview.image.width, preview.image.height)


def test_methods_draw_different_pictures(client):
    last = {m: previews(client, method=m)[-1].image.data for m in ("latent_rgb", "taesd")}
    last["full"] = previews(client, method="full")[-1].image.data
    assert len(set(last.values())) == 3


def test_the_last_full_preview_is_the_final_image(client):
    events = []
    result = client.generate_result(
        "a fox",
        diffusion=DiffusionOptions(steps=3, seed=9, width=96, height=64),
        previews=PreviewOptions(every_n_steps=1, format="png", method="full"),
        on_event=events.append,
    )
    last = [e.preview for e in events if e.HasField("preview")][-1]
    final = Image.open(io.BytesIO(result.images[0].image.data)).convert("RGB")
    shown = Image.open(io.BytesIO(last.image.data)).convert("RGB")
    assert max(abs(a - b) for a, b in zip(shown.tobytes(), final.tobytes(), strict=True)) <= 1


def test_only_the_first_image_is_previewed_unless_all_are_asked_for(client):
    first_only = previews(client, num_images=2)
    assert {p.image_index for p in first_only} == {0}
    every = previews(client, num_images=2, all_images=True)
    assert sorted(p.image_index for p in every) == [0, 0, 0, 1, 1, 1]


def test_taesd_without_a_tiny_autoencoder_fails_its_precondition(model_cache, tmp_path):
    server = start_server(model_cache, tmp_path, "--workers", "1", "--model", "taesd=")
    try:
        with ImagoClient(server.target, timeout=60) as client:
            with pytest.raises(grpc.RpcError) as caught:
                previews(client, method="taesd")
            assert previews(client, method="full")
    finally:
        assert server.stop() == 0
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "previews.method" in caught.value.details()
