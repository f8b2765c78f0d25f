"""Settings of one ``imago serve`` process. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from imago.server.admission import default_max_pixels
from imago.server.devices import detect_devices
from imago.workers.contract.families import makes_images
from imago.workers.contract.presets import (
    ModelSpec,
    per_model,
    preset,
    with_batching,
    with_overrides,
)
from imago.workers.contract.settings import SettingEntries, with_device_settings

MiB = 1024 * 1024
#: Seconds a busy worker may report nothing before it is restarted, unless
#: ``--watchdog-s`` says otherwise.
DEFAULT_WATCHDOG_S = 300.0
#: Smallest --max-pixels: one image of the smallest size a request may ask for.
MIN_MAX_PIXELS = 64 * 64


@dataclass(frozen=True)
class Limits:
    """Bounds the frontend enforces on every request, before queueing."""

    # Largest gRPC message either way; a 24-megapixel PNG is ~40 MiB.
    max_message_bytes: int = 64 * MiB
    # Largest decoded input image, in pixels (width x height).
    max_input_pixels: int = 40_000_000
    # Longest side of an input image, in pixels.
    max_input_side: int = 12_000
    max_new_tokens: int = 256
    max_beams: int = 16
    max_return_sequences: int = 16
    max_prompt_chars: int = 4_000
    max_image_side: int = 2048
    max_steps: int = 150
    max_images_per_request: int = 8
    # Images and texts in one alignment request, and image-text pairs one
    # Match may run the ITM head on.
    max_align_images: int = 32
    max_align_texts: int = 256
    max_match_pairs: int = 1024
    # Requests waiting per model before new ones are turned away.
    max_queue_size: int = 256
    # Items of one bulk stream in flight at once; past it the stream is not read.
    max_stream_inflight: int = 64


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``imago serve`` needs to start."""

    preset: str = "tiny"
    # "family=source" entries that replace the preset's model of that family.
    overrides: tuple[str, ...] = ()
    # "[MODEL=]N" entries overriding the family's max_batch_size (all models without MODEL=).
    max_batch_sizes: tuple[str, ...] = ()
    # "[MODEL=]MS" entries overriding the family's max_batch_delay_ms.
    max_batch_delays_ms: tuple[str, ...] = ()
    # Per-model device options (--dtype, --compile, ...) as given.
    device_settings: SettingEntries = field(default_factory=SettingEntries)
    host: str = "0.0.0.0"
    port: int = 50051
    # CPU worker processes when no CUDA device is present (one per device otherwise).
    workers: int = 1
    # Force CPU workers even when CUDA devices are visible.
    cpu_only: bool = False
    cache_dir: Path | None = None
    # Seconds a worker may take to load its models before start-up fails.
    load_timeout_s: float = 600.0
    limits: Limits = field(default_factory=Limits)
    # Port of the Prometheus /metrics endpoint (on ``host``); None: none.
    metrics_port: int | None = None
    # Log lines as "text" or as one JSON object per line ("json").
    log_format: str = "text"
    # Seconds in-flight requests get to finish after SIGTERM before they are cancelled.
    drain_grace_s: float = 30.0
    # Seconds after which a client connection is asked to go (GOAWAY) once its
    # calls end, so that balancing clients re-resolve and find new servers;
    # None: connections live as long as clients keep them.
    max_connection_age_s: float | None = None
    # "[MODEL=]SECONDS" entries: a busy worker that reports nothing for this
    # long on MODEL's batch (on every model's, without MODEL=) is killed and
    # restarted. Later entries win.
    watchdog_s: tuple[str, ...] = ()
    # "[MODEL=]N" entries: most pixels (width x height x images) a request or
    # batch of an image model (one whose family answers the ImageGenService) may
    # have; default by device.
    max_pixels: tuple[str, ...] = ()
    # "[MODEL=]W" entries: each model's share of the workers it shares with
    # other models, relative to the others' (1 when unnamed).
    model_weights: tuple[str, ...] = ()
    # TLS: the server's certificate chain and private key (PEM files). With
    # ``tls_client_ca`` clients must present a certificate it signed (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # A file holding the bearer token every call must carry; None: no token.
    auth_token_file: Path | None = None
    # Whether health checks and reflection need the token too (off by default,
    # so that probes and grpcurl's listing work without it).
    auth_health: bool = False

    def resolve(self, devices: Sequence[str] | None = None) -> ResolvedConfig:
        """Every entry parsed, once: the configuration the server runs with.

        ``devices`` are the workers' devices, one per worker ("cuda:N" or
        "cpu"); None detects them as the server does at start (one per visible
        GPU, else ``workers`` CPU workers). ValueError names the option and
        the entry at fault: an unknown preset, a malformed ``--model``,
        batching, device, ``--watchdog-s``, ``--max-pixels`` or
        ``--model-weight`` entry, checked in that order."""
        models = with_overrides(preset(self.preset), self.overrides)
        models = with_batching(models, self.max_batch_sizes, self.max_batch_delays_ms)
        models = with_device_settings(models, self.device_settings)
        names = [spec.name for spec in models]
        watchdogs = resolve_watchdogs(self.watchdog_s, names)
        # Detected only once the model entries are known to be good, so that
        # a usage error is reported without asking the GPUs first.
        if devices is None:
            devices = detect_devices(self.workers, self.cpu_only)
        devices = tuple(devices)
        pixels = resolve_pixel_limits(self.max_pixels, models, default_max_pixels(list(devices)))
        weights = resolve_weights(self.model_weights, names)
        return ResolvedConfig(
            given=self,
            devices=devices,
            models=models,
            watchdogs=MappingProxyType(watchdogs),
            pixel_limits=MappingProxyType(pixels),
            weights=MappingProxyType(weights),
        )


@dataclass(frozen=True)
class ResolvedConfig:
    """A :class:`ServeConfig` with its entries parsed: what the server runs
    with. Built once, by :meth:`ServeConfig.resolve`, before anything starts;
    its mappings are read-only, and nothing parses an entry after it."""

    # The settings as given: address, limits, timeouts, TLS, logging. Their
    # "[MODEL=]VALUE" entries are resolved into the fields below.
    given: ServeConfig
    # The workers' devices, one per worker: "cuda:N" or "cpu".
    devices: tuple[str, ...]
    # The models served, with their batching and device settings applied.
    models: tuple[ModelSpec, ...]
    # Seconds a busy worker may report nothing on each model's batch.
    watchdogs: Mapping[str, float]
    # Most pixels (width x height x images) a request or batch may have, for
    # each image model; the default suits ``devices``.
    pixel_limits: Mapping[str, int]
    # Each model's weight in the fair share of a worker it shares (1 unless given).
    weights: Mapping[str, float]


def resolve_watchdogs(
    entries: tuple[str, ...], models: list[str], default_s: float = DEFAULT_WATCHDOG_S
) -> dict[str, float]:
    """Seconds per model from "[MODEL=]SECONDS" entries: a bare one sets every
    model, later entries win, models no entry names keep ``default_s``.
    ValueError names an entry with an unknown model or a SECONDS that is not a
    finite number above zero."""
    given = per_model(
        entries, models, "watchdog", float, lambda s: s > 0, "[MODEL=]SECONDS with SECONDS > 0"
    )
    seconds = {**dict.fromkeys(models, default_s), **given}
    return seconds


def resolve_pixel_limits(
    entries: tuple[str, ...], models: tuple[ModelSpec, ...], default: int
) -> dict[str, int]:
    """Most pixels per request and batch of each image model of ``models``
    (one whose family answers the ImageGenService, i.e. Stable Diffusion) from
    "[MODEL=]N" entries (``--max-pixels``); ``default`` for those no entry
    names. ValueError names an entry with a model that is not an image model
    or an N below :data:`MIN_MAX_PIXELS`."""
    image_models = [spec.name for spec in models if makes_images(spec.family)]
    given = per_model(
        entries,
        image_models,
        "--max-pixels",
        int,
        lambda n: n >= MIN_MAX_PIXELS,
        f"[MODEL=]N with N >= {MIN_MAX_PIXELS} for a Stable Diffusion model",
    )
    return {name: int(given.get(name, default)) for name in image_models}


def resolve_weights(entries: tuple[str, ...], models: list[str]) -> dict[str, float]:
    """Each model's weight in the fair share of a worker from "[MODEL=]W"
    entries (``--model-weight``), 1 for models no entry names; ValueError
    names an entry with an unknown model or a W that is not above zero."""
    given = per_model(
        entries, models, "--model-weight", float, lambda w: w > 0, "[MODEL=]W with W > 0"
    )
    return {name: given.get(name, 1.0) for name in models}
