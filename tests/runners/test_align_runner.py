"""Blip2AlignRunner against the tiny retrieval checkpoints, compared with transformers."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection,
)

from imago.workers.checkpoints import tiny
from imago.workers.contract.jobs import (
    CaptionJob,
    EmbedImagesJob,
    EmbedTextsJob,
    MatchJob,
    TextSettings,
)
from imago.workers.contract.protocol import ArraysResult, Failed
from imago.workers.families.align import runner as alignment
from imago.workers.families.align.runner import Blip2AlignRunner
from imago.workers.runtime.runner import Event, Request

TEXTS = ("a red bus driving down a city street", "a cat sleeping", "two dogs on the grass")
ATOL = 1e-5


class FakeSink:
    """Records what a runner reports; cancels requests after a number of polls."""

    def __init__(self, cancel_after: dict[str, int] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.arrays: dict[str, dict[str, np.ndarray]] = {}
        self.failures: dict[str, tuple[str, str, str]] = {}
        self.cancel_after = cancel_after or {}
        self.polls: dict[str, int] = {}

    def emit(self, event: Event, frames: Sequence[bytes] = ()) -> None:
        self.calls.append((event.__struct_config__.tag, event.request_id))
        if isinstance(event, ArraysResult):
            assert event.inference_seconds >= 0
            self.arrays[event.request_id] = {
                meta.name: np.frombuffer(data, dtype="<f4").reshape(meta.shape)
                for meta, data in zip(event.arrays, frames, strict=True)
            }
        elif isinstance(event, Failed):
            self.failures[event.request_id] = (event.code, event.message, event.field)

    def is_cancelled(self, request_id: str) -> bool:
        self.polls[request_id] = self.polls.get(request_id, 0) + 1
        limit = self.cancel_after.get(request_id)
        return limit is not None and self.polls[request_id] > limit


def gradient(seed: int) -> Image.Image:
    """A smooth colour gradient whose direction and colours depend on ``seed``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:36, 0:44] / 44.0
    start, end = rng.integers(0, 256, (2, 3))
    weight = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1))[..., None]
    weight = (weight - weight.min()) / (np.ptp(weight) or 1.0)
    return Image.fromarray((start + (end - start) * weight).astype(np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = [gradient(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("align-checkpoints")


@pytest.fixture(scope="module")
def itm_dir(checkpoints) -> Path:
    return tiny.ensure("blip2-itm", checkpoints)


@pytest.fixture(scope="module")
def runner(itm_dir) -> Blip2AlignRunner:
    return Blip2AlignRunner.load("align-tiny", str(itm_dir), "cpu")


@pytest.fixture(scope="module")
def itc_runner(checkpoints) -> Blip2AlignRunner:
    return Blip2AlignRunner.load("align-itc", str(tiny.ensure("blip2-itc", checkpoints)), "cpu")


@pytest.fixture(scope="module")
def processor(itm_dir) -> Blip2Processor:
    return Blip2Processor.from_pretrained(itm_dir)


@pytest.fixture(scope="module")
def retrieval(itm_dir) -> Blip2ForImageTextRetrieval:
    return Blip2ForImageTextRetrieval.from_pretrained(itm_dir).eval()


def run_one(runner: Blip2AlignRunner, job, images: list[bytes] = ()) -> dict[str, np.ndarray]:
    sink = FakeSink()
    runner.run([Request("r", job, list(images))], sink)
    assert sink.calls == [("started", "r"), ("arrays_result", "r")], sink.failures
    return sink.arrays["r"]


def match(runner: Blip2AlignRunner, images, texts, itm: bool = True) -> dict[str, np.ndarray]:
    job = MatchJob(images=len(images), texts=tuple(texts), image_text_matching=itm)
    return run_one(runner, job, [png(image) for image in images])


def test_sample_images_have_different_embeddings(runner):
    embeddings = run_one(runner, EmbedImagesJob(images=3), [png(i) for i in IMAGES])
    embeddings = embeddings["image_embeddings"]
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(embeddings[a] - embeddings[b]).max() > 1e-2


def test_image_embeddings_equal_vision_model_with_projection(runner, itm_dir, processor):
    got = run_one(runner, EmbedImagesJob(images=3), [png(i) for i in IMAGES])["image_embeddings"]
    model = Blip2VisionModelWithProjection.from_pretrained(itm_dir).eval()
    pixels = processor(images=IMAGES, return_tensors="pt").pixel_values
    with torch.inference_mode():
        want = model(pixel_values=pixels).image_embeds.numpy()
    assert got.shape == want.shape == (3, 4, 16)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=ATOL)


def test_text_embeddings_equal_text_model_with_projection(runner, itm_dir, processor):
    got = run_one(runner, EmbedTextsJob(texts=TEXTS))["text_embeddings"]
    model = Blip2TextModelWithProjection.from_pretrained(itm_dir).eval()
    inputs = processor.tokenizer(
        list(TEXTS), padding=True, return_token_type_ids=False, return_tensors="pt"
    )
    with torch.inference_mode():
        want = model(**inputs).text_embeds[:, 0, :].numpy()
    assert got.shape == want.shape == (3, 16)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=ATOL)
    assert np.abs(got[0] - got[1]).max() > 1e-2


def test_similarities_equal_contrastive_logits(runner, processor, retrieval):
    got = match(runner, IMAGES[:2], TEXTS, itm=False)
    assert set(got) == {"similarities"}
    inputs = processor(images=IMAGES[:2], text=list(TEXTS), padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = retrieval(**inputs, use_image_text_matching_head=False).logits_per_image.numpy()
    assert got["similarities"].shape == want.shape == (2, 3)
    np.testing.assert_allclose(got["similarities"], want, atol=ATOL, rtol=0)


def test_match_probabilities_equal_itm_head_on_each_pair(runner, processor, retrieval):
    got = match(runner, IMAGES[:2], TEXTS)["match_probabilities"]
    pairs = [(image, text) for image in IMAGES[:2] for text in TEXTS]
    inputs = processor(
        images=[image for image, _ in pairs],
        text=[text for _, text in pairs],
        padding=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        logits = retrieval(**inputs, use_image_text_matching_head=True).logits_per_image
    want = logits.softmax(dim=-1)[:, 1].reshape(2, 3).numpy()
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert np.ptp(got) > 1e-3


def test_itm_chunks_change_nothing(runner, monkeypatch):
    whole = match(runner, IMAGES, TEXTS)
    monkeypatch.setattr(alignment, "ITM_CHUNK", 2)
    chunked = match(runner, IMAGES, TEXTS)
    np.testing.assert_allclose(
        chunked["match_probabilities"], whole["match_probabilities"], atol=1e-6, rtol=0
    )


def test_batched_requests_equal_each_run_alone(runner):
    requests = [
        Request("images", EmbedImagesJob(images=2), [png(IMAGES[2]), png(IMAGES[0])]),
        Request("texts", EmbedTextsJob(texts=TEXTS[1:])),
        Request(
            "match",
            MatchJob(images=2, texts=TEXTS, image_text_matching=True),
            [png(IMAGES[1]), png(IMAGES[2])],
        ),
        Request("short", MatchJob(images=1, texts=("a cat",)), [png(IMAGES[0])]),
    ]
    sink = FakeSink()
    runner.run(requests, sink)
    assert not sink.failures
    for request in requests:
        alone = run_one(runner, request.job, request.images)
        together = sink.arrays[request.request_id]
        assert together.keys() == alone.keys()
        for name, array in alone.items():
            np.testing.assert_allclose(together[name], array, atol=1e-6, rtol=0)


def test_undecodable_image_fails_only_its_request(runner):
    sink = FakeSink()
    bad = Request("bad", MatchJob(images=2, texts=TEXTS), [png(IMAGES[0]), b"not an image"])
    good = Request("good", EmbedImagesJob(images=1), [png(IMAGES[0])])
    runner.run([bad, good], sink)
    code, _, field = sink.failures["bad"]
    assert (code, field) == ("INVALID_ARGUMENT", "images[1].data")
    assert ("started", "bad") not in sink.calls
    assert sink.arrays["good"]["image_embeddings"].shape == (1, 4, 16)


def test_too_long_text_fails_with_its_field(runner):
    sink = FakeSink()
    runner.run([Request("r", EmbedTextsJob(texts=("a dog " * 40, "a cat")))], sink)
    code, message, field = sink.failures["r"]
    assert (code, field) == ("INVALID_ARGUMENT", "texts[0]")
    assert "82 tokens" in message and "32" in message


def test_cancelled_request_is_not_run(runner):
    sink = FakeSink(cancel_after={"r": 0})
    runner.run([Request("r", EmbedTextsJob(texts=TEXTS))], sink)
    assert sink.calls == [("failed", "r")]
    assert sink.failures["r"][0] == "CANCELLED"


def test_cancelling_between_itm_chunks_stops_the_request(runner, monkeypatch):
    monkeypatch.setattr(alignment, "ITM_CHUNK", 1)
    # One poll before the batch runs, one per chunk: cancelled at the second chunk.
    sink = FakeSink(cancel_after={"r": 2})
    job = MatchJob(images=2, texts=TEXTS, image_text_matching=True)
    runner.run([Request("r", job, [png(IMAGES[0]), png(IMAGES[1])])], sink)
    assert sink.calls == [("started", "r"), ("failed", "r")]
    assert sink.failures["r"][0] == "CANCELLED"
    assert sink.polls["r"] == 3


def test_other_jobs_are_invalid(runner):
    settings = TextSettings(10, 0, 1, False, 1.0, 1.0, 50, 1.0, 1, 1.0, 0)
    sink = FakeSink()
    runner.run([Request("r", CaptionJob(prefix="", settings=settings), [png(IMAGES[0])])], sink)
    assert sink.calls == [("failed", "r")]
    assert sink.failures["r"][0] == "INVALID_ARGUMENT"


def test_info_reports_matching_head(runner, itc_runner):
    assert runner.info().image_text_matching is True
    assert itc_runner.info().image_text_matching is False
    assert runner.info().family == "blip2-align"
    assert runner.info().max_prompt_tokens == 32


def test_matching_without_head_fails_precondition(itc_runner):
    sink = FakeSink()
    job = MatchJob(images=1, texts=TEXTS, image_text_matching=True)
    itc_runner.run([Request("r", job, [png(IMAGES[0])])], sink)
    code, _, field = sink.failures["r"]
    assert (code, field) == ("FAILED_PRECONDITION", "image_text_matching")


def test_checkpoint_without_head_still_gives_similarities(runner, itc_runner):
    got = match(itc_runner, IMAGES[:2], TEXTS, itm=False)["similarities"]
    want = match(runner, IMAGES[:2], TEXTS, itm=False)["similarities"]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_checkpoints_with_and_without_head_share_tokenizer_and_weights(checkpoints):
    with_head = tiny.ensure("blip2-itm", checkpoints)
    without = tiny.ensure("blip2-itc", checkpoints)
    assert (with_head / "tokenizer.json").read_bytes() == (without / "tokenizer.json").read_bytes()
    full = load_file(with_head / "model.safetensors")
    reduced = load_file(without / "model.safetensors")
    assert set(full) - set(reduced) == {"itm_head.weight", "itm_head.bias"}
    assert all(torch.equal(full[key], tensor) for key, tensor in reduced.items())


def test_captioning_checkpoint_is_refused(checkpoints):
    source = str(tiny.ensure("blip2", checkpoints))
    with pytest.raises(OSError, match="alignment"):
        Blip2AlignRunner.load("caption", source, "cpu")


def test_extra_sources_are_refused(itm_dir):
    with pytest.raises(ValueError, match="no extra sources"):
        Blip2AlignRunner.load("align", str(itm_dir), "cpu", vae="elsewhere")
