"""Putting a model's :class:`~imago.workers.contract.presets.DeviceSettings` into effect:
precision, attention kernel, memory layout, compilation and the VAE's memory
savers. The runners call these while loading; warm-up itself is the runners'
(they know which shapes their requests bring).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from imago.workers.contract.presets import DeviceSettings

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(name: str, device: str) -> torch.dtype:
    """The dtype ``name`` ("auto", "fp32", "fp16", "bf16") stands for on
    ``device``: "auto" is float16 on CUDA and float32 elsewhere. ValueError
    for bf16 on a GPU without bfloat16 support (before Ampere)."""
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    dtype = _DTYPES[name]
    if dtype == torch.bfloat16 and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--dtype bf16: {torch.cuda.get_device_name()} has no bfloat16 support")
    return dtype


def dtype_name(name: str, device: str) -> str:
    """What ``name`` stands for on ``device``, by name: "auto" resolved."""
    dtype = torch_dtype(name, device)
    return next(key for key, value in _DTYPES.items() if value == dtype)


def set_transformers_attention(model: Any, attention: str) -> None:
    """Run a transformers model's attention as ``attention`` ("sdpa" or "eager")."""
    model.set_attn_implementation(attention)


def set_diffusers_attention(module: Any, attention: str) -> None:
    """Run a diffusers model's attention layers with SDPA (AttnProcessor2_0)
    or the plain matmul-softmax-matmul processor (AttnProcessor)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    module.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())


def prepare_pipeline(pipe: StableDiffusionPipeline, settings: DeviceSettings) -> None:
    """Attention kernel, memory layout and VAE memory savers for ``pipe``.
    Compilation is separate (:func:`compile_pipeline`): it must come after
    everything that changes the modules."""
    set_diffusers_attention(pipe.unet, settings.attention)
    set_diffusers_attention(pipe.vae, settings.attention)
    set_transformers_attention(pipe.text_encoder, settings.attention)
    if settings.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.vae_slicing:
        pipe.vae.enable_slicing()
    if settings.vae_tiling:
        pipe.vae.enable_tiling()


def compile_pipeline(pipe: StableDiffusionPipeline, mode: str) -> None:
    """Compile ``pipe``'s UNet and VAE decoder in place with torch.compile in
    ``mode``; the first call of each new input shape then compiles.

    Schedulers hand the UNet integer (DDIM, PNDM, DPM-Solver, UniPC) or float
    (Euler, LMS) timesteps, and a new input dtype means a new graph. The UNet
    turns the timestep into float32 before anything else uses it, so it is
    cast on the way in, outside the compiled graph: one graph serves every
    scheduler, with the same numbers."""
    compiled = torch.compile(pipe.unet.forward, mode=mode)

    def forward(sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_tensor(timestep):
            timestep = timestep.to(torch.float32)
        return compiled(sample, timestep, *args, **kwargs)

    pipe.unet.forward = forward
    pipe.vae.decoder.compile(mode=mode)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def device_memory_bytes(device: str) -> int:
    """Memory torch holds on ``device`` for tensors (0 on CPU)."""
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0
