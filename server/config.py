"""Settings of one ``imago serve`` process. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imago.workers.contract.presets import (
    STABLE_DIFFUSION,
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
    # batch of a Stable Diffusion model may have; default by device.
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

    def models(self) -> tuple[ModelSpec, ...]:
        """The models to serve with their batching and device settings;
        ValueError for an unknown preset or a malformed override or option."""
        models = with_overrides(preset(self.preset), self.overrides)
        models = with_batching(models, self.max_batch_sizes, self.max_batch_delays_ms)
        return with_device_settings(models, self.device_settings)

    def watchdogs(self) -> dict[str, float]:
        """Watchdog seconds for every model served; ValueError as :func:`resolve_watchdogs`."""
        return resolve_watchdogs(self.watchdog_s, [spec.name for spec in self.models()])

    def pixel_limits(self, default: int) -> dict[str, int]:
        """Most pixels per request and batch of each Stable Diffusion model;
        ``default`` for those no ``max_pixels`` entry names. ValueError names
        a bad entry."""
        image_models = [spec.name for spec in self.models() if spec.family == STABLE_DIFFUSION]
        given = per_model(
            self.max_pixels,
            image_models,
            "--max-pixels",
            int,
            lambda n: n >= MIN_MAX_PIXELS,
            f"[MODEL=]N with N >= {MIN_MAX_PIXELS} for a Stable Diffusion model",
        )
        return {name: int(given.get(name, default)) for name in image_models}

    def weights(self) -> dict[str, float]:
        """Each model's weight in the fair share of a worker; ValueError names a bad entry."""
        names = [spec.name for spec in self.models()]
        given = per_model(
            self.model_weights,
            names,
            "--model-weight",
            float,
            lambda w: w > 0,
            "[MODEL=]W with W > 0",
        )
        return {name: given.get(name, 1.0) for name in names}


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
