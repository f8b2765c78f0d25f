"""What a request costs a worker, and how long a model takes for it.

A job runs in *steps* (denoising steps, or new tokens), each of which does
some *step units* of work for it:

- image jobs: steps run; a unit is one UNet evaluation of one 512 x 512
  image, so a step does images x (width x height / 512²) x passes units,
  passes being 2 with classifier-free guidance (guidance_scale > 1) and 1
  without.
- caption and VQA jobs: max_new_tokens + 1 steps (the one more for the
  image); a step decodes one token of each sequence run side by side (the
  larger of num_beams and num_return_sequences), a unit each.
- alignment jobs: one step, a unit per image or text through its encoder
  and per pair the image-text matching head scores.

A job's *units* (steps x step units) are what it weighs in the fair order
of its model's queue.

:class:`StepTimes` learns each model's seconds per step as an affine
function of the step units in it, ``a + b x units``, from the last
:data:`StepTimes.WINDOW` batches the model finished. A batch's seconds per
step are measured between its first and last progress report where it sends
them (Stable Diffusion), which leaves out encoding prompts, decoding and
encoding images and the first step's warm-up; otherwise they are its seconds
over its steps. ``a`` holds what a step costs whatever its size (kernel
launches, Python), ``b`` what each unit adds. The fit is robust (the median
of the slopes between batches of clearly different sizes, and the median
intercept), both are kept at zero or above, and while no two batches differed
enough in size, all of the time is put in ``a``: that can under-estimate
larger requests, never refuse one that would have fitted. Torch-free.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from imago.workers.contract.protocol import (
    CaptionJob,
    EmbedImagesJob,
    EmbedTextsJob,
    ImageToImageJob,
    Job,
    MatchJob,
    TextToImageJob,
    VqaJob,
)

#: Pixels of the image whose one UNet evaluation is one unit of image work.
REFERENCE_PIXELS = 512 * 512


@dataclass(frozen=True)
class Cost:
    """A job's work: ``steps`` of ``step_units`` each, and its ``pixels``
    (width x height x images; 0 for jobs without output images)."""

    steps: int
    step_units: float
    pixels: int = 0
    #: What the job is, for messages: "8 images of 2048x2048, 150 steps".
    summary: str = ""

    @property
    def units(self) -> float:
        return self.steps * self.step_units


def cost_of(job: Job) -> Cost:
    """The work ``job`` asks of its model, as the module describes."""
    if isinstance(job, TextToImageJob):
        steps = job.steps_run if isinstance(job, ImageToImageJob) else job.steps
        passes = 2 if job.guidance_scale > 1 else 1
        pixels = job.width * job.height * job.num_images
        step_units = pixels / REFERENCE_PIXELS * passes
        images = "1 image" if job.num_images == 1 else f"{job.num_images} images"
        summary = f"{images} of {job.width}x{job.height}, {steps} steps"
        return Cost(steps, step_units, pixels, summary)
    if isinstance(job, CaptionJob | VqaJob):
        settings = job.settings
        width = max(settings.num_beams, settings.num_return_sequences)
        summary = f"{settings.max_new_tokens} new tokens x {width} sequences"
        return Cost(settings.max_new_tokens + 1, width, summary=summary)
    if isinstance(job, EmbedImagesJob):
        return Cost(1, job.images, summary=f"{job.images} images")
    if isinstance(job, EmbedTextsJob):
        count = len(job.texts)
        return Cost(1, count, summary=f"{count} texts")
    if isinstance(job, MatchJob):
        count = job.images + len(job.texts)
        pairs = job.images * len(job.texts) if job.image_text_matching else 0
        summary = f"{job.images} images x {len(job.texts)} texts"
        return Cost(1, count + pairs, summary=summary)
    raise TypeError(f"no cost for {type(job).__name__}")


@dataclass(frozen=True)
class StepTime:
    """Seconds per step: ``overhead_s`` + ``per_unit_s`` x step units."""

    overhead_s: float
    per_unit_s: float

    def step_seconds(self, step_units: float) -> float:
        return self.overhead_s + self.per_unit_s * step_units

    def seconds(self, cost: Cost) -> float:
        """Estimated seconds for ``cost`` run alone."""
        return cost.steps * self.step_seconds(cost.step_units)


class StepTimes:
    """Each model's :class:`StepTime`, fitted to the batches it finished."""

    #: Batches remembered per model.
    WINDOW = 32

    def __init__(self) -> None:
        self._seen: dict[str, deque[tuple[float, float]]] = {}

    def observe(self, model: str, costs: list[Cost], step_seconds: float) -> None:
        """One step of a batch of requests costing ``costs`` took
        ``step_seconds`` on ``model``."""
        units = sum(cost.step_units for cost in costs)
        if units > 0 and step_seconds > 0:
            seen = self._seen.setdefault(model, deque(maxlen=self.WINDOW))
            seen.append((units, step_seconds))

    def of(self, model: str) -> StepTime | None:
        """``model``'s step time; None before it finished a batch."""
        seen = self._seen.get(model)
        if not seen:
            return None
        return fit([units for units, _ in seen], [step_s for _, step_s in seen])


#: Batches whose step units differ by less than this factor give no slope.
SLOPE_SPREAD = 1.5


def fit(units: list[float], step_s: list[float]) -> StepTime:
    """A robust fit of ``step_s ≈ a + b x units`` with ``a, b >= 0``: ``b`` is
    the median slope between points whose units differ by a factor of at
    least :data:`SLOPE_SPREAD` (0 without such a pair), ``a`` the median of
    ``step_s - b x units``."""
    points = sorted(zip(units, step_s, strict=True))
    slopes = [
        (s2 - s1) / (u2 - u1)
        for i, (u1, s1) in enumerate(points)
        for u2, s2 in points[i + 1 :]
        if u2 >= u1 * SLOPE_SPREAD
    ]
    slope = max(0.0, statistics.median(slopes)) if slopes else 0.0
    overhead = statistics.median(s - slope * u for u, s in points)
    return StepTime(max(0.0, overhead), slope)
