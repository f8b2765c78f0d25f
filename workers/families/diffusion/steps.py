"""What happens at each denoising step of a group call: progress for every
live request, previews of each request's own image, and cancellation.

Steps are counted the way diffusers' own progress bar counts them, so the last
step is the number of steps run even for schedulers that make more model calls
than steps (PNDM repeats its first timestep; second-order schedulers call the
model twice per step).

A single step can take minutes (many large images on a CPU), so cancellation
is also checked inside steps: :meth:`StepReporter.interrupts` puts forward
pre-hooks on the coarse blocks of the UNet and the VAE decoder
(:func:`interrupt_points`) for the length of the call. Each asks the sink about
every live request, which also lets the worker send its heartbeats while a
step runs, and stops the call within a block once nobody is left.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from imago.workers.contract.jobs import TextToImageJob
from imago.workers.contract.protocol import Failed, Preview, Progress
from imago.workers.families.diffusion.inputs import JobInputs
from imago.workers.families.diffusion.previews import (
    X0Capture,
    encode_image,
    mime_type,
    preview_method,
    preview_size,
)
from imago.workers.runtime.runner import Cancelled, EventSink

#: Quality of lossy previews: they are small and short-lived, bytes matter more.
PREVIEW_QUALITY = 85


@dataclass
class Member:
    """One request of a group call and where its images sit in it."""

    request_id: str
    job: TextToImageJob
    #: Decoded input images of image-to-image and inpainting, at the output size.
    inputs: JobInputs | None = None
    #: Index of the request's image 0 among the rows of the group call.
    row: int = 0
    #: True once the request got its result or failure: it gets no more events.
    finished: bool = False
    warnings: list[str] = field(default_factory=list)


class StepReporter:
    """The pipeline's ``callback_on_step_end`` for one group call: checks
    every live request for cancellation, reports progress and sends previews.

    Steps are counted the way diffusers' own progress bar counts them, so the
    last step is ``steps`` even for schedulers that run more model calls than
    steps (PNDM repeats its first timestep; second-order schedulers call the
    model twice per step). Members share the step count: their batch key fixes it.
    """

    def __init__(
        self,
        members: list[Member],
        steps: int,
        sink: EventSink,
        capture: X0Capture,
        decoders: Mapping[str, Any],
    ) -> None:
        """``decoders`` are the model's preview decoders by role, which each
        request's preview method (see previews.PREVIEW_METHODS) draws with."""
        self.members = members
        self.steps = steps
        self.sink = sink
        self.capture = capture
        self.decoders = decoders
        self.steps_done = 0
        self.started_at = time.perf_counter()

    def live(self) -> list[Member]:
        return [member for member in self.members if not member.finished]

    def check_cancelled(self) -> list[Member]:
        """Fail with CANCELLED every live request the sink reports cancelled,
        and return those left; raise :class:`Cancelled` when none is.

        Asked at the end of every step and, through :meth:`interrupts`, at
        the start of every coarse block inside one."""
        message = f"cancelled after {self.steps_done} of {self.steps} steps"
        for member in self.live():
            if self.sink.is_cancelled(member.request_id):
                # Its rows go on being computed with the others' (dropping rows
                # mid-call is not something the pipeline supports); only its
                # events stop.
                member.finished = True
                self.sink.emit(Failed(member.request_id, "CANCELLED", message))
        live = self.live()
        if not live:
            # Nobody wants the result: skip the rest of the call, decode included.
            raise Cancelled(message)
        return live

    @contextmanager
    def interrupts(self, modules: Iterable[torch.nn.Module]) -> Iterator[None]:
        """Check for cancellation (:meth:`check_cancelled`) before each call
        of every module of ``modules`` while the block runs: a forward
        pre-hook that only reads, so outputs stay the same. The hooks are
        removed when the block ends, however it ends."""
        handles = []
        try:
            for module in modules:
                handles.append(module.register_forward_pre_hook(self._interrupt))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _interrupt(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.check_cancelled()

    def __call__(
        self, pipe: DiffusionPipeline, i: int, t: Any, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        live = self.check_cancelled()
        calls, order = pipe.num_timesteps, pipe.scheduler.order
        warmup = calls - self.steps * order
        if i == calls - 1 or (i + 1 > warmup and (i + 1) % order == 0):
            self.steps_done += 1
            elapsed = time.perf_counter() - self.started_at
            x0: torch.Tensor | None = None
            for member in live:
                if member.finished:
                    # Cancelled while an earlier member's preview was decoded
                    # (the VAE decoder's blocks check too).
                    continue
                self.sink.emit(Progress(member.request_id, self.steps_done, self.steps, elapsed))
                every = member.job.preview.every
                if every > 0 and self.steps_done % every == 0:
                    # x0 of the whole call, computed at most once per step.
                    x0 = self.capture.x0() if x0 is None else x0
                    if x0 is not None:
                        self._preview(member, x0)
        return kwargs

    def _preview(self, member: Member, x0: torch.Tensor) -> None:
        # By default the request's image 0 only, as ComfyUI does: one preview
        # stream per request. Each is shown where the final image will be, so
        # it takes the output's shape.
        job = member.job
        size = preview_size(job.params.width, job.params.height, job.preview.max_size)
        count = job.num_images if job.preview.all_images else 1
        method = preview_method(job.preview.method)
        for index in range(count):
            row = member.row + index
            picture = method.render(x0[row : row + 1], self.decoders)
            if member.finished:
                return  # cancelled while the preview was decoded: no more events
            image = picture.resize(size, Image.Resampling.BILINEAR)
            data = encode_image(image, job.preview.format, quality=PREVIEW_QUALITY)
            fmt = mime_type(job.preview.format)
            preview = Preview(
                member.request_id, self.steps_done, index, fmt, image.width, image.height
            )
            self.sink.emit(preview, [data])


def interrupt_points(
    unet: torch.nn.Module | None, vae: torch.nn.Module | None
) -> list[torch.nn.Module]:
    """The coarse blocks of ``unet`` (each down block, the mid block, each up
    block) and of ``vae``'s decoder (its mid block and up blocks), where
    :meth:`StepReporter.interrupts` checks for cancellation inside a step or
    the final decode. Either may be None for none of its blocks. A real SD
    UNet has 9, so a step is checked about 9 times; the tiny one has fewer."""
    modules: list[torch.nn.Module | None] = []
    if unet is not None:
        modules += [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    decoder = getattr(vae, "decoder", None)
    if decoder is not None:
        modules += [decoder.mid_block, *decoder.up_blocks]
    return [module for module in modules if module is not None]
