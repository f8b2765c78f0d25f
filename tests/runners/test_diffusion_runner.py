"""StableDiffusionRunner against the tiny checkpoint, in-process."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from job_builders import image_job
from PIL import Image

from imago.workers.checkpoints import diffusion as tiny_sd
from imago.workers.contract.jobs import CaptionJob, TextSettings, TextToImageJob
from imago.workers.contract.protocol import ImageMeta, ImageResult, Preview, Progress
from imago.workers.families.diffusion.runner import StableDiffusionRunner
from imago.workers.runtime.runner import Event, Request


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd") / "checkpoint"
    tiny_sd.build(path)
    return path


@pytest.fixture(scope="session")
def runner(checkpoint: Path) -> StableDiffusionRunner:
    return StableDiffusionRunner.load("sd-tiny", str(checkpoint), "cpu")


@dataclass
class RecordingSink:
    """Records every event as (kind, values): the message's tag and fields,
    with its frames as ``data`` (a preview) or paired with ``images`` (a
    result); reports a cancel once ``cancel_after`` steps ran, for every
    request or only for those in ``cancel_ids``."""

    cancel_after: int | None = None
    cancel_ids: set[str] | None = None
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def emit(self, event: Event, frames: Sequence[bytes] = ()) -> None:
        values = msgspec.structs.asdict(event)
        if isinstance(event, Progress):
            values.update(total=event.total_steps, elapsed=event.elapsed_seconds)
        elif isinstance(event, Preview):
            (values["data"],) = frames
        elif isinstance(event, ImageResult):
            images = list(zip(event.images, frames, strict=True))
            values.update(images=images, seconds=event.inference_seconds)
        self.events.append((event.__struct_config__.tag, values))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [values for name, values in self.events if name == kind]

    def is_cancelled(self, request_id: str) -> bool:
        if self.cancel_ids is not None and request_id not in self.cancel_ids:
            return False
        steps = [p["step"] for p in self.of("progress") if p["request_id"] == request_id]
        return self.cancel_after is not None and max(steps, default=0) >= self.cancel_after


def make_job(**changes: Any) -> TextToImageJob:
    """A small text-to-image job; ``changes`` as job_builders.image_job takes them."""
    values = dict(
        prompt="a photo of a cat sitting on a red chair",
        negative_prompt="",
        width=64,
        height=64,
        steps=4,
        guidance_scale=7.5,
        seed=1234,
        num_images=1,
        output_format="PNG",
        preview_every=0,
        preview_format="PNG",
        preview_max_size=512,
    )
    return image_job(**{**values, **changes})


def generate(runner: StableDiffusionRunner, sink: RecordingSink | None = None, **changes: Any):
    """Run one request; returns (sink, [(meta, bytes)...] or None)."""
    sink = sink or RecordingSink()
    runner.run([Request("r1", make_job(**changes))], sink)
    results = sink.of("image_result")
    return sink, (results[0]["images"] if results else None)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def events_of(sink: RecordingSink, request_id: str) -> list[str]:
    return [name for name, values in sink.events if values["request_id"] == request_id]


def run_alone(runner: StableDiffusionRunner, job: TextToImageJob) -> list[tuple[ImageMeta, bytes]]:
    sink = RecordingSink()
    runner.run([Request("alone", job)], sink)
    (result,) = sink.of("image_result")
    return result["images"]


def assert_same_images(got: list[tuple[ImageMeta, bytes]], expected: list[tuple[ImageMeta, bytes]]):
    """Same metadata and pixels within 1/255: batching may change float rounding."""
    assert [meta for meta, _ in got] == [meta for meta, _ in expected]
    for (_, data), (_, wanted) in zip(got, expected, strict=True):
        assert np.abs(pixels(data) - pixels(wanted)).max() <= 1


@pytest.fixture
def pipeline_calls(runner: StableDiffusionRunner, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts pipeline calls; each entry is the number of prompts of one call."""
    calls: list[int] = []
    # Dunder lookup goes through the type, so the class attribute is patched.
    pipeline_type = type(runner.pipe)
    call = pipeline_type.__call__

    def counting(pipe: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(kwargs["prompt"]))
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(pipeline_type, "__call__", counting)
    return calls


def mixed_batch(**changes: Any) -> dict[str, TextToImageJob]:
    """Three compatible requests; the first has two images, so the others sit
    at rows 2 and 3 of a shared call."""
    return {
        "a": make_job(prompt="a red house", seed=10, num_images=2, **changes),
        "b": make_job(prompt="a blue boat", negative_prompt="blurry", seed=20, **changes),
        "c": make_job(prompt="a green tree", seed=30, output_format="WEBP", **changes),
    }


def test_build_is_deterministic(checkpoint: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    tiny_sd.build(again)
    files = sorted(p.relative_to(checkpoint) for p in checkpoint.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (checkpoint / name).read_bytes() == (again / name).read_bytes(), name


def test_info_reports_native_size_and_prompt_limit(runner: StableDiffusionRunner) -> None:
    info = runner.info()
    assert (info.name, info.family) == ("sd-tiny", "stable-diffusion")
    assert info.default_size == 64
    assert info.max_prompt_tokens == 77


def test_unloadable_source_names_the_source(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=str(tmp_path)):
        StableDiffusionRunner.load("broken", str(tmp_path), "cpu")


def test_image_equals_direct_pipeline_call(runner: StableDiffusionRunner, checkpoint: Path) -> None:
    settings = dict(width=64, height=48, steps=5, guidance_scale=6.0, seed=77, num_images=2)
    # Previews on, to show that reading x0 leaves the result alone.
    _, images = generate(runner, negative_prompt="blurry", preview_every=2, **settings)

    pipe = StableDiffusionPipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(
        prompt=make_job().prompt,
        negative_prompt="blurry",
        width=64,
        height=48,
        num_inference_steps=5,
        guidance_scale=6.0,
        num_images_per_prompt=2,
        generator=[torch.Generator("cpu").manual_seed(77 + i) for i in range(2)],
    ).images
    for (_, data), expected in zip(images, direct, strict=True):
        difference = np.abs(pixels(data) - np.asarray(expected, dtype=np.int16))
        assert difference.max() <= 1


def test_progress_is_reported_for_every_step(runner: StableDiffusionRunner) -> None:
    sink, _ = generate(runner, steps=6)
    assert sink.of("started") == [{"request_id": "r1", "total_steps": 6}]
    progress = sink.of("progress")
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5, 6]
    assert all(p["total"] == 6 for p in progress)
    elapsed = [p["elapsed"] for p in progress]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0


def test_previews_come_every_n_steps_for_image_zero(runner: StableDiffusionRunner) -> None:
    sink, _ = generate(runner, steps=6, preview_every=2, num_images=2)
    previews = sink.of("preview")
    assert [p["step"] for p in previews] == [2, 4, 6]
    assert {p["image_index"] for p in previews} == {0}


def test_no_previews_when_preview_every_is_zero(runner: StableDiffusionRunner) -> None:
    sink, _ = generate(runner, steps=3, preview_every=0)
    assert sink.of("preview") == []


def test_preview_is_capped_and_in_the_asked_format(runner: StableDiffusionRunner) -> None:
    # A 128x96 output capped at 64 px on its longest side gives a 64x48 preview.
    sink, _ = generate(
        runner, width=128, height=96, steps=2, preview_every=1, preview_format="WEBP",
        preview_max_size=64,
    )  # fmt: skip
    preview = sink.of("preview")[0]
    image = Image.open(io.BytesIO(preview["data"]))
    assert (preview["mime_type"], image.format) == ("image/webp", "WEBP")
    assert (preview["width"], preview["height"]) == image.size == (64, 48)


def test_preview_has_the_output_size_when_under_the_cap(runner: StableDiffusionRunner) -> None:
    sink, _ = generate(runner, width=128, height=96, steps=1, preview_every=1)
    preview = sink.of("preview")[0]
    assert (preview["width"], preview["height"]) == (128, 96)
    assert Image.open(io.BytesIO(preview["data"])).format == "PNG"


def test_images_use_seed_plus_index_and_differ(runner: StableDiffusionRunner) -> None:
    _, images = generate(runner, seed=500, num_images=3)
    assert [meta.seed for meta, _ in images] == [500, 501, 502]
    arrays = [pixels(data) for _, data in images]
    assert not np.array_equal(arrays[0], arrays[1])
    assert not np.array_equal(arrays[1], arrays[2])


def test_image_i_equals_a_single_image_run_with_seed_plus_i(
    runner: StableDiffusionRunner,
) -> None:
    _, pair = generate(runner, seed=900, num_images=2)
    _, single = generate(runner, seed=901, num_images=1)
    assert np.abs(pixels(pair[1][1]) - pixels(single[0][1])).max() <= 1


def test_same_seed_twice_gives_identical_bytes(runner: StableDiffusionRunner) -> None:
    _, first = generate(runner, seed=42)
    _, second = generate(runner, seed=42)
    assert first[0][1] == second[0][1]


def test_result_metadata_describes_the_png(runner: StableDiffusionRunner) -> None:
    sink, images = generate(runner, width=96, height=64)
    meta, data = images[0]
    assert meta == ImageMeta(seed=1234, mime_type="image/png", width=96, height=64)
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size) == ("PNG", (96, 64))
    assert sink.of("image_result")[0]["warnings"] == []
    assert sink.of("image_result")[0]["seconds"] > 0


@pytest.mark.parametrize(("fmt", "mime"), [("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_lossy_output_formats(runner: StableDiffusionRunner, fmt: str, mime: str) -> None:
    _, images = generate(runner, steps=2, output_format=fmt)
    meta, data = images[0]
    assert meta.mime_type == mime
    assert Image.open(io.BytesIO(data)).format == fmt


def test_cancelled_request_stops_early_without_decoding(
    runner: StableDiffusionRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = []
    decode = runner.pipe.vae.decode
    monkeypatch.setattr(
        runner.pipe.vae, "decode", lambda *a, **k: decodes.append(1) or decode(*a, **k)
    )
    sink, images = generate(runner, RecordingSink(cancel_after=2), steps=10)
    assert images is None
    assert [f["code"] for f in sink.of("failed")] == ["CANCELLED"]
    assert max(p["step"] for p in sink.of("progress")) == 2
    assert decodes == []
    generate(runner, steps=1)
    assert decodes == [1]  # the spy does see decodes that happen


def test_request_cancelled_before_it_starts_never_starts(runner: StableDiffusionRunner) -> None:
    sink, _ = generate(runner, RecordingSink(cancel_after=0))
    assert [name for name, _ in sink.events] == ["failed"]
    assert sink.of("failed")[0]["code"] == "CANCELLED"


def test_cancel_ends_one_request_and_the_next_still_runs(runner: StableDiffusionRunner) -> None:
    sink = RecordingSink()
    sink.is_cancelled = lambda request_id: request_id == "gone"  # type: ignore[method-assign]
    runner.run([Request("gone", make_job()), Request("kept", make_job())], sink)
    assert [f["request_id"] for f in sink.of("failed")] == ["gone"]
    assert [r["request_id"] for r in sink.of("image_result")] == ["kept"]


def test_long_prompt_warning_names_the_dropped_words(runner: StableDiffusionRunner) -> None:
    # The start token, 75 one-token words and the end token fit; the rest does not.
    prompt = " ".join(["cat"] * 75 + ["blue", "castle"])
    sink, images = generate(runner, prompt=prompt, steps=1)
    assert images is not None
    (warning,) = sink.of("image_result")[0]["warnings"]
    assert warning.startswith("prompt ") and "'blue castle'" in warning


def test_long_negative_prompt_is_warned_about_too(runner: StableDiffusionRunner) -> None:
    negative = " ".join(["blurry"] * 75 + ["watermark"])
    sink, _ = generate(runner, negative_prompt=negative, steps=1)
    (warning,) = sink.of("image_result")[0]["warnings"]
    assert warning.startswith("negative_prompt ") and "'watermark'" in warning


def test_other_job_types_are_refused(runner: StableDiffusionRunner) -> None:
    settings = TextSettings(20, 0, 1, False, 1.0, 1.0, 0, 1.0, 1, 1.0, 0)
    sink = RecordingSink()
    runner.run([Request("r1", CaptionJob(prefix="", settings=settings))], sink)
    assert [f["code"] for f in sink.of("failed")] == ["INVALID_ARGUMENT"]


def test_the_shared_scheduler_is_left_untouched(runner: StableDiffusionRunner) -> None:
    before = runner.pipe.scheduler
    generate(runner, steps=2, preview_every=1)
    assert runner.pipe.scheduler is before
    assert "step" not in vars(before)


def test_compatible_requests_share_one_pipeline_call(
    runner: StableDiffusionRunner, pipeline_calls: list[int]
) -> None:
    jobs = {
        "a": make_job(prompt="a red house", seed=10, num_images=1),
        "b": make_job(prompt="a blue boat", negative_prompt="blurry", seed=20, num_images=2),
        "c": make_job(prompt="a green tree", seed=30, num_images=1),
    }
    sink = RecordingSink()
    runner.run([Request(rid, job) for rid, job in jobs.items()], sink)
    assert pipeline_calls == [4]
    results = {r["request_id"]: r for r in sink.of("image_result")}
    assert list(results) == ["a", "b", "c"]
    assert [meta.seed for meta, _ in results["b"]["images"]] == [20, 21]
    assert len({r["seconds"] for r in results.values()}) == 1  # the group's wall time
    for rid, job in jobs.items():
        assert_same_images(results[rid]["images"], run_alone(runner, job))


def test_each_member_has_its_own_events_and_previews(runner: StableDiffusionRunner) -> None:
    jobs = mixed_batch(steps=4)
    previews_a = msgspec.structs.replace(jobs["a"].preview, every=2, format="WEBP")
    jobs["a"] = msgspec.structs.replace(jobs["a"], preview=previews_a)
    previews_b = msgspec.structs.replace(jobs["b"].preview, every=1)
    jobs["b"] = msgspec.structs.replace(jobs["b"], preview=previews_b)
    sink = RecordingSink()
    runner.run([Request(rid, job) for rid, job in jobs.items()], sink)

    assert sink.of("started") == [{"request_id": rid, "total_steps": 4} for rid in jobs]
    previews: dict[str, list[dict[str, Any]]] = {}
    for rid in jobs:
        progress = [p for p in sink.of("progress") if p["request_id"] == rid]
        assert [(p["step"], p["total"]) for p in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
        previews[rid] = [p for p in sink.of("preview") if p["request_id"] == rid]
        assert events_of(sink, rid)[-1] == "image_result"
    assert [p["step"] for p in previews["a"]] == [2, 4]
    assert [p["step"] for p in previews["b"]] == [1, 2, 3, 4]
    assert previews["c"] == []
    assert {p["mime_type"] for p in previews["a"]} == {"image/webp"}
    assert {p["mime_type"] for p in previews["b"]} == {"image/png"}
    assert all(p["image_index"] == 0 for p in previews["a"] + previews["b"])
    # Each stream shows its own image 0: b's is not a's, and it is what b alone shows.
    assert np.abs(pixels(previews["a"][-1]["data"]) - pixels(previews["b"][-1]["data"])).max() > 8
    alone = RecordingSink()
    runner.run([Request("b", jobs["b"])], alone)
    for got, expected in zip(previews["b"], alone.of("preview"), strict=True):
        assert np.abs(pixels(got["data"]) - pixels(expected["data"])).max() <= 1


def test_member_cancelled_mid_run_ends_alone(
    runner: StableDiffusionRunner, pipeline_calls: list[int]
) -> None:
    jobs = mixed_batch(steps=5, preview_every=1)
    sink = RecordingSink(cancel_after=2, cancel_ids={"b"})
    runner.run([Request(rid, job) for rid, job in jobs.items()], sink)
    assert pipeline_calls == [4]

    assert [(f["request_id"], f["code"]) for f in sink.of("failed")] == [("b", "CANCELLED")]
    assert events_of(sink, "b")[-1] == "failed"  # nothing after its failure
    assert max(p["step"] for p in sink.of("progress") if p["request_id"] == "b") == 2
    results = {r["request_id"]: r["images"] for r in sink.of("image_result")}
    assert list(results) == ["a", "c"]
    for rid in results:
        steps = [p["step"] for p in sink.of("progress") if p["request_id"] == rid]
        assert steps == [1, 2, 3, 4, 5]
        assert_same_images(results[rid], run_alone(runner, jobs[rid]))


def test_whole_group_cancelled_stops_before_decoding(
    runner: StableDiffusionRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = []
    decode = runner.pipe.vae.decode
    monkeypatch.setattr(
        runner.pipe.vae, "decode", lambda *a, **k: decodes.append(1) or decode(*a, **k)
    )
    jobs = mixed_batch(steps=10)
    sink = RecordingSink(cancel_after=2)
    runner.run([Request(rid, job) for rid, job in jobs.items()], sink)
    assert decodes == []
    assert sink.of("image_result") == []
    assert [(f["request_id"], f["code"]) for f in sink.of("failed")] == [
        (rid, "CANCELLED") for rid in jobs
    ]
    assert max(p["step"] for p in sink.of("progress")) == 2


def test_incompatible_requests_run_in_separate_calls(
    runner: StableDiffusionRunner, pipeline_calls: list[int]
) -> None:
    settings = TextSettings(20, 0, 1, False, 1.0, 1.0, 0, 1.0, 1, 1.0, 0)
    batch = [
        Request("wide", make_job(width=64, height=32, steps=2)),
        Request("caption", CaptionJob(prefix="", settings=settings)),
        Request("tall", make_job(width=32, height=48, steps=3, num_images=2)),
        Request("wide2", make_job(width=64, height=32, steps=2, seed=5)),
    ]
    sink = RecordingSink()
    runner.run(batch, sink)
    assert pipeline_calls == [2, 2]
    assert [(f["request_id"], f["code"]) for f in sink.of("failed")] == [
        ("caption", "INVALID_ARGUMENT")
    ]
    results = {r["request_id"]: r["images"] for r in sink.of("image_result")}
    assert sorted(results) == ["tall", "wide", "wide2"]
    for request in batch:
        if request.request_id in results:
            job = request.job
            sizes = [(meta.width, meta.height) for meta, _ in results[request.request_id]]
            assert sizes == [(job.params.width, job.params.height)] * job.num_images
    totals = {s["request_id"]: s["total_steps"] for s in sink.of("started")}
    assert totals == {"wide": 2, "tall": 3, "wide2": 2}


def test_a_failing_call_fails_every_unfinished_member(
    runner: StableDiffusionRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(runner.pipe.vae, "decode", broken)
    jobs = mixed_batch(steps=2)
    sink = RecordingSink(cancel_after=0, cancel_ids={"c"})
    runner.run([Request(rid, job) for rid, job in jobs.items()], sink)
    failures = [(f["request_id"], f["code"]) for f in sink.of("failed")]
    assert failures == [("c", "CANCELLED"), ("a", "INTERNAL"), ("b", "INTERNAL")]
    assert "decoder exploded" in sink.of("failed")[1]["message"]


def test_an_inpaint_checkpoint_must_take_nine_channels(tmp_path):
    from imago.workers.checkpoints import tiny

    base = tiny.ensure("stable-diffusion", tmp_path)
    with pytest.raises(ValueError, match="not an inpainting checkpoint"):
        StableDiffusionRunner.load("sd", str(base), "cpu", inpaint=str(base))


def test_unknown_extra_sources_are_refused(tmp_path):
    from imago.workers.checkpoints import tiny

    base = tiny.ensure("stable-diffusion", tmp_path)
    with pytest.raises(ValueError, match="refiner"):
        StableDiffusionRunner.load("sd", str(base), "cpu", refiner=str(base))
