"""Blip2Runner against the tiny BLIP-2 checkpoints, compared with transformers."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from imago.workers.checkpoints import blip2 as tiny_blip2
from imago.workers.contract.jobs import CaptionJob, TextSettings, VqaJob
from imago.workers.contract.protocol import Failed, GeneratedText, TextResult
from imago.workers.families.blip2.runner import Blip2Runner, generate_kwargs
from imago.workers.runtime.runner import Event, Request


class FakeSink:
    """Records what a runner reports; cancels requests after a number of polls."""

    def __init__(self, cancel_after: dict[str, int] | None = None) -> None:
        self.calls: list[tuple] = []
        self.results: dict[str, list[GeneratedText]] = {}
        self.failures: dict[str, tuple[str, str]] = {}
        self.fields: dict[str, str] = {}
        self.cancel_after = cancel_after or {}
        self.polls: dict[str, int] = {}

    def emit(self, event: Event, frames: Sequence[bytes] = ()) -> None:
        self.calls.append((event.__struct_config__.tag, event.request_id))
        if isinstance(event, TextResult):
            self.results[event.request_id] = event.texts
        elif isinstance(event, Failed):
            self.failures[event.request_id] = (event.code, event.message)
            self.fields[event.request_id] = event.field

    def is_cancelled(self, request_id: str) -> bool:
        self.polls[request_id] = self.polls.get(request_id, 0) + 1
        limit = self.cancel_after.get(request_id)
        return limit is not None and self.polls[request_id] > limit


def settings(**overrides) -> TextSettings:
    values = dict(
        max_new_tokens=10,
        min_new_tokens=0,
        num_beams=1,
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        repetition_penalty=1.0,
        num_return_sequences=1,
        length_penalty=1.0,
        seed=0,
    )
    values.update(overrides)
    return TextSettings(**values)


def image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("blip2") / "modern"
    tiny_blip2.build(path)
    return path


@pytest.fixture(scope="session")
def legacy_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("blip2") / "legacy"
    tiny_blip2.build_legacy(path)
    return path


@pytest.fixture(scope="session")
def runner(checkpoint) -> Blip2Runner:
    return Blip2Runner.load("blip2-tiny", str(checkpoint), "cpu")


@pytest.fixture(scope="session")
def reference(checkpoint) -> tuple[Blip2Processor, Blip2ForConditionalGeneration]:
    """The checkpoint loaded plainly, to call generate on directly."""
    return (
        Blip2Processor.from_pretrained(checkpoint),
        Blip2ForConditionalGeneration.from_pretrained(checkpoint).eval(),
    )


def run_one(runner: Blip2Runner, job, img: Image.Image) -> list[GeneratedText]:
    sink = FakeSink()
    runner.run([Request("r", job, [png(img)])], sink)
    assert sink.calls == [("started", "r"), ("text_result", "r")], sink.failures
    return sink.results["r"]


def direct(reference, img: Image.Image, prompt: str, text_settings: TextSettings) -> list[str]:
    """Continuations from a plain generate call, prompt tokens sliced off."""
    processor, model = reference
    inputs = processor(images=[img], text=[prompt], return_tensors="pt")
    if text_settings.do_sample:
        torch.manual_seed(text_settings.seed)
    output = model.generate(**inputs, **generate_kwargs(text_settings))
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def test_build_is_deterministic(checkpoint, tmp_path):
    tiny_blip2.build(tmp_path)
    first, second = (
        load_file(checkpoint / "model.safetensors"),
        load_file(tmp_path / "model.safetensors"),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert (checkpoint / "tokenizer.json").read_text() == (tmp_path / "tokenizer.json").read_text()


def test_built_checkpoint_ends_generation_at_newline(reference):
    processor, model = reference
    newline = processor.tokenizer.convert_tokens_to_ids("Ċ")
    assert model.generation_config.eos_token_id == newline
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_index < model.config.text_config.vocab_size


def test_greedy_caption_equals_direct_generate(runner, reference):
    text_settings = settings()
    texts = run_one(runner, CaptionJob("", text_settings), image(1))
    assert [t.text for t in texts] == [
        s.strip() for s in direct(reference, image(1), "", text_settings)
    ]
    assert texts[0].text and texts[0].score is not None and texts[0].score < 0


def test_beam_caption_returns_requested_sequences_equal_to_direct(runner, reference):
    text_settings = settings(num_beams=3, num_return_sequences=2)
    texts = run_one(runner, CaptionJob("", text_settings), image(2))
    assert [t.text for t in texts] == [
        s.strip() for s in direct(reference, image(2), "", text_settings)
    ]
    # Beam scores come best first.
    assert texts[0].score >= texts[1].score


def test_sampled_caption_is_reproducible_and_equals_direct(runner, reference):
    text_settings = settings(do_sample=True, temperature=1.5, top_k=0, top_p=0.95, seed=7)
    first = run_one(runner, CaptionJob("", text_settings), image(3))
    second = run_one(runner, CaptionJob("", text_settings), image(3))
    assert first == second
    assert [t.text for t in first] == [
        s.strip() for s in direct(reference, image(3), "", text_settings)
    ]


def test_vqa_prompts_with_question_and_answer(runner, reference):
    text_settings = settings()
    texts = run_one(runner, VqaJob("what is on the table?", text_settings), image(4))
    prompt = "Question: what is on the table? Answer:"
    assert [t.text for t in texts] == [
        s.strip() for s in direct(reference, image(4), prompt, text_settings)
    ]


def test_batch_of_different_prompt_lengths_equals_each_alone(runner):
    text_settings = settings(max_new_tokens=8)
    requests = [
        Request("short", VqaJob("why?", text_settings), [png(image(5))]),
        Request(
            "long", VqaJob("what is the man on the horse holding?", text_settings), [png(image(6))]
        ),
    ]
    together = FakeSink()
    runner.run(requests, together)
    for request in requests:
        alone = FakeSink()
        runner.run([request], alone)
        [single], [batched] = (
            alone.results[request.request_id],
            together.results[request.request_id],
        )
        assert single.text == batched.text
        assert single.score == pytest.approx(batched.score, abs=1e-4)


def test_legacy_checkpoint_is_normalised_at_load(legacy_checkpoint):
    legacy = Blip2Runner.load("legacy", str(legacy_checkpoint), "cpu")
    image_id = legacy.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert legacy.processor.num_query_tokens == legacy.model.config.num_query_tokens
    assert legacy.model.config.image_token_index == image_id
    assert legacy.model.config.image_token_id == image_id


def test_legacy_caption_equals_modern_caption(runner, legacy_checkpoint):
    legacy = Blip2Runner.load("legacy", str(legacy_checkpoint), "cpu")
    for job in (CaptionJob("", settings()), VqaJob("is it raining?", settings())):
        assert run_one(legacy, job, image(7)) == run_one(runner, job, image(7))


def test_legacy_checkpoint_without_normalisation_cannot_generate(legacy_checkpoint):
    processor = Blip2Processor.from_pretrained(legacy_checkpoint)
    model = Blip2ForConditionalGeneration.from_pretrained(legacy_checkpoint).eval()
    assert processor.num_query_tokens is None and model.config.image_token_index is None
    with_text = processor(images=[image(8)], text=["Question: why? Answer:"], return_tensors="pt")
    # No image placeholders in the prompt, and none the model would look for.
    assert with_text["input_ids"].shape[1] == len(
        processor.tokenizer("Question: why? Answer:").input_ids
    )
    with pytest.raises(AttributeError):
        model.generate(**with_text, max_new_tokens=2)
    image_only = processor(images=[image(8)], return_tensors="pt")
    with pytest.raises(TypeError):
        model.generate(**image_only, max_new_tokens=2)


def test_prefix_caption_starts_with_prefix(runner, reference):
    text_settings = settings()
    texts = run_one(runner, CaptionJob("a photo of", text_settings), image(9))
    continuation = direct(reference, image(9), "a photo of", text_settings)[0]
    assert texts[0].text.startswith("a photo of")
    assert texts[0].text == ("a photo of" + continuation).strip()


def test_greedy_score_is_sum_of_token_log_probs(runner, reference):
    text_settings = settings(max_new_tokens=6)
    texts = run_one(runner, CaptionJob("", text_settings), image(10))
    processor, model = reference
    inputs = processor(images=[image(10)], text=[""], return_tensors="pt")
    output = model.generate(
        **inputs, **generate_kwargs(text_settings), return_dict_in_generate=True, output_scores=True
    )
    steps = model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
    assert texts[0].score == pytest.approx(steps.sum().item(), abs=1e-4)


def test_request_cancelled_during_generation_fails_as_cancelled(runner):
    sink = FakeSink(cancel_after={"r": 3})
    job = CaptionJob("", settings(max_new_tokens=100, min_new_tokens=100))
    runner.run([Request("r", job, [png(image(11))])], sink)
    assert sink.failures["r"][0] == "CANCELLED"
    assert "r" not in sink.results
    # Generation stopped a few steps after the cancel, not after 100 tokens.
    assert sink.polls["r"] < 10


def test_undecodable_image_fails_only_its_request(runner):
    sink = FakeSink()
    job = CaptionJob("", settings(max_new_tokens=3))
    runner.run([Request("bad", job, [b"not an image"]), Request("ok", job, [png(image(12))])], sink)
    assert sink.failures["bad"][0] == "INVALID_ARGUMENT"
    assert sink.fields["bad"] == "image.data"
    assert "ok" in sink.results


def test_unloadable_source_names_it(tmp_path):
    with pytest.raises(OSError, match="blip2-missing.*" + str(tmp_path / "nothing")):
        Blip2Runner.load("blip2-missing", str(tmp_path / "nothing"), "cpu")


def test_info_reports_text_positions_left_after_image_tokens(runner):
    info = runner.info()
    assert info.family == "blip2"
    assert info.max_prompt_tokens == tiny_blip2.MAX_POSITIONS - tiny_blip2.NUM_QUERY_TOKENS


def test_captions_and_questions_with_different_seeds_share_one_call(runner, monkeypatch):
    calls = []
    generate = runner.model.generate
    monkeypatch.setattr(runner.model, "generate", lambda **kw: calls.append(1) or generate(**kw))
    requests = [
        Request("caption", CaptionJob("", settings(max_new_tokens=6, seed=1)), [png(image(7))]),
        Request("vqa", VqaJob("why?", settings(max_new_tokens=6, seed=2)), [png(image(8))]),
    ]
    sink = FakeSink()
    runner.run(requests, sink)
    assert len(calls) == 1
    assert set(sink.results) == {"caption", "vqa"}


def test_a_member_cancelled_mid_batch_ends_and_the_others_equal_their_solo_runs(runner):
    job = CaptionJob("", settings(max_new_tokens=12, min_new_tokens=12))
    requests = [Request(name, job, [png(image(20 + i))]) for i, name in enumerate("abc")]
    sink = FakeSink(cancel_after={"b": 3})
    runner.run(requests, sink)
    assert sink.failures["b"][0] == "CANCELLED"
    assert "b" not in sink.results
    for request in (requests[0], requests[2]):
        alone = FakeSink()
        runner.run([request], alone)
        assert sink.results[request.request_id][0].text == alone.results[request.request_id][0].text
