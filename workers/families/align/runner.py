"""BLIP-2 image-text alignment: embeddings, similarities and matching scores.

A BLIP-2 retrieval checkpoint (Salesforce/blip2-itm-vit-g) scores images
against texts two ways:

* ITC, image-text contrastive: images and texts are embedded separately into
  one space. An image gives one unit vector per Q-Former query token, a text
  one unit vector (its [CLS] token); their similarity is the best cosine over
  the queries. Cheap, and embeddings can be stored and compared later.
* ITM, image-text matching: the query tokens attend to the text and, across,
  to the image inside the Q-Former, and a two-way head on them says whether
  image and text match. More accurate, but it runs once
  per (image, text) pair, so it is only offered for pairs of one request.

Every request of a batch shares one pass of the vision tower (by far the most
expensive part) over all of the batch's images and one Q-Former text pass over
all of its texts. ITM pairs reuse the vision tower's hidden states, so the ViT
never runs twice for an image.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from PIL import Image
from torch.nn import functional
from transformers import Blip2ForImageTextRetrieval, Blip2Processor

from imago.workers.contract.families import BLIP2_ALIGN
from imago.workers.contract.jobs import AlignJob, EmbedImagesJob, EmbedTextsJob, MatchJob
from imago.workers.contract.presets import DeviceSettings
from imago.workers.contract.protocol import ArrayMeta, ArraysResult, Failed, ModelInfo, Started
from imago.workers.runtime.device_setup import set_transformers_attention, torch_dtype
from imago.workers.runtime.runner import EventSink, Request, Runner

#: (image, text) pairs per ITM forward pass; bounds the repeated image states.
ITM_CHUNK = 256


@dataclass
class _Item:
    """A request whose inputs decoded and fit; slices index the batch's rows."""

    request_id: str
    job: AlignJob
    images: slice
    texts: slice


class _Encoded(NamedTuple):
    """What the shared passes computed for every image and text of a batch."""

    # Unit query embeddings [N, Q, D] and the vision tower's last hidden states.
    query_embeds: torch.Tensor
    vision_states: torch.Tensor
    # Unit [CLS] embeddings [M, D], with the padded ids and mask [M, L] behind them.
    text_embeds: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor


class Blip2AlignRunner(Runner):
    """Embeds images and texts and scores them against each other."""

    family = BLIP2_ALIGN

    def __init__(
        self,
        name: str,
        source: str,
        processor: Blip2Processor,
        model: Blip2ForImageTextRetrieval,
        device: str,
        has_itm: bool,
    ) -> None:
        self.name = name
        self.source = source
        self.processor = processor
        self.model = model
        self.device = device
        self.has_itm = has_itm
        # The Q-Former and query tokens stay fp32; the vision tower holds the
        # dtype pixels must arrive in.
        self.pixel_dtype = model.vision_model.dtype
        self.max_text_tokens = model.config.qformer_config.max_position_embeddings

    @classmethod
    def load(
        cls,
        name: str,
        source: str,
        device: str,
        settings: DeviceSettings | None = None,
        **extras: str,
    ) -> Blip2AlignRunner:
        """Load ``source`` with the precision and attention ``settings`` name."""
        if extras:
            raise ValueError(f"BLIP-2 models take no extra sources, got {', '.join(extras)}")
        settings = settings or DeviceSettings()
        dtype = torch_dtype(settings.dtype, device)
        try:
            processor = Blip2Processor.from_pretrained(source)
            model, loading = Blip2ForImageTextRetrieval.from_pretrained(
                source, dtype=dtype, output_loading_info=True
            )
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot load BLIP-2 model {name!r} from {source!r}: {exc}") from exc
        missing = set(loading["missing_keys"])
        # Without trained projections every embedding would be random noise.
        projections = [key for key in missing if key.split(".")[0].endswith("_projection")]
        if projections:
            raise OSError(
                f"{source!r} is not a BLIP-2 image-text alignment checkpoint "
                f"(no {', '.join(sorted(projections))}); {name!r} cannot serve alignment"
            )
        has_itm = not any(key.startswith("itm_head.") for key in missing)
        set_transformers_attention(model, settings.attention)
        model.to(device).eval()
        # BERT reads [CLS] at position 0, so pads go on the right.
        processor.tokenizer.padding_side = "right"
        return cls(name, source, processor, model, device, has_itm)

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            family=self.family,
            source=self.source,
            max_prompt_tokens=self.max_text_tokens,
            image_text_matching=self.has_itm,
        )

    def run(self, batch: list[Request], sink: EventSink) -> None:
        items: list[_Item] = []
        images: list[Image.Image] = []
        token_ids: list[list[int]] = []
        for request in batch:
            item = self._prepare(request, sink, images, token_ids)
            if item is not None:
                items.append(item)
        if not items:
            return
        for item in items:
            sink.emit(Started(item.request_id))
        start = time.perf_counter()
        try:
            encoded = _Encoded(*self._embed_images(images), *self._embed_texts(token_ids))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            for item in items:
                sink.emit(
                    Failed(item.request_id, "RESOURCE_EXHAUSTED", "out of accelerator memory")
                )
            return
        results = [
            (item.request_id, self._RESULTS[type(item.job)](self, item, encoded, sink))
            for item in items
        ]
        elapsed = time.perf_counter() - start
        for request_id, arrays in results:
            if arrays is None:
                continue  # already failed
            if sink.is_cancelled(request_id):
                sink.emit(Failed(request_id, "CANCELLED", "cancelled by client"))
            else:
                pairs = [_encode(name, array) for name, array in arrays]
                result = ArraysResult(request_id, [meta for meta, _ in pairs], elapsed)
                sink.emit(result, [data for _, data in pairs])

    def _image_embeddings(
        self, item: _Item, encoded: _Encoded, sink: EventSink
    ) -> list[tuple[str, torch.Tensor]] | None:
        return [("image_embeddings", encoded.query_embeds[item.images])]

    def _text_embeddings(
        self, item: _Item, encoded: _Encoded, sink: EventSink
    ) -> list[tuple[str, torch.Tensor]] | None:
        return [("text_embeddings", encoded.text_embeds[item.texts])]

    def _scores(
        self, item: _Item, encoded: _Encoded, sink: EventSink
    ) -> list[tuple[str, torch.Tensor]] | None:
        job = item.job
        # Best cosine over the image's query vectors: [n, Q, D] @ [D, m] -> [n, m].
        scores = encoded.query_embeds[item.images] @ encoded.text_embeds[item.texts].T
        arrays = [("similarities", scores.max(dim=1).values)]
        if not job.image_text_matching:
            return arrays
        try:
            matches = self._match(item, encoded, sink.is_cancelled)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            sink.emit(Failed(item.request_id, "RESOURCE_EXHAUSTED", "out of accelerator memory"))
            return None
        if matches is None:
            sink.emit(Failed(item.request_id, "CANCELLED", "cancelled by client"))
            return None
        return [*arrays, ("match_probabilities", matches)]

    #: The named result arrays of each kind of job the runner runs, from the
    #: batch's shared passes; None once the request was failed.
    _RESULTS = {
        EmbedImagesJob: _image_embeddings,
        EmbedTextsJob: _text_embeddings,
        MatchJob: _scores,
    }

    def _prepare(
        self,
        request: Request,
        sink: EventSink,
        images: list[Image.Image],
        token_ids: list[list[int]],
    ) -> _Item | None:
        """Decode the request's images and tokenise its texts onto the batch's
        lists; fail the request (leaving the lists as they were) if impossible."""
        rid, job = request.request_id, request.job
        if type(job) not in self._RESULTS:
            sink.emit(Failed(rid, "INVALID_ARGUMENT", f"{self.family} cannot run {job!r}"))
            return None
        if sink.is_cancelled(rid):
            sink.emit(Failed(rid, "CANCELLED", "cancelled by client"))
            return None
        wanted = job.images
        if len(request.images) != wanted:
            message = f"expected {wanted} images, got {len(request.images)}"
            sink.emit(Failed(rid, "INVALID_ARGUMENT", message, "images"))
            return None
        if isinstance(job, MatchJob) and job.image_text_matching and not self.has_itm:
            message = f"{self.name!r} has no image-text matching head"
            sink.emit(Failed(rid, "FAILED_PRECONDITION", message, "image_text_matching"))
            return None
        decoded = []
        for index, data in enumerate(request.images):
            try:
                with Image.open(io.BytesIO(data)) as image:
                    decoded.append(image.convert("RGB"))
            except Exception as exc:  # PIL raises many types for corrupt data
                message = f"cannot decode image {index}: {type(exc).__name__}: {exc}"
                sink.emit(Failed(rid, "INVALID_ARGUMENT", message, f"images[{index}].data"))
                return None
        texts = job.texts
        ids = self.processor.tokenizer(list(texts)).input_ids if texts else []
        for index, tokens in enumerate(ids):
            if len(tokens) > self.max_text_tokens:
                limit = self.max_text_tokens
                message = f"text {index} has {len(tokens)} tokens; at most {limit} fit the model"
                sink.emit(Failed(rid, "INVALID_ARGUMENT", message, f"texts[{index}]"))
                return None
        item = _Item(
            rid,
            job,
            slice(len(images), len(images) + len(decoded)),
            slice(len(token_ids), len(token_ids) + len(ids)),
        )
        images.extend(decoded)
        token_ids.extend(ids)
        return item

    @torch.inference_mode()
    def _embed_images(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit query embeddings [N, Q, D] and the vision tower's last hidden
        states [N, patches + 1, vision hidden] that ITM cross-attends to."""
        model = self.model
        if not images:
            q, d = model.config.num_query_tokens, model.config.image_text_hidden_size
            return torch.zeros(0, q, d, device=self.device), torch.zeros(0, device=self.device)
        pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.pixel_dtype)
        states = model.vision_model(pixel_values=pixels).last_hidden_state
        queries = model.qformer(
            query_embeds=model.query_tokens.expand(states.shape[0], -1, -1),
            encoder_hidden_states=states,
            encoder_attention_mask=_ones(states),
        ).last_hidden_state
        embeds = model.vision_projection(queries.to(model.vision_projection.weight.dtype))
        return functional.normalize(embeds, dim=-1), states

    @torch.inference_mode()
    def _embed_texts(
        self, token_ids: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit [CLS] embeddings [M, D], and the right-padded ids and attention
        mask [M, L] they came from."""
        model = self.model
        length = max((len(ids) for ids in token_ids), default=0)
        pad = self.processor.tokenizer.pad_token_id
        ids = torch.full((len(token_ids), length), pad, dtype=torch.long)
        mask = torch.zeros((len(token_ids), length), dtype=torch.long)
        for row, tokens in enumerate(token_ids):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if not token_ids:
            return (
                torch.zeros(0, model.config.image_text_hidden_size, device=self.device),
                ids,
                mask,
            )
        hidden = model.qformer(
            query_embeds=model.embeddings(input_ids=ids), query_length=0, attention_mask=mask
        ).last_hidden_state
        first = hidden[:, 0, :].to(model.text_projection.weight.dtype)
        return functional.normalize(model.text_projection(first), dim=-1), ids, mask

    @torch.inference_mode()
    def _match(
        self, item: _Item, encoded: _Encoded, is_cancelled: Callable[[str], bool]
    ) -> torch.Tensor | None:
        """ITM match probabilities [n, m] for every pair of the item's images
        and texts, in [0, 1]; None once the request is cancelled."""
        model = self.model
        vision_states, text_ids, text_mask = (
            encoded.vision_states,
            encoded.text_ids,
            encoded.text_mask,
        )
        images = torch.arange(vision_states.shape[0], device=self.device)[item.images]
        texts = torch.arange(text_ids.shape[0], device=self.device)[item.texts]
        # Image-major pairs, so the flat result reshapes to [n, m].
        pair_images = images.repeat_interleave(len(texts))
        pair_texts = texts.repeat(len(images))
        num_queries = model.config.num_query_tokens
        probabilities = [torch.zeros(0, device=self.device)]
        for begin in range(0, len(pair_images), ITM_CHUNK):
            if is_cancelled(item.request_id):
                return None
            rows = pair_texts[begin : begin + ITM_CHUNK]
            states = vision_states[pair_images[begin : begin + ITM_CHUNK]]
            # Drop the columns that are padding for every text of the chunk.
            length = int(text_mask[rows].sum(dim=1).max())
            ids, mask = text_ids[rows, :length], text_mask[rows, :length]
            queries = model.query_tokens.expand(len(rows), -1, -1)
            hidden = model.qformer(
                query_embeds=model.embeddings(input_ids=ids, query_embeds=queries),
                query_length=num_queries,
                attention_mask=torch.cat([_ones(queries), mask], dim=1),
                encoder_hidden_states=states,
                encoder_attention_mask=_ones(states),
            ).last_hidden_state
            hidden = hidden[:, :num_queries, :].to(model.itm_head.weight.dtype)
            logits = model.itm_head(hidden).mean(dim=1)
            # In fp32: fp16 softmax would round probabilities near 0 and 1.
            probabilities.append(logits.float().softmax(dim=-1)[:, 1])
        return torch.cat(probabilities).reshape(len(images), len(texts))


def _ones(states: torch.Tensor) -> torch.Tensor:
    """An all-ones attention mask over the positions of ``states`` [B, L, H]."""
    return torch.ones(states.shape[:-1], dtype=torch.long, device=states.device)


def _encode(name: str, array: torch.Tensor) -> tuple[ArrayMeta, bytes]:
    """``array`` as float32, row-major and little-endian, with its name and shape."""
    data = array.float().cpu().contiguous().numpy().astype("<f4")
    return ArrayMeta(name, tuple(data.shape)), data.tobytes()
