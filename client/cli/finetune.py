"""``imago finetune``: train an adapter from a folder of images with text.

``imago finetune imagegen`` trains a LoRA on Stable Diffusion's UNet and
writes ``NAME.safetensors`` (diffusers' LoRA format) for ``imago serve
--lora-dir``; ``imago finetune caption`` trains BLIP-2 with its vision encoder
frozen and writes the adapter folder ``NAME/`` for ``imago serve
--caption-adapter-dir``. Training runs in this process, on the first GPU when
there is one; torch is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from imago.client.cli.argtypes import positive, positive_float, uint
from imago.workers.contract.families import BLIP2, STABLE_DIFFUSION

CAPTION_PARTS = ("qformer", "lora", "both")


def add_finetune_parser(sub: Any) -> None:
    """Add ``finetune imagegen`` and ``finetune caption`` to ``sub``."""
    parser = sub.add_parser(
        "finetune", help="train an adapter on your images", description=__doc__.split("\n\n")[1]
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)

    p = kinds.add_parser(
        "imagegen",
        help="LoRA for Stable Diffusion",
        description="Train a LoRA on the UNet's attention projections and write it as "
        "OUT (NAME.safetensors, diffusers' format): copy it into the server's --lora-dir "
        "and ask for it as loras=[NAME].",
    )
    _common(p, STABLE_DIFFUSION, default_steps=500, default_lr=1e-4)
    p.add_argument(
        "--resolution",
        type=positive,
        default=512,
        metavar="PIXELS",
        help="square side images are cropped and resized to (default: %(default)s; the "
        "tiny model trains at 64)",
    )
    p.set_defaults(func=_run_imagegen)

    p = kinds.add_parser(
        "caption",
        help="BLIP-2 with the vision encoder frozen",
        description="Train BLIP-2's Q-Former and language projection and/or a LoRA on the "
        "language model's attention, with the vision encoder frozen, and write the adapter "
        "folder OUT (NAME/): put it in the server's --caption-adapter-dir and ask for it "
        "as adapter=NAME. Examples with a question train visual question answering.",
    )
    _common(p, BLIP2, default_steps=300, default_lr=1e-4)
    p.add_argument(
        "--train",
        choices=CAPTION_PARTS,
        default="both",
        help="what learns: the Q-Former and language projection, a LoRA on the language "
        "model, or both (default: %(default)s)",
    )
    p.set_defaults(func=_run_caption)


def _common(p: argparse.ArgumentParser, family: str, default_steps: int, default_lr: float) -> None:
    add = p.add_argument
    data_help = (
        'images with metadata.jsonl ({"file_name", "text"[, "question"]} per line) '
        "or NAME.txt beside each image"
    )
    add("--data", type=Path, required=True, metavar="DIR", help=data_help)
    out_help = "adapter to write; its name (file or folder stem) is the name requests use"
    add("--out", type=Path, required=True, metavar="ADAPTER", help=out_help)
    base_help = (
        f"model to adapt: hub id, folder or tiny:KIND (default: the preset's {family} model)"
    )
    add("--base", metavar="SOURCE", help=base_help)
    add("--preset", default="tiny", help="preset whose model --base defaults to (default: tiny)")
    add(
        "--steps",
        type=positive,
        default=default_steps,
        help="optimizer steps (default: %(default)s)",
    )
    add("--batch-size", type=positive, default=1, help="examples per step (default: %(default)s)")
    lr_help = "AdamW learning rate (default: %(default)s)"
    add("--learning-rate", type=positive_float, default=default_lr, metavar="LR", help=lr_help)
    add("--rank", type=positive, default=4, help="LoRA rank, alpha equal (default: %(default)s)")
    add("--seed", type=uint, default=0, help="seed of initialisation, order and noise (default: 0)")
    precision_help = "half precision on a GPU: bf16 where supported, else fp16; none on CPU"
    precisions = ("auto", "no", "fp16", "bf16")
    add("--mixed-precision", choices=precisions, default="auto", help=precision_help)
    every_help = "also write the adapter every STEPS steps, beside OUT (default: only at the end)"
    add("--checkpoint-every", type=uint, default=0, metavar="STEPS", help=every_help)
    add("--device", default="auto", help="torch device (default: the first GPU, else CPU)")
    add("--cache-dir", type=Path, metavar="DIR", help="where models are cached")
    p.set_defaults(family=family)


def settings_from_args(args: argparse.Namespace) -> Any:
    """The TrainSettings of ``imago finetune`` arguments; ValueError for bad ones."""
    from imago.workers.contract.presets import preset
    from imago.workers.training.common import TrainSettings

    base = args.base
    if base is None:
        (spec,) = [spec for spec in preset(args.preset) if spec.family == args.family]
        base = spec.source
    # Only imagegen has --resolution; caption keeps the settings' default.
    keys = ("data", "out", "steps", "batch_size", "learning_rate", "rank", "resolution", "seed",
            "mixed_precision", "checkpoint_every", "device", "cache_dir")  # fmt: skip
    return TrainSettings(base=base, **{key: getattr(args, key) for key in keys if key in args})


def _run(args: argparse.Namespace, train: Any, **options: Any) -> int:
    try:
        settings = settings_from_args(args)
        written = train(settings, **options)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not _out_of_memory(err):
            raise
        print(
            f"error: out of memory while training ({err}); lower --batch-size or "
            "--resolution, or train in half precision on a GPU (--mixed-precision)",
            file=sys.stderr,
        )
        return 1
    print(written)
    return 0


def _out_of_memory(err: Exception) -> bool:
    """Whether ``err`` is the host or the GPU running out of memory."""
    import torch

    return isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError))


def _run_imagegen(args: argparse.Namespace) -> int:
    from imago.workers.training.imagegen import train

    return _run(args, train)


def _run_caption(args: argparse.Namespace) -> int:
    from imago.workers.training.caption import train

    return _run(args, train, parts=args.train)
