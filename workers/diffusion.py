"""Stable Diffusion text-to-image through diffusers' StableDiffusionPipeline.

Each request runs the stock pipeline with one CPU ``torch.Generator`` per
image seeded ``seed + i``, so image i is the same whatever else is in the
batch and equals what diffusers gives when called directly. A step callback
reports progress, sends previews of image 0 and stops cancelled requests
before the VAE decode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from imago.workers.presets import STABLE_DIFFUSION
from imago.workers.previews import (
    X0Capture,
    encode_image,
    latents_to_rgb,
    mime_type,
    preview_size,
)
from imago.workers.protocol import ImageMeta, ModelInfo, TextToImageJob
from imago.workers.runner import Cancelled, EventSink, Request, Runner

logger = logging.getLogger(__name__)

#: Quality (1..100) of lossy final images; PNG is always lossless.
OUTPUT_QUALITY = 95
#: Quality of lossy previews: they are small and short-lived, bytes matter more.
PREVIEW_QUALITY = 85


class _StepReporter:
    """The pipeline's ``callback_on_step_end`` for one request: checks for
    cancellation, reports progress and sends previews.

    Steps are counted the way diffusers' own progress bar counts them, so the
    last step is ``job.steps`` even for schedulers that run more model calls
    than steps (PNDM repeats its first timestep; second-order schedulers call
    the model twice per step).
    """

    def __init__(
        self, request_id: str, job: TextToImageJob, sink: EventSink, capture: X0Capture
    ) -> None:
        self.request_id = request_id
        self.job = job
        self.sink = sink
        self.capture = capture
        self.steps_done = 0
        self.started_at = time.perf_counter()

    def __call__(
        self, pipe: StableDiffusionPipeline, i: int, t: Any, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if self.sink.is_cancelled(self.request_id):
            raise Cancelled(f"cancelled after {self.steps_done} of {self.job.steps} steps")
        calls, order = pipe.num_timesteps, pipe.scheduler.order
        warmup = calls - self.job.steps * order
        if i == calls - 1 or (i + 1 > warmup and (i + 1) % order == 0):
            self.steps_done += 1
            elapsed = time.perf_counter() - self.started_at
            self.sink.progress(self.request_id, self.steps_done, self.job.steps, elapsed)
            every = self.job.preview_every
            if every > 0 and self.steps_done % every == 0:
                self._preview()
        return kwargs

    def _preview(self) -> None:
        x0 = self.capture.x0()
        if x0 is None:
            return
        # Image 0 only, as ComfyUI does: one preview stream per request. It is
        # shown where the final image will be, so it takes the output's shape.
        size = preview_size(self.job.width, self.job.height, self.job.preview_max_size)
        image = latents_to_rgb(x0[0]).resize(size, Image.Resampling.BILINEAR)
        fmt = self.job.preview_format
        data = encode_image(image, fmt, quality=PREVIEW_QUALITY)
        self.sink.preview(
            self.request_id, self.steps_done, 0, data, mime_type(fmt), image.width, image.height
        )


class StableDiffusionRunner(Runner):
    """Text-to-image with a Stable Diffusion 1.x/2.x checkpoint."""

    family = STABLE_DIFFUSION

    def __init__(self, name: str, source: str, pipe: StableDiffusionPipeline) -> None:
        self.name = name
        self.source = source
        self.pipe = pipe

    @classmethod
    def load(cls, name: str, source: str, device: str) -> StableDiffusionRunner:
        """Load ``source`` (a diffusers directory or a hub id) in float16 on
        CUDA and float32 elsewhere."""
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        # Its loading bar would interleave with other workers' lines in the server log.
        diffusers_logging.disable_progress_bar()
        try:
            # trust_remote_code stays at its default (off): a checkpoint may
            # not bring its own pipeline code.
            pipe = StableDiffusionPipeline.from_pretrained(source, dtype=dtype)
        except Exception as exc:
            raise RuntimeError(
                f"cannot load Stable Diffusion model {name!r} from {source!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(name, source, pipe)

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            family=self.family,
            source=self.source,
            default_size=self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor,
            max_prompt_tokens=self.pipe.tokenizer.model_max_length,
        )

    def run(self, batch: list[Request], sink: EventSink) -> None:
        # One pipeline call per request: requests differ in prompt, size and
        # step count, and per-image generators already make results
        # independent of batching.
        for request in batch:
            try:
                self._run_one(request, sink)
            except torch.cuda.OutOfMemoryError as exc:
                torch.cuda.empty_cache()
                sink.failed(request.request_id, "RESOURCE_EXHAUSTED", f"out of memory: {exc}")
            except Exception as exc:
                logger.exception("request %s failed", request.request_id)
                sink.failed(request.request_id, "INTERNAL", f"{type(exc).__name__}: {exc}")

    def _run_one(self, request: Request, sink: EventSink) -> None:
        rid, job = request.request_id, request.job
        if not isinstance(job, TextToImageJob):
            sink.failed(rid, "INVALID_ARGUMENT", f"{self.name} runs text_to_image jobs only")
            return
        if sink.is_cancelled(rid):
            sink.failed(rid, "CANCELLED", "cancelled before it started")
            return
        sink.started(rid, total_steps=job.steps)
        warnings = self._truncation_warnings(job)
        capture = X0Capture(self.pipe.scheduler)
        reporter = _StepReporter(rid, job, sink, capture)
        generators = [
            torch.Generator("cpu").manual_seed(job.seed + i) for i in range(job.num_images)
        ]
        try:
            with self._scheduler(capture.scheduler):
                output = self.pipe(
                    prompt=job.prompt,
                    negative_prompt=job.negative_prompt or None,
                    width=job.width,
                    height=job.height,
                    num_inference_steps=job.steps,
                    guidance_scale=job.guidance_scale,
                    num_images_per_prompt=job.num_images,
                    generator=generators,
                    callback_on_step_end=reporter,
                )
        except Cancelled as exc:
            sink.failed(rid, "CANCELLED", str(exc))
            return
        seconds = time.perf_counter() - reporter.started_at

        # A safety checker, where the checkpoint has one, blacks out what it
        # flags; say so rather than return a silent black image.
        flags = output.nsfw_content_detected or [False] * len(output.images)
        mime = mime_type(job.output_format)
        images = [
            (
                ImageMeta(job.seed + i, mime, image.width, image.height, bool(flag), bool(flag)),
                encode_image(image, job.output_format, quality=OUTPUT_QUALITY),
            )
            for i, (image, flag) in enumerate(zip(output.images, flags, strict=True))
        ]
        sink.image_result(rid, images, warnings, seconds)

    @contextmanager
    def _scheduler(self, scheduler: SchedulerMixin) -> Iterator[None]:
        """Run the pipeline with ``scheduler`` for the duration of the block.
        A worker runs one request at a time, so swapping is safe."""
        shared = self.pipe.scheduler
        self.pipe.scheduler = scheduler
        try:
            yield
        finally:
            self.pipe.scheduler = shared

    def _truncation_warnings(self, job: TextToImageJob) -> list[str]:
        """Warnings naming the text CLIP will not see: the pipeline keeps the
        first ``model_max_length`` tokens (start and end tokens included) and
        drops the rest silently."""
        warnings = []
        for field, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
            dropped = self._dropped_text(text)
            if dropped:
                limit = self.pipe.tokenizer.model_max_length
                warnings.append(f"{field} is longer than {limit} tokens; ignored: {dropped!r}")
        return warnings

    def _dropped_text(self, text: str) -> str:
        if not text:
            return ""
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(text, truncation=False, verbose=False).input_ids
        limit = tokenizer.model_max_length
        if len(ids) <= limit:
            return ""
        # Same slice as diffusers' own truncation log: everything between the
        # last kept position (given to the end token) and the end token.
        return tokenizer.decode(ids[limit - 1 : -1])
