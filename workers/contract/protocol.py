"""Messages between the frontend and worker processes.

Every message is a msgspec struct encoded with msgpack: the first frame of a
ZeroMQ multipart message. Image bytes ride along as the following frames,
exactly as the client sent them (no re-encoding, no pickle). This module must
stay free of torch so that the frontend can import it.
"""

from __future__ import annotations

import msgspec

# ---------------------------------------------------------------- job specs


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


class CaptionJob(msgspec.Struct, tag="caption", frozen=True):
    """Caption one image (frame 0), optionally continuing ``prefix``."""

    prefix: str
    settings: TextSettings
    # Name of the loaded adapter to run with; "" for the base model.
    adapter: str = ""


class VqaJob(msgspec.Struct, tag="vqa", frozen=True):
    """Answer ``question`` about one image (frame 0)."""

    question: str
    settings: TextSettings
    # Name of the loaded adapter to run with; "" for the base model.
    adapter: str = ""


class TextToImageJob(msgspec.Struct, tag="text_to_image", frozen=True):
    """Generate ``num_images`` images; image i uses seed ``seed + i``.

    Sizes are in pixels; ``guidance_scale`` <= 1 disables classifier-free
    guidance. Output and preview formats are PIL format names (PNG, JPEG, WEBP).
    """

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    output_format: str
    preview_every: int
    preview_format: str
    preview_max_size: int
    # A name from imago.workers.contract.schedulers.SCHEDULERS; "" for the model's own.
    scheduler: str = ""
    # Quality (1..100) of JPEG and WebP results.
    output_quality: int = 95
    # Embed the generation parameters in PNG results.
    embed_parameters: bool = True
    # latent_rgb, taesd or full; previews of every image or only image 0.
    preview_method: str = "latent_rgb"
    preview_all_images: bool = False
    # LoRA adapters to apply, as (name, weight) pairs; () for none.
    loras: tuple[tuple[str, float], ...] = ()


class ImageToImageJob(TextToImageJob, tag="image_to_image", frozen=True):
    """Redraw the init image (frame 0, resized to ``width`` x ``height``) under
    the prompt. ``strength`` in (0, 1] is how much changes: the pipeline runs
    ``steps_run`` = int(steps x strength) of the ``steps``."""

    strength: float = 0.8
    # Weight of the style image (frame 1) through the IP-Adapter; 0: none.
    style_scale: float = 0.0

    @property
    def steps_run(self) -> int:
        return min(int(self.steps * self.strength), self.steps)


class InpaintJob(ImageToImageJob, tag="inpaint", frozen=True):
    """Repaint the white part of the mask (frame 1) over the image (frame 0),
    both resized to ``width`` x ``height``. ``strength`` as for image-to-image;
    1 repaints the masked area from pure noise."""


class EmbedImagesJob(msgspec.Struct, tag="embed_images", frozen=True):
    """Embed the request's ``images`` image frames."""

    images: int


class EmbedTextsJob(msgspec.Struct, tag="embed_texts", frozen=True):
    """Embed each of ``texts``."""

    texts: tuple[str, ...]


class MatchJob(msgspec.Struct, tag="match", frozen=True):
    """Score each of the ``images`` image frames against each of ``texts``;
    with ``image_text_matching``, also run the ITM head on every pair."""

    images: int
    texts: tuple[str, ...]
    image_text_matching: bool = False


AlignJob = EmbedImagesJob | EmbedTextsJob | MatchJob
Job = CaptionJob | VqaJob | TextToImageJob | ImageToImageJob | InpaintJob | AlignJob


def batch_key(job: Job) -> tuple | None:
    """What must agree for jobs to share one model call, or None for a job that
    always runs alone.

    Greedy and beam-search text jobs batch when their settings and adapter
    agree (the seed plays no part in them), whatever their prompt, question or
    image: caption and VQA jobs mix. Sampled text runs alone, because transformers draws one
    random stream for the whole batch and a seed would then no longer decide
    the text. Image jobs batch when the settings that fix the latent shape and
    the denoising schedule (scheduler included) agree; prompts, seeds, image counts and output or
    preview formats may differ.
    """
    if isinstance(job, AlignJob):
        # Alignment runs each model part once over all of a batch's inputs.
        return ("align",)
    if isinstance(job, CaptionJob | VqaJob):
        if job.settings.do_sample:
            return None
        # One model call runs with one adapter (or none) active.
        return ("text", msgspec.structs.replace(job.settings, seed=0), job.adapter)
    if isinstance(job, ImageToImageJob):
        if job.style_scale > 0:
            return None  # diffusers takes one style image per call
        return (
            "inpaint" if isinstance(job, InpaintJob) else "image_to_image",
            job.width,
            job.height,
            job.steps,
            job.strength,
            job.guidance_scale,
            job.scheduler,
            job.loras,
        )
    if isinstance(job, TextToImageJob):
        return (
            "text_to_image",
            job.width,
            job.height,
            job.steps,
            job.guidance_scale,
            job.scheduler,
            job.loras,
        )
    return None


def batch_weight(job: Job) -> int:
    """How much of a batch's ``max_batch_size`` a job takes: its images for
    image jobs, its images and texts for alignment jobs, 1 otherwise."""
    if isinstance(job, TextToImageJob):
        return job.num_images
    if isinstance(job, EmbedImagesJob):
        return job.images
    if isinstance(job, EmbedTextsJob):
        return len(job.texts)
    if isinstance(job, MatchJob):
        return job.images + len(job.texts)
    return 1


class WorkItem(msgspec.Struct, frozen=True):
    """One request inside a batch. ``frames`` counts its image frames."""

    request_id: str
    job: Job
    frames: int = 0


# ---------------------------------------------------- frontend -> worker


class RunBatch(msgspec.Struct, tag="run_batch", frozen=True):
    """Run ``items`` together on ``model``. Frames follow in item order."""

    batch_id: int
    model: str
    items: list[WorkItem]


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    """Stop these requests at the next step boundary."""

    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    pass


class ReloadAdapters(msgspec.Struct, tag="reload_adapters", frozen=True):
    """Rescan adapter directories between batches; answered by AdaptersReloaded."""


ToWorker = RunBatch | Cancel | Shutdown | ReloadAdapters

# ---------------------------------------------------- worker -> frontend


class ModelInfo(msgspec.Struct, frozen=True):
    """What the frontend needs to know about a loaded model to validate input."""

    name: str
    family: str
    source: str
    # Native output size in pixels for image models, 0 otherwise.
    default_size: int = 0
    # Longest prompt in tokens the text encoder takes, 0 when unknown.
    max_prompt_tokens: int = 0
    # Preview methods this model can run beyond latent_rgb (taesd, full).
    preview_methods: list[str] = []
    # Names of the adapters loaded (LoRAs for image models, peft adapters for
    # BLIP-2), which requests may apply.
    adapters: list[str] = []
    # Whether an IP-Adapter is loaded, so image-to-image takes a style image.
    style_images: bool = False
    # Whether an alignment model has an image-text matching (ITM) head.
    image_text_matching: bool = False


class Ready(msgspec.Struct, tag="ready", frozen=True):
    worker_id: str
    device: str
    pid: int
    models: list[ModelInfo]


class AdaptersReloaded(msgspec.Struct, tag="adapters_reloaded", frozen=True):
    """The worker's models after an adapter reload (``error`` when it failed)."""

    worker_id: str
    models: list[ModelInfo]
    error: str = ""


class LoadFailed(msgspec.Struct, tag="load_failed", frozen=True):
    worker_id: str
    message: str


class Started(msgspec.Struct, tag="started", frozen=True):
    request_id: str
    total_steps: int = 0


class Progress(msgspec.Struct, tag="progress", frozen=True):
    request_id: str
    step: int
    total_steps: int
    elapsed_seconds: float


class Preview(msgspec.Struct, tag="preview", frozen=True):
    """A preview image; one frame follows."""

    request_id: str
    step: int
    image_index: int
    mime_type: str
    width: int
    height: int


class GeneratedText(msgspec.Struct, frozen=True):
    text: str
    score: float | None = None
    # New tokens generated for this sequence, its end of text included and the
    # padding after it not.
    tokens: int = 0


class TextResult(msgspec.Struct, tag="text_result", frozen=True):
    request_id: str
    texts: list[GeneratedText]
    seed: int
    inference_seconds: float
    # New tokens generated for the request, all its sequences together.
    tokens: int = 0


class ImageMeta(msgspec.Struct, frozen=True):
    seed: int
    mime_type: str
    width: int
    height: int
    nsfw_detected: bool = False
    replaced: bool = False


class ImageResult(msgspec.Struct, tag="image_result", frozen=True):
    """Finished images; one frame per entry of ``images`` follows."""

    request_id: str
    images: list[ImageMeta]
    warnings: list[str]
    inference_seconds: float


class ArrayMeta(msgspec.Struct, frozen=True):
    """Name and shape of a float32 array whose bytes (row-major, little-endian)
    travel as one frame."""

    name: str
    shape: tuple[int, ...]


class ArraysResult(msgspec.Struct, tag="arrays_result", frozen=True):
    """Numeric results (embeddings, score matrices); one frame per entry of
    ``arrays`` follows."""

    request_id: str
    arrays: list[ArrayMeta]
    inference_seconds: float


class Failed(msgspec.Struct, tag="failed", frozen=True):
    """A request ended without a result. ``code`` is a grpc.StatusCode name."""

    request_id: str
    code: str
    message: str
    # Request field at fault ("generation.max_new_tokens"), when there is one.
    field: str = ""


class BatchDone(msgspec.Struct, tag="batch_done", frozen=True):
    """The worker finished ``batch_id`` and is free for the next one, after
    ``seconds`` of wall time on it (0 when not measured)."""

    batch_id: int
    seconds: float = 0.0


class Heartbeat(msgspec.Struct, tag="heartbeat", frozen=True):
    """The worker is alive and making progress: sent about once a second while
    idle, after every batch, and between the steps of a long model call. It
    carries the process's resident memory and, on an accelerator, the memory
    torch's tensors hold there now, the most they have held since the worker
    started, and what torch's caching allocator has reserved from the device
    (what other processes cannot have); all in bytes, the device's 0 on cpu."""

    resident_bytes: int = 0
    device_bytes: int = 0
    device_peak_bytes: int = 0
    device_reserved_bytes: int = 0


FromWorker = Ready | AdaptersReloaded | LoadFailed | Started | Progress | Preview
FromWorker = FromWorker | TextResult | ImageResult | ArraysResult | Failed | BatchDone
FromWorker = FromWorker | Heartbeat
#: Messages that end a request.
Outcome = TextResult | ImageResult | ArraysResult | Failed

_encoder = msgspec.msgpack.Encoder()
to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)
