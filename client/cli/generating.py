"""``imago generate``: its arguments, where images and previews are written,
and the command itself, which streams one generation with a progress bar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from imago.client.cli.argtypes import uint
from imago.client.cli.connect import client_from_args
from imago.client.cli.localfiles import local, read
from imago.client.messages import PREVIEW_METHODS
from imago.client.options import (
    DiffusionOptions,
    ImageToImage,
    Inpaint,
    OutputOptions,
    PreviewOptions,
)

_SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
_FORMAT_SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
_MIME_SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


_GEN_DOC = """Generate images from a prompt. Prints each image's file and seed. With
--num-images N > 1, images go to FILE-0.EXT, FILE-1.EXT, ... beside -o FILE."""


def lora(text: str) -> tuple[str, float]:
    """``--lora NAME[:WEIGHT]`` as (name, weight); the weight defaults to 1."""
    name, sep, weight = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return name, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not NAME[:WEIGHT]: {text!r}") from None


def add_generate_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to ``sub`` (an argparse subparsers action)."""
    p = sub.add_parser("generate", help="generate images from a prompt", description=_GEN_DOC)
    add = p.add_argument
    add("prompt", help="what to draw")
    add("-o", "--output", required=True, type=Path, metavar="FILE", help="output image file")
    add("--negative", default="", metavar="TEXT", help="what to steer away from")
    add("--width", type=uint, default=0, metavar="PX", help="multiple of 8 (default: model's)")
    add("--height", type=uint, default=0, metavar="PX", help="multiple of 8 (default: model's)")
    add("--steps", type=uint, default=0, metavar="N", help="denoising steps (default: 30)")
    add("--guidance", type=float, metavar="SCALE", help="guidance scale (default: 7.5)")
    add("--seed", type=uint, help="seed of the first image; image i uses seed + i")
    add("--quality", type=uint, default=0, metavar="Q", help="JPEG/WebP quality 1..100 (95)")
    add(
        "--no-parameters",
        dest="omit_parameters",
        action="store_true",
        help="leave the generation parameters out of PNG files",
    )
    add("--init", metavar="IMG", help="redraw this image (image-to-image) instead of drawing anew")
    add("--mask", metavar="IMG", help="with --init: repaint where this mask is white (inpainting)")
    add(
        "--style", metavar="IMG", help="with --init: restyle after this image (needs an IP-Adapter)"
    )
    add("--style-scale", type=float, default=0.0, metavar="S", help="(0, 2] (default: 1)")
    add(
        "--strength",
        type=float,
        default=0.0,
        metavar="S",
        help="with --init: how much to change it, (0, 1] (default: 0.8)",
    )
    add(
        "--scheduler",
        default="",
        metavar="NAME",
        help="ddim, pndm, euler, euler_ancestral, dpmpp_2m, dpmpp_2m_karras, lms or unipc "
        "(default: the model's own)",
    )
    add("--num-images", type=uint, default=1, metavar="N", help="(default: 1)")
    add("--format", choices=["png", "jpeg", "webp"], help="(default: from -o's suffix, else png)")
    add("--previews", type=Path, metavar="DIR", help="write previews to DIR/step-0005.jpg ...")
    add("--preview-every", type=uint, metavar="N", help="a preview every N steps (default: 1)")
    add(
        "--preview-method",
        choices=PREVIEW_METHODS,
        default="latent_rgb",
        help="how previews are made (default: %(default)s)",
    )
    add("--all-previews", action="store_true", help="preview every image, not only the first")
    add(
        "--lora",
        action="append",
        default=[],
        type=lora,
        metavar="NAME[:WEIGHT]",
        help="apply the server's LoRA adapter NAME (weight 1 unless given); repeatable",
    )
    p.set_defaults(func=run_generate)
    return p


def output_format(output: Path, requested: str | None = None) -> str:
    """Encoding of the images written to ``output``: ``requested``, else the
    one its suffix names, else png."""
    return requested or _SUFFIX_FORMATS.get(output.suffix.lower(), "png")


def output_paths(output: Path, count: int, fmt: str = "png") -> list[Path]:
    """Files for ``count`` images: ``output`` itself for one image, else
    ``stem-0.ext``, ``stem-1.ext``, ... beside it. A suffix-less ``output``
    gets the one of ``fmt``."""
    if not output.suffix:
        output = output.with_name(output.name + _FORMAT_SUFFIXES[fmt])
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def preview_name(step: int, image_index: int, num_images: int, mime_type: str = "") -> str:
    """File name of a preview: ``step-0005.jpg``, or ``step-0005-1.jpg`` when
    the request makes several images."""
    suffix = _MIME_SUFFIXES.get(mime_type, ".jpg")
    index = f"-{image_index}" if num_images > 1 else ""
    return f"step-{step:04d}{index}{suffix}"


def diffusion_options(args: argparse.Namespace) -> DiffusionOptions:
    """How to draw, from ``imago generate``'s arguments."""
    return DiffusionOptions(
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        num_images=args.num_images,
        scheduler=args.scheduler,
        loras=args.lora,
    )


def edit_task(args: argparse.Namespace) -> ImageToImage | Inpaint | None:
    """The image to start from: inpainting ``--init`` where ``--mask`` is
    white, else redrawing ``--init`` (restyled after ``--style``), else None
    (draw anew). Every file named is read, in that order, even one the task
    leaves unused (``--style`` with ``--mask`` or without ``--init``), so an
    unreadable one is always an :class:`InputError`."""
    init = None if args.init is None else read(args.init)
    mask = None if args.mask is None else read(args.mask)
    style = None if args.style is None else read(args.style)
    if init is None:
        return None
    if mask is not None:
        return Inpaint(init, mask, strength=args.strength)
    return ImageToImage(
        init, strength=args.strength, style_image=style, style_scale=args.style_scale
    )


# ------------------------------------------------------------------ commands


def run_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.preview_every is not None and args.previews is None:
        print("error: --preview-every needs --previews DIR", file=sys.stderr)
        return 2
    preview_every = 0
    if args.previews is not None:
        preview_every = 1 if args.preview_every is None else args.preview_every
        with local("create", args.previews):
            args.previews.mkdir(parents=True, exist_ok=True)
    if args.mask is not None and args.init is None:
        print("error: --mask needs --init IMG, the image to repaint", file=sys.stderr)
        return 2
    if args.output.suffix and args.output.suffix.lower() not in _SUFFIX_FORMATS:
        print(
            f"error: -o {args.output}: images are written as png, jpeg or webp; "
            f"name the file {', '.join(sorted(_SUFFIX_FORMATS))} (or leave the suffix out)",
            file=sys.stderr,
        )
        return 2
    edit = edit_task(args)
    fmt = output_format(args.output, args.format)
    with local("create", args.output.parent):
        args.output.parent.mkdir(parents=True, exist_ok=True)

    result = None
    bar = tqdm(total=args.steps or None, desc="waiting", unit="step", file=sys.stderr, disable=None)
    with bar, client_from_args(args) as client:
        events = client.generate(
            args.prompt,
            negative_prompt=args.negative,
            diffusion=diffusion_options(args),
            previews=PreviewOptions(
                every_n_steps=preview_every,
                method=args.preview_method,
                all_images=args.all_previews,
            ),
            output=OutputOptions(
                format=fmt, quality=args.quality, embed_parameters=not args.omit_parameters
            ),
            edit=edit,
        )
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "queued":
                bar.set_description(f"queued (position {event.queued.position})")
            elif kind == "started":
                bar.reset(total=event.started.total_steps)
                bar.set_description("denoising")
            elif kind == "progress":
                bar.update(event.progress.step - bar.n)
            elif kind == "preview" and args.previews is not None:
                preview = event.preview
                name = preview_name(
                    preview.step, preview.image_index, args.num_images, preview.image.mime_type
                )
                with local("write", args.previews / name):
                    (args.previews / name).write_bytes(preview.image.data)
            elif kind == "result":
                result = event.result
    if result is None:
        print("error: the server ended the stream without a result", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    paths = output_paths(args.output, len(result.images), fmt)
    for path, generated in zip(paths, result.images, strict=True):
        with local("write", path):
            path.write_bytes(generated.image.data)
        print(f"{path}\tseed={generated.seed}")
        if generated.nsfw_detected:
            note = "replaced" if generated.replaced else "kept"
            print(f"warning: {path} was flagged by the safety checker ({note})", file=sys.stderr)
    return 0
