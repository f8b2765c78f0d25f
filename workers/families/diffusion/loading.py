"""Loading a Stable Diffusion model's parts: the pipeline (from a checkpoint,
or built on the device for an ``arch:`` source), the preview autoencoder and
an IP-Adapter."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderTiny, DiffusionPipeline, StableDiffusionPipeline

from imago.workers.checkpoints import arch


def load_pipeline(
    pipeline_class: type[DiffusionPipeline],
    name: str,
    source: str,
    device: str,
    dtype: torch.dtype,
) -> DiffusionPipeline:
    """``source`` as a ``pipeline_class`` on ``device``: loaded from a
    checkpoint, or built there with random weights for an ``arch:`` source."""
    if arch.is_arch(source):
        pipe = arch.build(source, device, dtype)
        if type(pipe) is not pipeline_class:
            raise ValueError(f"{source!r} does not build a {pipeline_class.__name__}")
        return pipe
    try:
        # trust_remote_code stays at its default (off): a checkpoint may not
        # bring its own pipeline code.
        return pipeline_class.from_pretrained(source, dtype=dtype).to(device)
    except Exception as exc:
        raise RuntimeError(
            f"cannot load Stable Diffusion model {name!r} from {source!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def load_taesd(name: str, source: str, device: str, dtype: torch.dtype) -> AutoencoderTiny:
    """The preview autoencoder ``source`` on ``device``, built for an ``arch:`` source."""
    if arch.is_arch(source):
        return arch.build(source, device, dtype)
    try:
        return AutoencoderTiny.from_pretrained(source, dtype=dtype).to(device)
    except Exception as exc:
        raise RuntimeError(f"cannot load TAESD for {name!r} from {source!r}: {exc}") from exc


def load_ip_adapter(pipe: StableDiffusionPipeline, directory: Path, name: str) -> None:
    """Add the IP-Adapter in ``directory`` (``image_encoder/`` and one
    .safetensors file) to ``pipe``'s UNet."""
    weights = sorted(directory.glob("*.safetensors"))
    if len(weights) != 1 or not (directory / "image_encoder").is_dir():
        raise ValueError(
            f"IP-Adapter directory {str(directory)!r} for {name!r} needs image_encoder/ and "
            "exactly one .safetensors file"
        )
    pipe.load_ip_adapter(
        str(directory),
        subfolder="",
        weight_name=weights[0].name,
        image_encoder_folder="image_encoder",
    )
