"""Messages between the frontend and worker processes.

Every message is a msgspec struct encoded with msgpack: the first frame of a
ZeroMQ multipart message. Image bytes ride along as the following frames,
exactly as the client sent them (no re-encoding, no pickle). This module must
stay free of torch so that the frontend can import it. The jobs themselves
are in :mod:`imago.workers.contract.jobs`.
"""

from __future__ import annotations

import msgspec

from imago.workers.contract.jobs import Job


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

    @classmethod
    def of(
        cls, request_id: str, texts: list[GeneratedText], seed: int, inference_seconds: float
    ) -> TextResult:
        """The result of ``texts``, its ``tokens`` the sum of theirs."""
        return cls(request_id, texts, seed, inference_seconds, sum(t.tokens for t in texts))


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
