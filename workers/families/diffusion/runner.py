"""Stable Diffusion: text-to-image, image-to-image (with an optional style
image through an IP-Adapter) and inpainting through diffusers'
StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline, which share every component (one copy of the
weights; inpainting may bring a dedicated UNet checkpoint of its own).

The frontend batches requests whose jobs' ``batch_key()`` agrees (same task,
size, step count, guidance scale, scheduler, LoRAs and strength);
their prompts, seeds, image counts, init images and formats may differ. The
runner regroups a batch by that key (it does not trust the frontend to have
done so) and runs each group in one pipeline call: every image of every
request becomes one row of the call, with its own prompt, negative prompt,
init image and CPU ``torch.Generator`` seeded ``seed + i``. Image i of a
request is therefore the same whatever else shares the call, and equals what
diffusers gives when called directly.

A step callback keeps one event stream per request: progress, previews of the
request's own image 0 and cancellation. A cancelled request ends at once while
the rest of its group runs on; when every request of a group is cancelled the
call stops before the VAE decode. Cancellation is also checked inside steps,
at each coarse block of the UNet and of the VAE decoder (see :mod:`.steps`),
so that a call whose steps take minutes stops within a block, and the
worker's heartbeats go on while a step runs; except in models compiled with
torch.compile, which are checked between steps only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderTiny,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from imago.workers.contract.families import STABLE_DIFFUSION, TAESD
from imago.workers.contract.jobs import ImageToImageJob, InpaintJob, TextToImageJob
from imago.workers.contract.presets import DeviceSettings
from imago.workers.contract.preview_methods import DEFAULT_PREVIEW_METHOD
from imago.workers.contract.protocol import (
    Failed,
    ImageMeta,
    ImageResult,
    ModelInfo,
    Started,
)
from imago.workers.contract.schedulers import SCHEDULERS
from imago.workers.families.diffusion.inputs import ARGUMENTS, InputError, job_inputs
from imago.workers.families.diffusion.loading import load_ip_adapter, load_pipeline, load_taesd
from imago.workers.families.diffusion.loras import apply_adapters, sync_adapters
from imago.workers.families.diffusion.parameters import SAMPLER_LABELS, parameters_text
from imago.workers.families.diffusion.previews import (
    PREVIEW_METHODS,
    VAE,
    X0Capture,
    encode_image,
    mime_type,
)
from imago.workers.families.diffusion.prompts import truncation_warnings
from imago.workers.families.diffusion.steps import Member, StepReporter, interrupt_points
from imago.workers.runtime.device_setup import compile_pipeline, prepare_pipeline, torch_dtype
from imago.workers.runtime.runner import Cancelled, EventSink, Request, Runner

logger = logging.getLogger(__name__)


@contextmanager
def _swapped_scheduler(pipe: DiffusionPipeline, scheduler: SchedulerMixin) -> Iterator[None]:
    """Run ``pipe`` with ``scheduler`` for the duration of the block. A worker
    runs one call at a time, so swapping is safe."""
    shared = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = shared


class StableDiffusionRunner(Runner):
    """A Stable Diffusion model (the UNet, VAE and CLIP text encoder layout of
    versions 1 and 2) serving every task of the ImageGenService."""

    family = STABLE_DIFFUSION

    def __init__(
        self,
        name: str,
        source: str,
        pipe: StableDiffusionPipeline,
        inpaint: StableDiffusionInpaintPipeline | None = None,
        taesd: AutoencoderTiny | None = None,
    ) -> None:
        """``inpaint`` is a dedicated inpainting checkpoint's pipeline (a UNet
        taking 9 channels); without one, inpainting runs on ``pipe``'s UNet and
        blends the kept area back in at each step (diffusers' generic
        inpainting)."""
        self.name = name
        self.source = source
        self.pipe = pipe
        # What preview methods draw with, by role (see previews.PREVIEW_METHODS).
        self.preview_decoders: dict[str, torch.nn.Module] = {VAE: pipe.vae}
        if taesd is not None:
            self.preview_decoders[TAESD] = taesd
        # LoRA adapters: the directory they come from, and the names loaded.
        self.lora_dir: Path | None = None
        self.adapters: set[str] = set()
        # An IP-Adapter in the shared UNet: every call through it then needs an
        # image, which is a blank one at scale 0 (exactly no effect) without style.
        self.style_images = getattr(pipe.unet, "encoder_hid_proj", None) is not None
        # Named schedulers built from the checkpoint's own config; "" is its own.
        self._schedulers: dict[str, SchedulerMixin] = {"": pipe.scheduler}
        # Image-to-image (and generic inpainting) share every component, and so
        # every weight, with pipe.
        checker = pipe.config.requires_safety_checker
        self.img2img = StableDiffusionImg2ImgPipeline(
            **pipe.components, requires_safety_checker=checker
        )
        # Whether load compiled pipe's UNet and VAE decoder (compile_pipeline).
        self.compiled = False
        self.dedicated_inpaint = inpaint is not None
        self.inpaint = inpaint or StableDiffusionInpaintPipeline(
            **pipe.components, requires_safety_checker=checker
        )
        for extra in (self.img2img, self.inpaint):
            extra.set_progress_bar_config(disable=True)
        #: The pipeline that runs each task (a job's ``mode``).
        self.pipelines: dict[str, DiffusionPipeline] = {
            TextToImageJob.mode: self.pipe,
            ImageToImageJob.mode: self.img2img,
            InpaintJob.mode: self.inpaint,
        }
        self._encoder = ThreadPoolExecutor(min(8, os.cpu_count() or 1), "encode")

    def scheduler_template(self, name: str) -> SchedulerMixin:
        """The scheduler called ``name`` (see imago.workers.contract.schedulers), built once
        with ``from_config`` from the model's scheduler config: same noise
        schedule and prediction type, no reload. Requests run private copies."""
        if name not in self._schedulers:
            class_name, overrides = SCHEDULERS[name]
            scheduler_class = getattr(diffusers, class_name)
            base = self._schedulers[""].config
            self._schedulers[name] = scheduler_class.from_config(base, **overrides)
        return self._schedulers[name]

    @classmethod
    def load(
        cls,
        name: str,
        source: str,
        device: str,
        settings: DeviceSettings | None = None,
        inpaint: str = "",
        taesd: str = "",
        loras: str = "",
        ip_adapter: str = "",
        **extras: str,
    ) -> StableDiffusionRunner:
        """Load ``source`` (a diffusers directory, a hub id or an ``arch:``
        source), the dedicated inpainting checkpoint ``inpaint`` and the
        preview autoencoder ``taesd`` when given, the LoRA adapters in the
        directory ``loras``, and the IP-Adapter in the directory
        ``ip_adapter`` (``image_encoder/`` and one .safetensors), all as
        ``settings`` say. With compilation on, call :meth:`warm_up` before
        serving."""
        if extras:
            raise ValueError(f"unknown extra sources for {name!r}: {', '.join(extras)}")
        settings = settings or DeviceSettings()
        dtype = torch_dtype(settings.dtype, device)
        # Its loading bar would interleave with other workers' lines in the server log.
        diffusers_logging.disable_progress_bar()
        pipe = load_pipeline(StableDiffusionPipeline, name, source, device, dtype)
        pipe.set_progress_bar_config(disable=True)
        prepare_pipeline(pipe, settings)
        dedicated = None
        if inpaint:
            dedicated = load_pipeline(StableDiffusionInpaintPipeline, name, inpaint, device, dtype)
            channels = dedicated.unet.config.in_channels
            if channels != 9:
                raise ValueError(
                    f"{inpaint!r} is not an inpainting checkpoint: its UNet takes "
                    f"{channels} channels, not 9"
                )
            prepare_pipeline(dedicated, settings)
        tiny_decoder = load_taesd(name, taesd, device, dtype) if taesd else None
        if ip_adapter:
            # Its attention processors replace those prepare_pipeline chose.
            load_ip_adapter(pipe, Path(ip_adapter), name)
        # Built after the IP-Adapter, so that every pipeline sharing the UNet
        # also gets its image encoder.
        runner = cls(name, source, pipe, dedicated, tiny_decoder)
        if loras:
            runner.lora_dir = Path(loras)
            runner.reload()
        if settings.compile != "off":
            # Last: nothing may change the modules once they are compiled.
            compile_pipeline(pipe, settings.compile)
            runner.compiled = True
        return runner

    def warm_up(self) -> None:
        """Run the text-to-image calls whose shapes requests at the default
        size bring, two steps each: one image with guidance (the UNet sees a
        batch of 2), two images (4, after which torch treats the batch size
        as dynamic and every larger batch reuses that graph) and one image
        without guidance (1, which torch always specialises on). The VAE
        decoder sees batches of 1 and 2 on the way. Outputs are dropped."""
        size = self.info().default_size
        for images, guidance in ((1, 7.5), (2, 7.5), (1, 1.0)):
            self.pipe(
                prompt=[""] * images,
                num_inference_steps=2,
                guidance_scale=guidance,
                height=size,
                width=size,
                generator=torch.Generator("cpu").manual_seed(0),
            )

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            family=self.family,
            source=self.source,
            default_size=self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor,
            max_prompt_tokens=self.pipe.tokenizer.model_max_length,
            preview_methods=self.preview_methods(),
            adapters=sorted(self.adapters),
            style_images=self.style_images,
        )

    def reload(self) -> None:
        """Load the adapters new in the adapter directory, drop those gone."""
        unets = [self.pipe] + ([self.inpaint] if self.dedicated_inpaint else [])
        self.adapters = sync_adapters(unets, self.lora_dir, self.adapters)

    def preview_methods(self) -> list[str]:
        """The preview methods this model can run beyond the default one,
        which every model runs: those whose decoder it has loaded."""
        return [
            name
            for name, method in PREVIEW_METHODS.items()
            if name != DEFAULT_PREVIEW_METHOD and method.available(self.preview_decoders)
        ]

    def run(self, batch: list[Request], sink: EventSink) -> None:
        # Requests whose batch key agrees share one pipeline call; the others
        # run in calls of their own, one group after the other in batch order.
        groups: dict[tuple | None, list[Member]] = {}
        for request in batch:
            rid, job = request.request_id, request.job
            if not isinstance(job, TextToImageJob):
                message = f"{self.name} runs image generation jobs only"
                sink.emit(Failed(rid, "INVALID_ARGUMENT", message))
                continue
            member = Member(rid, job)
            try:
                member.inputs = job_inputs(job, request.images)
            except InputError as exc:
                sink.emit(Failed(rid, "INVALID_ARGUMENT", str(exc), exc.field))
                continue
            groups.setdefault(job.batch_key(), []).append(member)
        for members in groups.values():
            try:
                self._run_group(members, sink)
            except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
                # The worker frees the memory once the batch is over.
                self._fail_unfinished(members, sink, "RESOURCE_EXHAUSTED", f"out of memory: {exc}")
            except Exception as exc:
                ids = ", ".join(member.request_id for member in members)
                logger.exception("requests %s failed", ids)
                self._fail_unfinished(members, sink, "INTERNAL", f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _fail_unfinished(members: list[Member], sink: EventSink, code: str, message: str) -> None:
        """End every member that has not had its result or failure yet."""
        for member in members:
            if not member.finished:
                member.finished = True
                sink.emit(Failed(member.request_id, code, message))

    def _interrupt_points(self, pipe: DiffusionPipeline) -> list[torch.nn.Module]:
        """The blocks of ``pipe``'s UNet and VAE decoder at which cancellation
        is checked inside a step (see :func:`.steps.interrupt_points`)."""
        # No Python hooks inside compiled modules: torch.compile would trace
        # into them, and a hook that talks to the socket breaks the graph at
        # every block (and adding or removing hooks around each call can make
        # it recompile). compile_pipeline compiles the shared UNet and VAE
        # decoder only, so a dedicated inpainting checkpoint's keep their
        # hooks; the compiled ones are checked between steps, as before.
        unet = None if self.compiled and pipe.unet is self.pipe.unet else pipe.unet
        vae = None if self.compiled and pipe.vae is self.pipe.vae else pipe.vae
        return interrupt_points(unet, vae)

    def _run_group(self, members: list[Member], sink: EventSink) -> None:
        """Run ``members`` (requests with equal batch keys) in one pipeline call."""
        for member in members:
            if sink.is_cancelled(member.request_id):
                member.finished = True
                sink.emit(Failed(member.request_id, "CANCELLED", "cancelled before it started"))
        members = [member for member in members if not member.finished]
        if not members:
            return
        # Rows follow request order, each request's images in seed order.
        job = members[0].job  # the batch key's settings agree across the group
        # Image-to-image runs only the last steps x strength of the schedule.
        steps_run = job.steps_run
        row = 0
        for member in members:
            member.row, row = row, row + member.job.num_images
            sink.emit(Started(member.request_id, total_steps=steps_run))
            notes = member.inputs.notes if member.inputs else []
            member.warnings = notes + truncation_warnings(self.pipe.tokenizer, member.job)
        rows = [(member, i) for member in members for i in range(member.job.num_images)]
        arguments: dict[str, Any] = {
            "prompt": [member.job.prompt for member, _ in rows],
            # diffusers treats a missing negative prompt as "".
            "negative_prompt": [member.job.negative_prompt for member, _ in rows],
            "num_inference_steps": job.params.steps,
            "guidance_scale": job.params.guidance_scale,
            "num_images_per_prompt": 1,
            "generator": [
                torch.Generator("cpu").manual_seed(member.job.seed + i) for member, i in rows
            ],
        }
        pipe = self.pipelines[job.mode]
        inputs = [member.inputs for member, _ in rows if member.inputs is not None]
        arguments.update(ARGUMENTS[job.mode](job, inputs))
        capture = X0Capture(self.scheduler_template(job.params.scheduler))
        reporter = StepReporter(members, steps_run, sink, capture, self.preview_decoders)
        apply_adapters(pipe, job.params.loras, self.adapters)
        if self.style_images and pipe.unet is self.pipe.unet:
            style = members[0].inputs.style if members[0].inputs else None
            # Only image-to-image decodes a style image, and only with a scale.
            scale = job.style_scale if style else 0.0
            pipe.set_ip_adapter_scale(scale)
            arguments["ip_adapter_image"] = style if scale else Image.new("RGB", (32, 32))
        try:
            with (
                _swapped_scheduler(pipe, capture.scheduler),
                reporter.interrupts(self._interrupt_points(pipe)),
            ):
                output = pipe(**arguments, callback_on_step_end=reporter)
        except Cancelled:
            return  # every member was failed as it was cancelled
        seconds = time.perf_counter() - reporter.started_at

        # A safety checker, where the checkpoint has one, blacks out what it
        # flags; say so rather than return a silent black image.
        flags = output.nsfw_content_detected or [False] * len(output.images)
        live = reporter.live()
        rows = [(member, i) for member in live for i in range(member.job.num_images)]
        # Encoding (PNG above all) costs tens of ms an image and releases the
        # GIL: the images of a batch are encoded side by side.
        pictures = [output.images[member.row + i] for member, i in rows]
        encoded = iter(self._encoder.map(self._encode, rows, pictures))
        for member in live:
            job = member.job
            end = member.row + job.num_images
            mime = mime_type(job.output.format)
            pairs = zip(output.images[member.row : end], flags[member.row : end], strict=True)
            images = [
                (
                    ImageMeta(
                        job.seed + i, mime, image.width, image.height, bool(flag), bool(flag)
                    ),
                    next(encoded),
                )
                for i, (image, flag) in enumerate(pairs)
            ]
            flagged = [i for i, (meta, _) in enumerate(images) if meta.replaced]
            warnings = list(member.warnings)
            if flagged:
                which = ", ".join(str(i) for i in flagged)
                warnings.append(
                    f"the safety checker flagged image {which}; it was replaced by a black image"
                )
            member.finished = True
            result = ImageResult(member.request_id, [meta for meta, _ in images], warnings, seconds)
            sink.emit(result, [data for _, data in images])

    def _encode(self, row: tuple[Member, int], image: Image.Image) -> bytes:
        """Image ``i`` of ``member``'s request, for ``row`` = (member, i), encoded."""
        member, i = row
        job = member.job
        text = self._parameters(job, job.seed + i)
        return encode_image(image, job.output.format, quality=job.output.quality, text=text)

    def _parameters(self, job: TextToImageJob, seed: int) -> dict[str, str] | None:
        """PNG text chunks describing how the image with ``seed`` was made."""
        if not job.output.embed_parameters:
            return None
        sampler = SAMPLER_LABELS.get(job.params.scheduler) or type(self._schedulers[""]).__name__
        return {"parameters": parameters_text(job, seed, self.name, sampler)}
