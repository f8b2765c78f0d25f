"""``imago serve``: its arguments, the ServeConfig they make, and running it.

The server package is imported only when a server runs, so the rest of the
command line stays light.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from imago.client.cli.argtypes import port, positive, positive_float, uint
from imago.workers.contract.families import FAMILIES

MiB = 1024 * 1024


def _family_batch_sizes() -> str:
    """Each family's default max batch size, e.g. "32 for BLIP-2, 4 for Stable Diffusion"."""
    return ", ".join(
        f"{info.batching.max_batch_size} for {info.title}" for info in FAMILIES.values()
    )


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to ``sub`` (an argparse subparsers action)."""
    p = sub.add_parser("serve", help="run a server", description="Run an imago server.")
    p.add_argument("--preset", help="model set to load (default: tiny)")
    p.add_argument("--host", help="address to listen on (default: 0.0.0.0)")
    p.add_argument("--port", type=port, default=50051, help="gRPC port (default: %(default)s)")
    p.add_argument("--workers", type=uint, metavar="N", help="CPU worker processes (default: 1)")
    p.add_argument("--cpu", action="store_true", help="use CPU workers even if CUDA is present")
    p.add_argument(
        "--max-message-mb",
        type=uint,
        default=64,
        metavar="MB",
        help="largest gRPC message either way, in MiB (default: %(default)s)",
    )
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="where models are cached")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="FAMILY=SOURCE",
        help=f"serve SOURCE (hub id or directory) for FAMILY ({', '.join(FAMILIES)}) "
        "instead of the preset's; inpaint=SOURCE names a dedicated inpainting checkpoint, "
        "inpaint= none; repeatable",
    )
    p.add_argument(
        "--lora-dir",
        type=Path,
        metavar="DIR",
        help="load the LoRA adapters DIR/NAME.safetensors for the Stable Diffusion model; "
        "SIGHUP re-reads the directory",
    )
    p.add_argument(
        "--caption-adapter-dir",
        type=Path,
        metavar="DIR",
        help="load the adapter folders DIR/NAME/ (peft, as imago finetune caption writes them) "
        "for the BLIP-2 model; SIGHUP re-reads the directory",
    )
    p.add_argument(
        "--max-batch-size",
        action="append",
        default=[],
        metavar="[MODEL=]N",
        help="most requests per batch (images for image models) for MODEL, or for every "
        f"model without MODEL=; repeatable (default: {_family_batch_sizes()})",
    )
    p.add_argument(
        "--max-batch-delay-ms",
        action="append",
        default=[],
        metavar="[MODEL=]MS",
        help="longest a request under load waits for batch companions; 0 never waits; "
        "repeatable like --max-batch-size (default: 20)",
    )
    p.add_argument(
        "--max-queue", type=positive, metavar="N", help="waiting requests per model (default: 256)"
    )
    p.add_argument(
        "--metrics-port", type=port, metavar="PORT", help="serve Prometheus /metrics on PORT"
    )
    p.add_argument(
        "--drain-grace-s",
        type=float,
        metavar="SECONDS",
        help="after SIGTERM, how long in-flight requests may take to finish (default: 30)",
    )
    p.add_argument(
        "--load-timeout-s",
        type=positive_float,
        metavar="SECONDS",
        help="longest a worker may take to load its models, compilation and warm-up "
        "included, before start-up fails (default: 600)",
    )
    p.add_argument(
        "--max-connection-age-s",
        type=positive_float,
        metavar="SECONDS",
        help="ask clients to reconnect after SECONDS (calls running then finish), so that "
        "round_robin clients of a scaled deployment find new servers (default: never)",
    )
    p.add_argument(
        "--watchdog-s",
        action="append",
        default=[],
        metavar="[MODEL=]SECONDS",
        help="restart a busy worker that reports nothing for this long on MODEL (on every "
        "model without MODEL=); repeatable (default: 300)",
    )
    p.add_argument(
        "--max-pixels",
        action="append",
        default=[],
        metavar="[MODEL=]N",
        help="most pixels (width x height x images) one request or batch of a Stable "
        "Diffusion model may have; repeatable (default: 2097152 on CPU workers, 16777216 "
        "on GPUs)",
    )
    p.add_argument(
        "--model-weight",
        action="append",
        default=[],
        metavar="[MODEL=]W",
        help="MODEL's share of a worker's time when several models wait for it, relative "
        "to the others'; repeatable (default: 1 each)",
    )
    add_device_options(p)
    tls = p.add_argument_group("security")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain")
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    tls.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS)",
    )
    tls.add_argument(
        "--auth-token-file",
        type=Path,
        metavar="FILE",
        help="require 'authorization: Bearer TOKEN' with the token this file holds",
    )
    tls.add_argument(
        "--auth-health",
        action="store_true",
        help="require the token for health checks and reflection too",
    )
    levels = ["debug", "info", "warning", "error"]
    p.add_argument("--log-level", default="info", choices=levels, help="(default: info)")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="(default: text)")
    p.set_defaults(func=run_serve)
    return p


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """The per-model device options: each "[MODEL=]VALUE", for MODEL or for
    every model it applies to without MODEL=, repeatable, later ones winning."""
    group = parser.add_argument_group(
        "device settings ([MODEL=]VALUE, repeatable; without MODEL= for every model)"
    )
    group.add_argument(
        "--dtype",
        action="append",
        default=[],
        metavar="[MODEL=]auto|fp32|fp16|bf16",
        help="precision of weights and activations (default: auto, fp16 on CUDA, fp32 on CPU)",
    )
    group.add_argument(
        "--attention",
        action="append",
        default=[],
        metavar="[MODEL=]sdpa|eager",
        help="attention kernel: PyTorch's scaled_dot_product_attention or plain "
        "matmul-softmax-matmul (default: sdpa)",
    )
    switches = {
        "--channels-last": "Stable Diffusion: store UNet and VAE weights NHWC",
        "--vae-slicing": "Stable Diffusion: decode a batch one image at a time (less memory)",
        "--vae-tiling": "Stable Diffusion: decode large images in tiles (less memory)",
    }
    for flag, text in switches.items():
        group.add_argument(
            flag,
            action="append",
            default=[],
            nargs="?",
            const="on",
            metavar="[MODEL=]on|off",
            help=f"{text}; alone it means on (default: off)",
        )
    group.add_argument(
        "--compile",
        action="append",
        default=[],
        nargs="?",
        const="default",
        metavar="[MODEL=]MODE",
        help="Stable Diffusion: torch.compile the UNet and VAE decoder in MODE (default, "
        "reduce-overhead, max-autotune, max-autotune-no-cudagraphs; off), warmed up before "
        "the server reports ready; alone it means default (default: off)",
    )


def serve_config(args: argparse.Namespace) -> Any:
    """The ``ServeConfig`` of ``imago serve`` arguments; unset ones keep its defaults."""
    from imago.server.config import Limits, ServeConfig
    from imago.workers.contract.settings import SettingEntries

    keys = (
        "preset", "host", "port", "workers", "cache_dir", "metrics_port", "drain_grace_s",
        "max_connection_age_s", "load_timeout_s", "tls_cert", "tls_key", "tls_client_ca",
        "auth_token_file",
    )  # fmt: skip
    kwargs = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    limits = {"max_message_bytes": args.max_message_mb * MiB}
    if args.max_queue is not None:
        limits["max_queue_size"] = args.max_queue
    # Adapter directories are extras of their model, as --model ROLE=DIR gives them.
    overrides = tuple(args.model)
    if args.lora_dir:
        overrides += (f"loras={args.lora_dir}",)
    if args.caption_adapter_dir:
        overrides += (f"adapters={args.caption_adapter_dir}",)
    return ServeConfig(
        **kwargs,
        overrides=overrides,
        max_batch_sizes=tuple(args.max_batch_size),
        max_batch_delays_ms=tuple(args.max_batch_delay_ms),
        device_settings=SettingEntries(
            **{key: tuple(getattr(args, key)) for key in SettingEntries.__dataclass_fields__}
        ),
        cpu_only=args.cpu,
        limits=Limits(**limits),
        watchdog_s=tuple(args.watchdog_s),
        max_pixels=tuple(args.max_pixels),
        model_weights=tuple(args.model_weight),
        auth_health=args.auth_health,
        log_format=args.log_format,
    )


def run_serve(args: argparse.Namespace) -> int:
    from imago.workers.contract.logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    try:
        # Every entry is parsed here, once: a bad one is a usage error before
        # anything starts, and the server runs with what this resolves.
        config = serve_config(args).resolve()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from imago.server.app import run

    return int(run(config) or 0)
