"""BLIP-2 captioning and visual question answering.

Requests of a batch with the same ``batch_key()`` (their generation settings,
seed aside, and their adapter) run as one left-padded ``generate`` call,
captions and questions mixed. Sampled requests always run alone: a seed then
gives the same text whatever else happened to be batched with it. Adapters
come from the model's adapter directory (see
:mod:`imago.workers.families.blip2.adapters`).
"""

from __future__ import annotations

import copy
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor, StoppingCriteria
from transformers.generation.utils import GenerateOutput

from imago.workers.checkpoints import arch
from imago.workers.contract.families import BLIP2
from imago.workers.contract.jobs import CaptionJob, TextSettings, VqaJob
from imago.workers.contract.presets import DeviceSettings
from imago.workers.contract.protocol import Failed, GeneratedText, ModelInfo, Started, TextResult
from imago.workers.families.blip2.adapters import CaptionAdapters
from imago.workers.runtime.device_setup import set_transformers_attention, torch_dtype
from imago.workers.runtime.runner import EventSink, Request, Runner

IMAGE_TOKEN = "<image>"
# Least temperature and repetition penalty given to transformers: both divide
# logits, and below this (the API allows anything above 0) the quotients
# overflow to inf and sampling fails on NaN probabilities. Decoding at this
# temperature is all but greedy already (vLLM clamps temperatures the same way).
MIN_DIVISOR = 1e-2


@dataclass(frozen=True)
class _Item:
    """A request ready for generation."""

    request_id: str
    image: Image.Image
    prompt: str
    # Prepended to the decoded continuation (caption prefixes).
    prefix: str
    settings: TextSettings
    # Adapter to run with; "" for the base model.
    adapter: str = ""


class _StopWhenCancelled(StoppingCriteria):
    """Ends the rows of cancelled requests, so they stop growing, and the whole
    call once every request of it was cancelled."""

    def __init__(self, sink: EventSink, request_ids: Sequence[str]) -> None:
        self.sink = sink
        self.request_ids = request_ids

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs
    ) -> torch.BoolTensor:
        cancelled = [self.sink.is_cancelled(rid) for rid in self.request_ids]
        if not any(cancelled):
            # Made on the device: copying flags from pageable host memory
            # would make the host wait for the GPU at every token.
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        # Rows are request-major in every decoding strategy: each request owns
        # the same number of consecutive rows (its beams or return sequences).
        per_request = input_ids.shape[0] // len(self.request_ids)
        return torch.tensor(cancelled).repeat_interleave(per_request).to(input_ids.device)


def vqa_prompt(question: str) -> str:
    """The prompt BLIP-2 OPT models were trained to answer questions with."""
    return f"Question: {question} Answer:"


class _Prompt(NamedTuple):
    """What a text job asks of the model: the ``text`` it is prompted with, the
    ``prefix`` its generated text continues, and the request ``field`` the
    text came from."""

    text: str
    prefix: str
    field: str


def _caption_prompt(job: CaptionJob) -> _Prompt:
    return _Prompt(job.prefix, job.prefix, "prefix")


def _vqa_prompt(job: VqaJob) -> _Prompt:
    return _Prompt(vqa_prompt(job.question), "", "question")


#: How each kind of job this model runs becomes a prompt.
PROMPTS: dict[type, Callable[[Any], _Prompt]] = {
    CaptionJob: _caption_prompt,
    VqaJob: _vqa_prompt,
}


def normalise_legacy(processor: Blip2Processor, model: Blip2ForConditionalGeneration) -> None:
    """Give checkpoints saved before image tokens existed what generation needs.

    Without ``num_query_tokens`` the processor adds no image placeholders, and
    without ``image_token_index`` the model cannot find them: ``generate`` then
    raises (AttributeError with a text prompt, TypeError without one).
    """
    if processor.num_query_tokens is None:
        processor.num_query_tokens = model.config.num_query_tokens
    if model.config.image_token_index is None:
        # The processor added <image> to the tokenizer when it was created.
        image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id >= model.get_input_embeddings().num_embeddings:
            raise ValueError(f"{IMAGE_TOKEN} (id {image_id}) has no row in the embedding matrix")
        model.config.image_token_index = image_id


class Blip2Runner(Runner):
    """Captions images and answers questions about them with a BLIP-2 model."""

    family = BLIP2

    def __init__(
        self,
        name: str,
        source: str,
        processor: Blip2Processor,
        model: Blip2ForConditionalGeneration,
        device: str,
    ) -> None:
        self.name = name
        self.source = source
        self.processor = processor
        self.model = model
        self.device = device
        # model.dtype reports the first parameter, the fp32 query tokens; the
        # vision tower holds the dtype pixels must arrive in.
        self.pixel_dtype = model.vision_model.dtype
        self.adapters = CaptionAdapters(model, None, device)

    @classmethod
    def load(
        cls,
        name: str,
        source: str,
        device: str,
        settings: DeviceSettings | None = None,
        adapters: str = "",
        **extras: str,
    ) -> Blip2Runner:
        """Load ``source`` (a checkpoint, or an ``arch:`` source built on the
        device with random weights) with the precision and attention
        ``settings`` name, and the adapter folders in the directory
        ``adapters`` when given."""
        if extras:
            raise ValueError(f"unknown extra sources for {name!r}: {', '.join(extras)}")
        settings = settings or DeviceSettings()
        dtype = torch_dtype(settings.dtype, device)
        if arch.is_arch(source):
            built = arch.build(source, device, dtype)
            if not isinstance(built, tuple) or not isinstance(
                built[0], Blip2ForConditionalGeneration
            ):
                raise ValueError(f"{source!r} does not build a BLIP-2 model")
            model, processor = built
        else:
            try:
                processor = Blip2Processor.from_pretrained(source)
                model = Blip2ForConditionalGeneration.from_pretrained(source, dtype=dtype)
                normalise_legacy(processor, model)
            except (OSError, ValueError) as exc:
                raise OSError(f"cannot load BLIP-2 model {name!r} from {source!r}: {exc}") from exc
        set_transformers_attention(model, settings.attention)
        model.to(device).eval()
        # Decoder-only OPT continues from the last position: right padding
        # would put pads between the prompt and the answer.
        processor.tokenizer.padding_side = "left"
        # generate() delegates to the OPT model, whose generation config comes
        # from text_config; generation_config.json (eos "\n" for the COCO
        # checkpoints) would otherwise be ignored.
        model.language_model.generation_config = copy.deepcopy(model.generation_config)
        runner = cls(name, source, processor, model, device)
        if adapters:
            runner.adapters.directory = Path(adapters)
            runner.reload()
        return runner

    def info(self) -> ModelInfo:
        text_positions = self.model.config.text_config.max_position_embeddings
        return ModelInfo(
            name=self.name,
            family=self.family,
            source=self.source,
            max_prompt_tokens=text_positions - self.model.config.num_query_tokens,
            adapters=self.adapters.names,
        )

    def reload(self) -> None:
        """Load the adapter directory afresh: new folders load, removed ones unload."""
        self.adapters.reload()

    def run(self, batch: list[Request], sink: EventSink) -> None:
        groups: dict[object, list[_Item]] = {}
        for request in batch:
            item = self._prepare(request, sink)
            if item is None:
                continue
            key = request.job.batch_key() or item.request_id
            groups.setdefault(key, []).append(item)
        for items in groups.values():
            self._run_group(items, sink)

    def _prepare(self, request: Request, sink: EventSink) -> _Item | None:
        """Decode the image and build the prompt; fail the request if impossible."""
        job = request.job
        prompting = PROMPTS.get(type(job))
        if prompting is None:
            message = f"{self.family} cannot run {job!r}"
            sink.emit(Failed(request.request_id, "INVALID_ARGUMENT", message))
            return None
        prompt, prefix, text_field = prompting(job)
        if not request.images:
            message = "an image is required"
            sink.emit(Failed(request.request_id, "INVALID_ARGUMENT", message, "image"))
            return None
        try:
            with Image.open(io.BytesIO(request.images[0])) as image:
                rgb = image.convert("RGB")
        except Exception as exc:  # PIL raises many types for corrupt data, not only OSError
            message = f"cannot decode image: {type(exc).__name__}: {exc}"
            sink.emit(Failed(request.request_id, "INVALID_ARGUMENT", message, "image.data"))
            return None
        prompt_ids = self.processor.tokenizer(prompt).input_ids
        if self.model.config.image_token_index in prompt_ids:
            # The processor counts placeholders to place the image's query
            # embeddings: one more in the text breaks the whole model call.
            message = f"must not contain the image placeholder {IMAGE_TOKEN}"
            sink.emit(Failed(request.request_id, "INVALID_ARGUMENT", message, text_field))
            return None
        # Image placeholders and prompt share the language model's positions.
        used = self.model.config.num_query_tokens + len(prompt_ids)
        limit = self.model.config.text_config.max_position_embeddings
        if used + job.settings.max_new_tokens > limit:
            new = job.settings.max_new_tokens
            message = f"{new} new tokens after a {used}-token prompt exceed the {limit} positions"
            # A prompt that leaves no room for even one token is the text's fault.
            field = text_field if used + 1 > limit else "generation.max_new_tokens"
            sink.emit(Failed(request.request_id, "INVALID_ARGUMENT", message, field))
            return None
        return _Item(request.request_id, rgb, prompt, prefix, job.settings, job.adapter)

    def _run_group(self, items: list[_Item], sink: EventSink) -> None:
        """One generate call for requests that share settings."""
        live = []
        for item in items:
            if sink.is_cancelled(item.request_id):
                sink.emit(Failed(item.request_id, "CANCELLED", "cancelled by client"))
            else:
                live.append(item)
        if not live:
            return
        ids = [item.request_id for item in live]
        settings, adapter = live[0].settings, live[0].adapter
        if adapter and adapter not in self.adapters.names:
            # Validated by the frontend, then unloaded by a reload in between.
            loaded = ", ".join(self.adapters.names) or "none"
            message = f"no adapter {adapter!r} is loaded for {self.name} (loaded: {loaded})"
            for rid in ids:
                sink.emit(Failed(rid, "NOT_FOUND", message, "adapter"))
            return
        for rid in ids:
            sink.emit(Started(rid))
        start = time.perf_counter()
        try:
            with self.adapters.active(adapter):
                texts = self._generate(live, settings, _StopWhenCancelled(sink, ids))
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            # The worker frees the memory once the batch is over.
            where = "host" if isinstance(exc, MemoryError) else "accelerator"
            for rid in ids:
                sink.emit(Failed(rid, "RESOURCE_EXHAUSTED", f"out of {where} memory"))
            return
        elapsed = time.perf_counter() - start
        n = settings.num_return_sequences
        for index, item in enumerate(live):
            if sink.is_cancelled(item.request_id):
                sink.emit(Failed(item.request_id, "CANCELLED", "cancelled by client"))
            else:
                mine = texts[index * n : (index + 1) * n]
                sink.emit(TextResult.of(item.request_id, mine, item.settings.seed, elapsed))

    @torch.inference_mode()
    def _generate(
        self, items: list[_Item], settings: TextSettings, stop: StoppingCriteria
    ) -> list[GeneratedText]:
        """Texts for ``items`` in order, ``num_return_sequences`` per item."""
        inputs = self.processor(
            images=[item.image for item in items],
            text=[item.prompt for item in items],
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.pixel_dtype)
        if settings.do_sample:
            torch.manual_seed(settings.seed)
        output = self.model.generate(
            **inputs,
            **generate_kwargs(settings),
            stopping_criteria=[stop],
            return_dict_in_generate=True,
            output_scores=True,
        )
        prompt_length = inputs["input_ids"].shape[1]
        continuations = output.sequences[:, prompt_length:]
        counted = self._counted(continuations)
        scores = self._scores(output, counted, settings)
        tokens = counted.sum(dim=1).tolist()
        decoded = self.processor.tokenizer.batch_decode(continuations, skip_special_tokens=True)
        n = settings.num_return_sequences
        return [
            GeneratedText((items[row // n].prefix + text).strip(), float(score), int(count))
            for row, (text, score, count) in enumerate(zip(decoded, scores, tokens, strict=True))
        ]

    def _counted(self, continuations: torch.Tensor) -> torch.Tensor:
        """Which tokens of ``continuations`` belong to their sequence: up to and
        including its first end of text; what follows is padding."""
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        is_eos = torch.isin(continuations, torch.tensor(eos, device=continuations.device)).int()
        return (is_eos.cumsum(dim=1) - is_eos) == 0  # no end of text before this token

    def _scores(
        self, output: GenerateOutput, counted: torch.Tensor, settings: TextSettings
    ) -> torch.Tensor:
        """Length-normalised beam scores, else the summed log-probs of the
        ``counted`` tokens."""
        if settings.num_beams > 1:
            return output.sequences_scores.float().cpu()
        steps = self.model.compute_transition_scores(
            output.sequences, output.scores, normalize_logits=True
        )
        return torch.where(counted.to(steps.device), steps.float(), 0.0).sum(dim=1).cpu()


def generate_kwargs(settings: TextSettings) -> dict[str, object]:
    """Arguments to ``generate`` for ``settings``; options that do not apply to
    the decoding strategy are left out so transformers does not warn."""
    kwargs: dict[str, object] = {
        "max_new_tokens": settings.max_new_tokens,
        "min_new_tokens": settings.min_new_tokens,
        "num_beams": settings.num_beams,
        "do_sample": settings.do_sample,
        "repetition_penalty": max(settings.repetition_penalty, MIN_DIVISOR),
        "num_return_sequences": settings.num_return_sequences,
    }
    if settings.do_sample:
        temperature = max(settings.temperature, MIN_DIVISOR)
        kwargs.update(temperature=temperature, top_p=settings.top_p, top_k=settings.top_k)
    if settings.num_beams > 1:
        kwargs["length_penalty"] = settings.length_penalty
    return kwargs
