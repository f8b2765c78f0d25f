"""LoRA fine-tuning of Stable Diffusion's UNet: ``imago finetune imagegen``.

The recipe is diffusers' ``train_text_to_image_lora``: the VAE, the text
encoder and the UNet stay frozen; a LoRA on the UNet's attention projections
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``) learns the denoising objective
on the images of a data folder (see :mod:`imago.workers.training.common`) with their
text as the prompt. The adapter is written in diffusers' LoRA format as
``NAME.safetensors``, which ``imago serve --lora-dir`` loads under the name
``NAME`` (``pipe.load_lora_weights``, see :mod:`imago.workers.contract.adapters`).

Everything random (LoRA initialisation, example order, VAE sampling, noise,
timesteps) follows ``TrainSettings.seed``: on one device the same settings
write the same adapter.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from imago.workers.checkpoints import tiny
from imago.workers.contract.adapters import SUFFIX
from imago.workers.training.common import (
    Example,
    Optimizer,
    TrainSettings,
    autocast,
    autocast_dtype,
    batches,
    load_examples,
    pick_device,
    progress_bar,
    running_loss,
    share_readable,
)

#: The UNet modules the LoRA adapts: every attention layer's projections.
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


@dataclass
class Components:
    """The pieces of a Stable Diffusion checkpoint that training uses (always
    truthy: ``components or load_components(...)`` picks it when given)."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    #: A DDPMScheduler: the training noise schedule and prediction type.
    scheduler: Any


def load_components(base: str, cache_dir: Path | None = None) -> Components:
    """Load the checkpoint ``base`` (hub id, diffusers directory or
    ``tiny:KIND``, built under ``cache_dir``) in float32 on the CPU;
    ValueError naming ``base`` when it cannot be loaded or is not a
    text-to-image Stable Diffusion checkpoint."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = tiny.resolve(base, cache_dir)
    try:
        with _quiet_loading():
            parts = Components(
                tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
                text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
                vae=AutoencoderKL.from_pretrained(source, subfolder="vae"),
                unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet"),
                scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
            )
    except (OSError, ValueError) as exc:
        raise ValueError(f"base: cannot load Stable Diffusion from {base!r}: {exc}") from exc
    channels, latent = parts.unet.config.in_channels, parts.vae.config.latent_channels
    if channels != latent:
        raise ValueError(
            f"base: {base!r} is not a text-to-image checkpoint: its UNet takes {channels} "
            f"channels, its VAE makes {latent} (an inpainting checkpoint?)"
        )
    return parts


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence diffusers' warnings and transformers' loading bar for the block.
    They say nothing a user can act on here (keys of SD 1.5's PNDM config
    that DDPMScheduler ignores; an empty list of modules to keep in float32
    when casting) and push the lines that matter off the screen."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    verbosity = diffusers_logging.get_verbosity()
    bar = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bar:
            transformers_logging.enable_progress_bar()


def vae_scale(parts: Components) -> int:
    """Pixels per latent along a side (8 for Stable Diffusion)."""
    return 2 ** (len(parts.vae.config.block_out_channels) - 1)


def prepare(
    examples: Sequence[Example], parts: Components, resolution: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels (uint8, ``[n, 3, resolution, resolution]``) and caption
    token ids (``[n, max_length]``) of ``examples``, in order. Every image is
    decoded here, before training starts, so a broken file stops the run at
    once (ValueError naming it) rather than hours in."""
    scale = vae_scale(parts)
    if resolution % scale:
        raise ValueError(f"resolution must be a multiple of {scale} (the VAE's), got {resolution}")
    pixels = torch.empty(len(examples), 3, resolution, resolution, dtype=torch.uint8)
    for i, example in enumerate(examples):
        try:
            with Image.open(example.image) as image:
                # Phone photos store their rotation in EXIF; train on what people see.
                image = ImageOps.exif_transpose(image).convert("RGB")
                # Shorter side to `resolution`, then the centre square.
                image = ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise ValueError(f"data: cannot read image {example.image}: {exc}") from exc
        pixels[i] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    # A question does not condition image generation: the text is the prompt.
    # Captions longer than the text encoder's positions are truncated, as the
    # pipeline does to prompts.
    ids = parts.tokenizer(
        [example.text for example in examples],
        padding="max_length",
        max_length=parts.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return pixels, ids


def denoising_loss(
    parts: Components, pixels: torch.Tensor, ids: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Stable Diffusion's training loss on a batch: the MSE (float32) between
    the UNet's prediction and its target (the noise for epsilon prediction,
    the velocity for v_prediction) on the latents of ``pixels`` (uint8
    ``[n, 3, H, W]``) noised at random timesteps in [0, num_train_timesteps).
    The VAE's sample, the noise and the timesteps are drawn from
    ``generator`` (on the UNet's device), in that order."""
    device = parts.unet.device
    scheduler = parts.scheduler
    with torch.no_grad():
        # uint8 [0, 255] -> [-1, 1], the VAE's input range.
        images = pixels.to(device, parts.vae.dtype) / 127.5 - 1
        posterior = parts.vae.encode(images).latent_dist
        latents = posterior.sample(generator) * parts.vae.config.scaling_factor
        hidden = parts.text_encoder(ids.to(device))[0]
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (len(latents),), generator=generator, device=device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"base: prediction type {kind!r} is not supported (epsilon, v_prediction)")
    prediction = parts.unet(
        noisy.to(parts.unet.dtype), timesteps, hidden.to(parts.unet.dtype)
    ).sample
    return F.mse_loss(prediction.float(), target.float())


def evaluation_loss(
    parts: Components,
    examples: Sequence[Example],
    resolution: int,
    seed: int = 0,
    repeats: int = 4,
    chunk: int = 8,
) -> float:
    """The mean :func:`denoising_loss` over ``examples``, each taken
    ``repeats`` times, with the VAE samples, noise and timesteps fixed by
    ``seed``: a deterministic measure to compare one model with another (say
    before and after training) on the same draws. Runs ``chunk`` images per
    call; the figure depends on ``chunk`` too, so keep it fixed."""
    pixels, ids = prepare(examples, parts, resolution)
    pixels, ids = pixels.repeat(repeats, 1, 1, 1), ids.repeat(repeats, 1)
    generator = torch.Generator(parts.unet.device).manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(pixels), chunk):
            part = slice(start, start + chunk)
            loss = denoising_loss(parts, pixels[part], ids[part], generator)
            total += loss.item() * len(pixels[part])
    return total / len(pixels)


def add_lora(
    parts: Components, rank: int, device: torch.device, dtype: torch.dtype | None
) -> list[torch.nn.Parameter]:
    """Freeze every weight of ``parts``, move them to ``device`` (cast to
    ``dtype`` when given: frozen weights need no float32), add a rank
    ``rank`` LoRA (alpha = rank, so its scale is 1) to the UNet's attention
    projections and return its parameters, float32 and trainable. The LoRA's
    up-projections start at zero, so the adapted UNet starts equal to the
    base one. Seed torch first: the down-projections start random."""
    from peft import LoraConfig

    for model in (parts.vae, parts.text_encoder, parts.unet):
        model.requires_grad_(False)
        with _quiet_loading():
            model.to(device, dtype=dtype)
    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS
    )
    parts.unet.add_adapter(config)
    params = [p for p in parts.unet.parameters() if p.requires_grad]
    for param in params:
        # Half-precision weights would round away AdamW's small updates.
        param.data = param.data.float()
    return params


def adapter_path(out: Path) -> Path:
    """The file an ``out`` setting names: itself if it ends in .safetensors,
    else with .safetensors appended."""
    return out if out.name.endswith(SUFFIX) else out.with_name(out.name + SUFFIX)


def save_adapter(unet: Any, path: Path) -> None:
    """Write the LoRA of ``unet`` to ``path`` in diffusers' format (keys
    ``unet.….lora.down.weight``, safetensors). Written under a temporary name
    and renamed, so a server reloading the folder never sees half a file."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet)
    layers = convert_state_dict_to_diffusers({k: v.detach().cpu() for k, v in state.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    # A leading dot is not an adapter name: the server's folder scan skips it.
    partial = f".{path.name}.partial"
    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=layers, weight_name=partial, safe_serialization=True
    )
    share_readable(path.parent / partial)
    os.replace(path.parent / partial, path)


def train(settings: TrainSettings, *, components: Components | None = None) -> Path:
    """Train a LoRA on ``settings.base`` with the examples of
    ``settings.data`` and return the adapter file written (``settings.out``
    with ``.safetensors`` appended where it lacks it). With
    ``checkpoint_every`` N > 0, the adapter is also written every N steps as
    ``<out dir>/<name>.checkpoints/step-NNNN.safetensors``.

    ``components`` trains already loaded models instead of loading
    ``settings.base`` (they are frozen, moved and given the LoRA in place).
    ValueError for bad data or settings, before the first step where it can
    be known then, and for a loss that stops being finite."""
    out = adapter_path(settings.out)
    # Data before model: a typo in the data folder should not cost a model load.
    examples = load_examples(settings.data)
    device = pick_device(settings.device)
    half = autocast_dtype(settings.mixed_precision, device)
    parts = components or load_components(settings.base, settings.cache_dir)
    pixels, ids = prepare(examples, parts, settings.resolution)
    row = {example.image: i for i, example in enumerate(examples)}

    torch.manual_seed(settings.seed)
    params = add_lora(parts, settings.rank, device, half)
    optimizer = Optimizer(params, settings.learning_rate, device, half)
    generator = torch.Generator(device).manual_seed(settings.seed)
    checkpoints = out.with_name(f"{settings.adapter_name}.checkpoints")
    width = max(4, len(str(settings.steps)))  # so that the names sort by step

    parts.unet.train()
    order = batches(examples, settings.batch_size, settings.seed)
    bar = progress_bar(settings.steps, f"finetune {settings.adapter_name}")
    running: float | None = None
    try:
        for step in range(1, settings.steps + 1):
            picked = torch.tensor([row[example.image] for example in next(order)])
            with autocast(device, half):
                loss = denoising_loss(parts, pixels[picked], ids[picked], generator)
            value = loss.item()
            if not math.isfinite(value):
                raise ValueError(
                    f"loss became {value} at step {step}: lower --learning-rate"
                    + (", or train with --mixed-precision bf16 or no" if half else "")
                )
            optimizer.step(loss)
            running = running_loss(running, value)
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            bar.update()
            if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                save_adapter(parts.unet, checkpoints / f"step-{step:0{width}d}{SUFFIX}")
    finally:
        bar.close()
        parts.unet.eval()
    save_adapter(parts.unet, out)
    return out
