"""The registry of model families: one :class:`FamilyInfo` per family, the
only place that says what a family serves, how it batches, which extra
sources and device options it takes, and where its code lives.

Torch-free, like the rest of the contract: the frontend reads it before any
worker starts. Code is named by import path ("module:attribute") and only
imported on demand, by :func:`import_object` (for runner classes through
:mod:`imago.workers.runtime.registry`), so that reading the registry imports
nothing heavy. Every other table of families (presets, device options, the
worker's runner lookup, the tiny and arch checkpoint builders, the command
line's family lists) reads from :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

BLIP2 = "blip2"
STABLE_DIFFUSION = "stable-diffusion"
#: BLIP-2 retrieval models (Blip2ForImageTextRetrieval): embeddings, ITC, ITM.
BLIP2_ALIGN = "blip2-align"

#: Roles of a Stable Diffusion model's extras: a dedicated inpainting
#: checkpoint, a tiny autoencoder (TAESD) for previews, a directory of LoRA
#: adapters and an IP-Adapter directory.
INPAINT = "inpaint"
TAESD = "taesd"
LORAS = "loras"
IP_ADAPTER = "ip_adapter"
#: Role of a directory of peft adapter folders among a BLIP-2 model's extras.
CAPTION_ADAPTERS = "adapters"

#: Device options (fields of :class:`~imago.workers.contract.presets.DeviceSettings`)
#: that every family takes; the others are Stable Diffusion's UNet and VAE.
COMMON_DEVICE_OPTIONS = ("dtype", "attention")
DIFFUSION_DEVICE_OPTIONS = (
    *COMMON_DEVICE_OPTIONS,
    "channels_last",
    "compile",
    "vae_slicing",
    "vae_tiling",
)


@dataclass(frozen=True)
class BatchPolicy:
    """How the scheduler batches one model's requests.

    ``max_batch_size`` bounds a batch (in requests for text models, in images
    for image models). ``max_batch_delay_ms`` is the longest the oldest
    waiting request is held back for companions; 0 never waits and batches
    only what queued up while the workers were busy.
    """

    max_batch_size: int
    max_batch_delay_ms: float


@dataclass(frozen=True)
class ExtraRole:
    """A further source a family's models take besides their own, given as
    ``role=SOURCE`` to ``imago serve --model`` and handed to the runner's
    ``load`` as a keyword argument named ``name``.

    ``changes_compiled_model``: loading it alters the compiled model after
    compilation, so a model serving it cannot be compiled."""

    name: str
    meaning: str
    changes_compiled_model: bool = False


@dataclass(frozen=True)
class FamilyInfo:
    """Everything the code base knows about one model family.

    ``name`` is the family's name in presets, ``--model FAMILY=SOURCE`` and
    the runner's ``family`` attribute; ``title`` is how messages name it.
    ``services`` are the full gRPC service names it answers (each needs its
    servicer in the frontend). ``batching`` is its batch policy unless the
    server is told otherwise. ``runner`` is its Runner subclass as
    "module:Class". ``roles`` are the extra sources it accepts.
    ``device_options`` are the DeviceSettings fields that apply to it.
    ``tiny_builders`` map each ``tiny:<kind>`` it provides to the
    "module:function" that writes that checkpoint into a directory;
    ``arch_builders`` map each ``arch:<kind>`` to the "module:function" that
    builds it from (device, dtype, seed).
    """

    name: str
    title: str
    services: tuple[str, ...]
    batching: BatchPolicy
    runner: str
    roles: tuple[ExtraRole, ...] = ()
    device_options: tuple[str, ...] = COMMON_DEVICE_OPTIONS
    tiny_builders: Mapping[str, str] = field(default_factory=dict)
    arch_builders: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Read-only views, so that no caller can change the registry.
        object.__setattr__(self, "tiny_builders", MappingProxyType(dict(self.tiny_builders)))
        object.__setattr__(self, "arch_builders", MappingProxyType(dict(self.arch_builders)))

    def role(self, name: str) -> ExtraRole | None:
        """The extra role called ``name``, None when the family has none."""
        return next((role for role in self.roles if role.name == name), None)


_CHECKPOINTS = "imago.workers.checkpoints"
_ARCH = f"{_CHECKPOINTS}.arch"

FAMILIES: dict[str, FamilyInfo] = {
    BLIP2: FamilyInfo(
        name=BLIP2,
        title="BLIP-2",
        services=("imago.v1.CaptionService", "imago.v1.VqaService"),
        batching=BatchPolicy(max_batch_size=32, max_batch_delay_ms=20.0),
        runner="imago.workers.families.blip2.runner:Blip2Runner",
        roles=(
            ExtraRole(
                CAPTION_ADAPTERS,
                "a directory of peft adapter folders (as imago finetune caption writes them)",
            ),
        ),
        tiny_builders={
            "blip2": f"{_CHECKPOINTS}.blip2:build",
            "blip2-legacy": f"{_CHECKPOINTS}.blip2:build_legacy",
        },
        arch_builders={"blip2-opt-2.7b": f"{_ARCH}:build_blip2"},
    ),
    STABLE_DIFFUSION: FamilyInfo(
        name=STABLE_DIFFUSION,
        title="Stable Diffusion",
        services=("imago.v1.ImageGenService",),
        batching=BatchPolicy(max_batch_size=4, max_batch_delay_ms=20.0),
        runner="imago.workers.families.diffusion.runner:StableDiffusionRunner",
        roles=(
            ExtraRole(INPAINT, "a dedicated inpainting checkpoint (none: inpaint with the UNet)"),
            ExtraRole(TAESD, "a tiny autoencoder (TAESD) that decodes previews"),
            ExtraRole(
                LORAS, "a directory of LoRA adapters, NAME.safetensors", changes_compiled_model=True
            ),
            ExtraRole(
                IP_ADAPTER,
                "an IP-Adapter directory (image_encoder/ and one .safetensors file)",
                changes_compiled_model=True,
            ),
        ),
        device_options=DIFFUSION_DEVICE_OPTIONS,
        tiny_builders={
            "stable-diffusion": f"{_CHECKPOINTS}.diffusion:build",
            "stable-diffusion-inpaint": f"{_CHECKPOINTS}.diffusion:build_inpaint",
            "taesd": f"{_CHECKPOINTS}.diffusion:build_taesd",
            "ip-adapter": f"{_CHECKPOINTS}.diffusion:build_ip_adapter",
        },
        arch_builders={
            "sd15": f"{_ARCH}:build_sd15_pipeline",
            "sd15-unet": f"{_ARCH}:build_sd15_unet",
            "sd15-vae": f"{_ARCH}:build_sd15_vae",
            "sd15-text-encoder": f"{_ARCH}:build_sd15_text_encoder",
            "sd15-tokenizer": f"{_ARCH}:build_sd15_tokenizer",
            "sd15-scheduler": f"{_ARCH}:build_sd15_scheduler",
            "taesd": f"{_ARCH}:build_taesd",
        },
    ),
    BLIP2_ALIGN: FamilyInfo(
        name=BLIP2_ALIGN,
        title="BLIP-2 alignment",
        services=("imago.v1.AlignService",),
        # Counted in images and texts: one vision pass of 64 images at most.
        batching=BatchPolicy(max_batch_size=64, max_batch_delay_ms=20.0),
        runner="imago.workers.families.align.runner:Blip2AlignRunner",
        tiny_builders={
            "blip2-itm": f"{_CHECKPOINTS}.align:build",
            "blip2-itc": f"{_CHECKPOINTS}.align:build_without_itm",
        },
    ),
}


#: The service whose requests make images: the models of the families that
#: answer it are limited in pixels (``imago serve --max-pixels``).
IMAGE_SERVICE = "imago.v1.ImageGenService"


def makes_images(name: str) -> bool:
    """Whether the family ``name`` answers :data:`IMAGE_SERVICE`."""
    return IMAGE_SERVICE in family(name).services


def family(name: str) -> FamilyInfo:
    """The family called ``name``; ValueError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unknown model family {name!r}; known families: {known}") from None


def role_owner(role: str) -> FamilyInfo | None:
    """The family whose models take the extra role ``role``, if any."""
    return next((info for info in FAMILIES.values() if info.role(role) is not None), None)


def families_with_option(option: str) -> list[str]:
    """Names of the families that the device option ``option`` (a
    DeviceSettings field, e.g. "compile") applies to, in registry order."""
    return [name for name, info in FAMILIES.items() if option in info.device_options]


def tiny_builders() -> dict[str, str]:
    """Every ``tiny:<kind>`` of every family: kind -> "module:function"."""
    return {k: path for info in FAMILIES.values() for k, path in info.tiny_builders.items()}


def arch_builders() -> dict[str, str]:
    """Every ``arch:<kind>`` of every family: kind -> "module:function"."""
    return {k: path for info in FAMILIES.values() for k, path in info.arch_builders.items()}


def import_object(path: str) -> Any:
    """The attribute named by ``path`` ("package.module:attribute"),
    importing its module; ValueError when ``path`` has no ":"."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"import path {path!r} is not MODULE:ATTRIBUTE")
    return getattr(importlib.import_module(module_name), attribute)
