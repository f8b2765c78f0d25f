"""The jobs a worker runs: one frozen msgspec struct per kind of request, its
defaults already applied and its seeds drawn by the frontend.

Every kind answers for itself what the frontend and the workers need to know
about it, so that nothing branches on kinds:

- ``batch_key()``: what must agree for jobs to share one model call, or None
  for a job that always runs alone. Greedy and beam-search text jobs batch
  when their settings and adapter agree (the seed plays no part in them),
  whatever their prompt, question or image: caption and VQA jobs mix. Sampled
  text runs alone, because transformers draws one random stream for the whole
  batch and a seed would then no longer decide the text. Image jobs batch when
  their task and the settings that fix the latent shape and the denoising
  schedule (:class:`DiffusionParams`, scheduler included, and the strength of
  image-to-image) agree; prompts, seeds, image counts and output or preview
  formats may differ. Restyling by a style image runs alone (diffusers takes
  one style image per call). Alignment jobs all batch together: each model
  part runs once over all of a batch's inputs.
- ``weight()``: how much of a batch's ``max_batch_size`` a job takes: its
  images for image jobs, its images and texts for alignment jobs, 1 otherwise.
- ``texts``: every text the job carries (prefix, question, prompts, alignment
  texts), where test-only fault markers are looked for.
- ``cost()``: the work it asks of its model, a :class:`Cost`.

Image jobs also name the pipeline task that runs them (``mode``) and the
denoising steps it runs (``steps_run``). Torch-free: the frontend imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import msgspec

#: Pixels of the image whose one UNet evaluation is one unit of image work.
REFERENCE_PIXELS = 512 * 512


@dataclass(frozen=True)
class Cost:
    """A job's work: ``steps`` of ``step_units`` each; the ``output_images``
    it makes and their ``pixels`` (width x height x images; both 0 for jobs
    without output images).

    - image jobs: the denoising steps run; a unit is one UNet evaluation of
      one 512 x 512 image, so a step does images x (width x height / 512²) x
      passes units, passes being 2 with classifier-free guidance
      (guidance_scale > 1) and 1 without.
    - caption and VQA jobs: max_new_tokens + 1 steps (the one more for the
      image); a step decodes one token of each sequence run side by side
      (the larger of num_beams and num_return_sequences), a unit each.
    - alignment jobs: one step, a unit per image or text through its encoder
      and per pair the image-text matching head scores.
    """

    steps: int
    step_units: float
    pixels: int = 0
    output_images: int = 0
    #: What the job is, for messages: "8 images of 2048x2048, 150 steps".
    summary: str = ""

    @property
    def units(self) -> float:
        """Steps x step units: what the job weighs in its model's fair order."""
        return self.steps * self.step_units


# ---------------------------------------------------------------- text jobs


class TextSettings(msgspec.Struct, frozen=True):
    """Resolved text generation settings (defaults already applied)."""

    max_new_tokens: int
    min_new_tokens: int
    num_beams: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    num_return_sequences: int
    length_penalty: float
    seed: int


class _TextJob:
    """What caption and VQA jobs share: their ``settings`` and ``adapter``
    decide how they batch and what they cost."""

    __slots__ = ()
    settings: TextSettings
    adapter: str

    def batch_key(self) -> tuple | None:
        if self.settings.do_sample:
            return None
        # One model call runs with one adapter (or none) active.
        return ("text", msgspec.structs.replace(self.settings, seed=0), self.adapter)

    def weight(self) -> int:
        return 1

    def cost(self) -> Cost:
        settings = self.settings
        width = max(settings.num_beams, settings.num_return_sequences)
        summary = f"{settings.max_new_tokens} new tokens x {width} sequences"
        return Cost(settings.max_new_tokens + 1, width, summary=summary)


class CaptionJob(_TextJob, msgspec.Struct, tag="caption", frozen=True):
    """Caption one image (frame 0), optionally continuing ``prefix``."""

    prefix: str
    settings: TextSettings
    # Name of the loaded adapter to run with; "" for the base model.
    adapter: str = ""

    @property
    def texts(self) -> tuple[str, ...]:
        return (self.prefix,)


class VqaJob(_TextJob, msgspec.Struct, tag="vqa", frozen=True):
    """Answer ``question`` about one image (frame 0)."""

    question: str
    settings: TextSettings
    # Name of the loaded adapter to run with; "" for the base model.
    adapter: str = ""

    @property
    def texts(self) -> tuple[str, ...]:
        return (self.question,)


# ---------------------------------------------------------------- image jobs


class DiffusionParams(msgspec.Struct, frozen=True):
    """What must agree for image jobs to share one pipeline call: the output
    size in pixels, the denoising steps, the guidance scale (<= 1 disables
    classifier-free guidance), the scheduler and the LoRAs."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    # A name from imago.workers.contract.schedulers.SCHEDULERS; "" for the model's own.
    scheduler: str = ""
    # LoRA adapters to apply, as (name, weight) pairs; () for none.
    loras: tuple[tuple[str, float], ...] = ()


class OutputSpec(msgspec.Struct, frozen=True):
    """How result images are encoded: a PIL format name (PNG, JPEG, WEBP)."""

    format: str = "PNG"
    # Quality (1..100) of JPEG and WebP results.
    quality: int = 95
    # Embed the generation parameters in PNG results.
    embed_parameters: bool = True


class PreviewSpec(msgspec.Struct, frozen=True):
    """Previews while denoising: one every ``every`` steps (0: none), encoded
    as ``format`` (a PIL format name), at most ``max_size`` pixels a side."""

    every: int = 0
    format: str = "JPEG"
    max_size: int = 512
    # latent_rgb, taesd or full.
    method: str = "latent_rgb"
    # Previews of every image, or only of image 0.
    all_images: bool = False


class TextToImageJob(msgspec.Struct, tag="text_to_image", frozen=True):
    """Generate ``num_images`` images; image i uses seed ``seed + i``."""

    #: The pipeline task a worker runs the job with.
    mode: ClassVar[str] = "text_to_image"

    prompt: str
    negative_prompt: str
    params: DiffusionParams
    seed: int
    num_images: int
    output: OutputSpec = OutputSpec()
    preview: PreviewSpec = PreviewSpec()

    @property
    def steps_run(self) -> int:
        """The denoising steps the pipeline runs."""
        return self.params.steps

    @property
    def texts(self) -> tuple[str, ...]:
        return (self.prompt, self.negative_prompt)

    def batch_key(self) -> tuple | None:
        return (self.mode, self.params)

    def weight(self) -> int:
        return self.num_images

    def cost(self) -> Cost:
        params, steps = self.params, self.steps_run
        passes = 2 if params.guidance_scale > 1 else 1
        pixels = params.width * params.height * self.num_images
        images = "1 image" if self.num_images == 1 else f"{self.num_images} images"
        return Cost(
            steps,
            pixels / REFERENCE_PIXELS * passes,
            pixels=pixels,
            output_images=self.num_images,
            summary=f"{images} of {params.width}x{params.height}, {steps} steps",
        )


class ImageToImageJob(TextToImageJob, tag="image_to_image", frozen=True):
    """Redraw the init image (frame 0, resized to width x height) under the
    prompt. ``strength`` in (0, 1] is how much changes: the pipeline runs
    ``steps_run`` = int(steps x strength) of the steps."""

    mode: ClassVar[str] = "image_to_image"

    strength: float = 0.8
    # Weight of the style image (frame 1) through the IP-Adapter; 0: none.
    style_scale: float = 0.0

    @property
    def steps_run(self) -> int:
        return min(int(self.params.steps * self.strength), self.params.steps)

    def batch_key(self) -> tuple | None:
        if self.style_scale > 0:
            return None  # diffusers takes one style image per call
        return (self.mode, self.params, self.strength)


class InpaintJob(ImageToImageJob, tag="inpaint", frozen=True):
    """Repaint the white part of the mask (frame 1) over the image (frame 0),
    both resized to width x height. ``strength`` as for image-to-image; 1
    repaints the masked area from pure noise."""

    mode: ClassVar[str] = "inpaint"


# ------------------------------------------------------------ alignment jobs

#: Alignment runs each model part once over all of a batch's inputs.
_ALIGN_KEY = ("align",)


class EmbedImagesJob(msgspec.Struct, tag="embed_images", frozen=True):
    """Embed the request's ``images`` image frames."""

    images: int

    @property
    def texts(self) -> tuple[str, ...]:
        return ()

    def batch_key(self) -> tuple | None:
        return _ALIGN_KEY

    def weight(self) -> int:
        return self.images

    def cost(self) -> Cost:
        return Cost(1, self.images, summary=f"{self.images} images")


class EmbedTextsJob(msgspec.Struct, tag="embed_texts", frozen=True):
    """Embed each of ``texts``."""

    texts: tuple[str, ...]

    @property
    def images(self) -> int:
        """Image frames the job brings: none."""
        return 0

    def batch_key(self) -> tuple | None:
        return _ALIGN_KEY

    def weight(self) -> int:
        return len(self.texts)

    def cost(self) -> Cost:
        count = len(self.texts)
        return Cost(1, count, summary=f"{count} texts")


class MatchJob(msgspec.Struct, tag="match", frozen=True):
    """Score each of the ``images`` image frames against each of ``texts``;
    with ``image_text_matching``, also run the ITM head on every pair."""

    images: int
    texts: tuple[str, ...]
    image_text_matching: bool = False

    def batch_key(self) -> tuple | None:
        return _ALIGN_KEY

    def weight(self) -> int:
        return self.images + len(self.texts)

    def cost(self) -> Cost:
        pairs = self.images * len(self.texts) if self.image_text_matching else 0
        summary = f"{self.images} images x {len(self.texts)} texts"
        return Cost(1, self.images + len(self.texts) + pairs, summary=summary)


AlignJob = EmbedImagesJob | EmbedTextsJob | MatchJob
ImageJob = TextToImageJob | ImageToImageJob | InpaintJob
Job = CaptionJob | VqaJob | ImageJob | AlignJob
