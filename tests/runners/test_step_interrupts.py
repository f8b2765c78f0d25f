"""Cancellation checks inside a denoising step: forward pre-hooks on the coarse
blocks of the UNet and the VAE decoder ask the sink about every live request
while a group call runs, so that a call whose steps take minutes stops within
a block and the worker's heartbeats go on. StableDiffusionRunner in-process on
the tiny checkpoints."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from conftest import gradient, png
from PIL import Image
from test_diffusion_runner import RecordingSink, assert_same_images, make_job, run_alone

from imago.workers.checkpoints import tiny
from imago.workers.contract.jobs import InpaintJob
from imago.workers.families.diffusion.runner import StableDiffusionRunner
from imago.workers.families.diffusion.steps import interrupt_points
from imago.workers.runtime.runner import Request


@pytest.fixture(scope="module")
def runner(model_cache: Path) -> StableDiffusionRunner:
    return StableDiffusionRunner.load(
        "sd-tiny", str(tiny.ensure("stable-diffusion", model_cache)), "cpu"
    )


@pytest.fixture(scope="module")
def inpaint_runner(model_cache: Path) -> StableDiffusionRunner:
    base = tiny.ensure("stable-diffusion", model_cache)
    dedicated = tiny.ensure("stable-diffusion-inpaint", model_cache)
    return StableDiffusionRunner.load("sd-tiny", str(base), "cpu", inpaint=str(dedicated))


@dataclass
class Asked:
    """One is_cancelled call: for whom, after how many of its steps were
    reported, and how many pre-hooks sat on the watched blocks then."""

    request_id: str
    steps_done: int
    hooks: int


@dataclass
class CountingSink(RecordingSink):
    """Records every is_cancelled call. ``cancel_when[rid] = (steps, n)``
    reports ``rid`` cancelled from its n-th call (counting from 1) made once
    ``steps`` of its steps were reported, that is while step ``steps + 1``
    (or the decode after the last step) runs; the pre-start check counts as
    made after 0 steps."""

    cancel_when: dict[str, tuple[int, int]] = field(default_factory=dict)
    watched: list[torch.nn.Module] = field(default_factory=list)
    asked: list[Asked] = field(default_factory=list)

    def steps_done(self, request_id: str) -> int:
        return sum(1 for p in self.of("progress") if p["request_id"] == request_id)

    def is_cancelled(self, request_id: str) -> bool:
        done = self.steps_done(request_id)
        hooks = sum(len(block._forward_pre_hooks) for block in self.watched)
        self.asked.append(Asked(request_id, done, hooks))
        if request_id in self.cancel_when:
            steps, n = self.cancel_when[request_id]
            if done == steps and self.calls(request_id, done) >= n:
                return True
        return super().is_cancelled(request_id)

    def calls(self, request_id: str, steps_done: int) -> int:
        return sum(
            1 for a in self.asked if (a.request_id, a.steps_done) == (request_id, steps_done)
        )


def blocks(runner: StableDiffusionRunner, pipe: Any = None) -> list[torch.nn.Module]:
    """Every block that may carry an interrupt hook in ``pipe`` (the runner's own by default)."""
    pipe = pipe or runner.pipe
    return interrupt_points(pipe.unet, pipe.vae)


def unet_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def no_hooks_left(modules: list[torch.nn.Module]) -> bool:
    return all(not module._forward_pre_hooks for module in modules)


def test_a_cancel_inside_the_first_step_stops_the_call_within_it(
    runner: StableDiffusionRunner,
) -> None:
    completed = []  # whole UNet calls that got to the end
    handle = runner.pipe.unet.register_forward_hook(lambda *_: completed.append(1))
    try:
        # Call 1 is the check before the call starts; 2 and 3 come from the
        # first two UNet blocks of step 1.
        sink = CountingSink(cancel_when={"r1": (0, 3)})
        runner.run([Request("r1", make_job(steps=4))], sink)
    finally:
        handle.remove()
    assert sink.of("progress") == []  # the step callback never ran
    assert sink.of("image_result") == []
    (failure,) = sink.of("failed")
    assert (failure["request_id"], failure["code"]) == ("r1", "CANCELLED")
    assert failure["message"] == "cancelled after 0 of 4 steps"
    assert len(sink.asked) == 3  # nothing was asked after the cancel was seen
    assert completed == []  # the UNet stopped between its blocks


def test_every_step_and_the_decode_ask_about_cancellation(runner: StableDiffusionRunner) -> None:
    sink = CountingSink()
    runner.run([Request("r1", make_job(steps=3))], sink)
    assert len(sink.of("image_result")) == 1
    per_step = Counter(a.steps_done for a in sink.asked[1:])  # after the pre-start check
    # Each UNet block of each model call asks, then the step callback: far more
    # than once a step, so a worker inside a long step still sends heartbeats.
    blocks_per_call = len(unet_blocks(runner.pipe.unet))
    for step in range(3):
        assert per_step[step] > blocks_per_call, per_step
    # The VAE decoder's blocks ask too, after the last step.
    assert per_step[3] >= 1, per_step


def test_a_member_cancelled_inside_a_step_ends_and_the_other_is_unchanged(
    runner: StableDiffusionRunner,
) -> None:
    jobs = {
        "a": make_job(prompt="a red house", seed=10),
        "b": make_job(prompt="a blue boat", seed=20),
    }
    requests = [Request(rid, job) for rid, job in jobs.items()]
    # b's second check of step 2 comes from a UNet block, before the step ends.
    sink = CountingSink(cancel_when={"b": (1, 2)})
    runner.run(requests, sink)

    (failure,) = sink.of("failed")
    assert (failure["request_id"], failure["code"]) == ("b", "CANCELLED")
    assert failure["message"] == "cancelled after 1 of 4 steps"
    assert [p["step"] for p in sink.of("progress") if p["request_id"] == "b"] == [1]
    events = [name for name, values in sink.events if values["request_id"] == "b"]
    assert events[-1] == "failed"
    assert sink.calls("b", 1) == 2  # b was not asked about again
    assert [p["step"] for p in sink.of("progress") if p["request_id"] == "a"] == [1, 2, 3, 4]
    (result,) = sink.of("image_result")
    assert result["request_id"] == "a"
    # a is what the same call gives with nobody cancelled (b's rows were still
    # computed), byte for byte, and what a solo run with its seed gives.
    uncancelled = RecordingSink()
    runner.run(requests, uncancelled)
    kept = next(r for r in uncancelled.of("image_result") if r["request_id"] == "a")
    assert result["images"] == kept["images"]
    assert_same_images(result["images"], run_alone(runner, jobs["a"]))


def _break_decode(runner: StableDiffusionRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(runner.pipe.vae, "decode", broken)


@pytest.mark.parametrize("ending", ["result", "one cancelled", "all cancelled", "error"])
def test_no_hooks_are_left_after_a_call(
    runner: StableDiffusionRunner, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    watched = blocks(runner)
    cancel_when = {
        "result": {},
        "one cancelled": {"b": (1, 2)},
        "all cancelled": {"a": (1, 2), "b": (1, 2)},
        "error": {},
    }[ending]
    if ending == "error":
        _break_decode(runner, monkeypatch)
    sink = CountingSink(cancel_when=cancel_when, watched=watched)
    runner.run([Request("a", make_job(seed=1)), Request("b", make_job(seed=2))], sink)

    outcomes = {r["request_id"]: "result" for r in sink.of("image_result")}
    outcomes |= {f["request_id"]: f["code"] for f in sink.of("failed")}
    assert (
        outcomes
        == {
            "result": {"a": "result", "b": "result"},
            "one cancelled": {"a": "result", "b": "CANCELLED"},
            "all cancelled": {"a": "CANCELLED", "b": "CANCELLED"},
            "error": {"a": "INTERNAL", "b": "INTERNAL"},
        }[ending]
    )
    # Hooks sat on the UNet's blocks while the call ran (every UNet block has
    # one when a hook asks), and none is left on any block now.
    assert max(a.hooks for a in sink.asked) >= len(unet_blocks(runner.pipe.unet))
    assert no_hooks_left(watched)
    assert no_hooks_left([runner.pipe.unet, runner.pipe.vae, runner.pipe.vae.decoder])


def test_the_dedicated_inpainting_unet_is_the_one_hooked(
    inpaint_runner: StableDiffusionRunner,
) -> None:
    job = InpaintJob(**msgspec.structs.asdict(make_job(steps=3)), strength=1.0)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    request = Request("r1", job, [png(gradient(64, 64)), png(mask.convert("RGB"))])
    dedicated = unet_blocks(inpaint_runner.inpaint.unet)
    assert inpaint_runner.inpaint.unet is not inpaint_runner.pipe.unet
    sink = CountingSink(watched=dedicated)
    inpaint_runner.run([request], sink)
    assert len(sink.of("image_result")) == 1, sink.of("failed")
    inside = [a for a in sink.asked if a.hooks]
    assert {a.hooks for a in inside} == {len(dedicated)}
    assert Counter(a.steps_done for a in inside)[0] >= len(dedicated)
    assert no_hooks_left(dedicated + unet_blocks(inpaint_runner.pipe.unet))

    # Cancelled inside its first step, it stops there too.
    sink = CountingSink(cancel_when={"r1": (0, 3)}, watched=dedicated)
    inpaint_runner.run([request], sink)
    assert sink.of("progress") == []
    assert [f["code"] for f in sink.of("failed")] == ["CANCELLED"]
    assert no_hooks_left(dedicated)


def test_a_compiled_model_gets_no_hooks_and_the_same_images(
    runner: StableDiffusionRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(steps=3, seed=99, num_images=2)
    hooked = CountingSink()
    runner.run([Request("r1", job)], hooked)
    # As load leaves it after compile_pipeline; the hooks go by this flag alone,
    # so the model itself need not be compiled here.
    monkeypatch.setattr(runner, "compiled", True)
    plain = CountingSink(watched=blocks(runner))
    runner.run([Request("r1", job)], plain)
    # Checked from the step callback only: once per model call (PNDM's first
    # step makes two), and never with a hook on a block.
    assert all(a.hooks == 0 for a in plain.asked)
    per_step = Counter(a.steps_done for a in plain.asked[1:])
    assert per_step == {0: 2, 1: 1, 2: 1}
    # The hooks only read: the images are the same bytes with and without them.
    (with_hooks,) = hooked.of("image_result")
    (without,) = plain.of("image_result")
    assert with_hooks["images"] == without["images"]


@pytest.mark.parametrize("whom", ["itself", "the next member"])
def test_a_cancel_seen_while_a_full_preview_is_decoded_ends_the_events(
    runner: StableDiffusionRunner, whom: str
) -> None:
    # a's full previews go through the VAE decoder, whose blocks check too.
    a = make_job(prompt="a red house", seed=10, preview_every=1, preview_method="full")
    b = make_job(prompt="a blue boat", seed=20)
    sink = CountingSink()
    if whom == "itself":
        # a's first check once 2 of its steps were reported is in its preview's decode.
        sink.cancel_when = {"a": (2, 1)}
        gone, kept = "a", "b"
    else:
        asked = sink.is_cancelled

        def is_cancelled(request_id: str) -> bool:
            # Only between a's progress of step 2 and b's, during a's preview.
            ahead = sink.steps_done("a") == 2 and sink.steps_done("b") == 1
            return asked(request_id) or (request_id == "b" and ahead)

        sink.is_cancelled = is_cancelled  # type: ignore[method-assign]
        gone, kept = "b", "a"
    runner.run([Request("a", a), Request("b", b)], sink)

    (failure,) = sink.of("failed")
    assert (failure["request_id"], failure["code"]) == (gone, "CANCELLED")
    events = [name for name, values in sink.events if values["request_id"] == gone]
    assert events[-1] == "failed"  # no progress or preview after its failure
    assert [p["step"] for p in sink.of("preview") if p["request_id"] == "a"][:1] == [1]
    # Seen inside step 2's callback, right after a's progress of step 2 (at the
    # end of step 3 would be after b's progress of step 2).
    where = [(name, values["request_id"], values.get("step")) for name, values in sink.events]
    after = where.index(("progress", "a", 2))
    assert where[after + 1] == ("failed", gone, None)
    assert [r["request_id"] for r in sink.of("image_result")] == [kept]
    steps = [p["step"] for p in sink.of("progress") if p["request_id"] == kept]
    assert steps == [1, 2, 3, 4]
