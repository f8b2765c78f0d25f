"""Named model sets. Torch-free: the frontend reads them to know which
services a server offers before any worker has started.

A model source is a local directory, a Hugging Face hub id, or ``tiny:<kind>``
for the small random-weight checkpoints imago builds itself (see
:mod:`imago.workers.checkpoints.tiny`). ``arch:<kind>`` names a full-size random-weight
architecture (:mod:`imago.workers.checkpoints.arch`) that the worker builds directly on
its device, with no checkpoint: it costs what the real model costs per step
and per token, so the ``arch`` presets are for measuring speed and memory
where weights cannot be downloaded. Their outputs are noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

# The family names and BatchPolicy are also imported from here by the code
# that reads presets; the registry itself is imago.workers.contract.families.
from imago.workers.contract.families import (
    BLIP2,
    BLIP2_ALIGN,
    FAMILIES,
    INPAINT,
    STABLE_DIFFUSION,
    TAESD,
    BatchPolicy,
    family,
    role_owner,
)

#: The default batch policy of each family, read from the registry.
FAMILY_BATCHING: dict[str, BatchPolicy] = {name: info.batching for name, info in FAMILIES.items()}


#: Precisions by name; "auto" is float16 on CUDA and float32 elsewhere.
DTYPES = ("auto", "fp32", "fp16", "bf16")
#: Attention kernels: PyTorch's scaled_dot_product_attention (flash or
#: memory-efficient kernels where the device has them) or the libraries'
#: plain matmul-softmax-matmul.
ATTENTIONS = ("sdpa", "eager")
#: torch.compile modes; "off" runs eagerly.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class DeviceSettings:
    """How one model runs on its worker's device.

    ``dtype`` is the precision of the weights and activations (BLIP-2's
    Q-Former stays float32 in float16, as its checkpoints ask). ``attention``
    picks the attention kernel. ``channels_last`` stores the Stable Diffusion
    UNet's and VAE's convolution weights NHWC, which tensor cores prefer.
    ``compile`` is a torch.compile mode for the UNet and the VAE decoder; the
    worker warms the compiled model up before it reports ready. ``vae_slicing``
    decodes a batch one image at a time and ``vae_tiling`` decodes large
    images in overlapping tiles: both bound the decoder's peak memory.
    """

    dtype: str = "auto"
    attention: str = "sdpa"
    channels_last: bool = False
    compile: str = "off"
    vae_slicing: bool = False
    vae_tiling: bool = False

    def describe(self) -> str:
        """One line for the log, e.g. "fp16, sdpa, channels_last, compile=default"."""
        parts = [self.dtype, self.attention]
        parts += [
            name
            for name, on in (
                ("channels_last", self.channels_last),
                ("vae_slicing", self.vae_slicing),
                ("vae_tiling", self.vae_tiling),
            )
            if on
        ]
        if self.compile != "off":
            parts.append(f"compile={self.compile}")
        return ", ".join(parts)


@dataclass(frozen=True)
class ModelSpec:
    """A model a server loads: its name in the API, its family, its source and
    how its requests are batched."""

    name: str
    family: str
    source: str
    batching: BatchPolicy | None = None
    # Further sources by role, as (role, source) pairs the family's runner
    # understands: Stable Diffusion takes ("inpaint", a dedicated inpainting
    # checkpoint), BLIP-2 ("adapters", a directory of adapter folders).
    extras: tuple[tuple[str, str], ...] = ()
    settings: DeviceSettings = DeviceSettings()

    @property
    def batch_policy(self) -> BatchPolicy:
        return self.batching or family(self.family).batching


_BLIP2_ARCH = ModelSpec("blip2-opt-2.7b-arch", BLIP2, "arch:blip2-opt-2.7b")
_SD15_ARCH = ModelSpec("sd15-arch", STABLE_DIFFUSION, "arch:sd15", extras=((TAESD, "arch:taesd"),))

PRESETS: dict[str, tuple[ModelSpec, ...]] = {
    "tiny": (
        ModelSpec("blip2-tiny", BLIP2, "tiny:blip2"),
        ModelSpec(
            "sd-tiny",
            STABLE_DIFFUSION,
            "tiny:stable-diffusion",
            extras=((INPAINT, "tiny:stable-diffusion-inpaint"), (TAESD, "tiny:taesd")),
        ),
        ModelSpec("blip2-itm-tiny", BLIP2_ALIGN, "tiny:blip2-itm"),
    ),
    "default": (
        ModelSpec("blip2-opt-2.7b-coco", BLIP2, "Salesforce/blip2-opt-2.7b-coco"),
        ModelSpec(
            "sd15",
            STABLE_DIFFUSION,
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            extras=(
                (INPAINT, "stable-diffusion-v1-5/stable-diffusion-inpainting"),
                (TAESD, "madebyollin/taesd"),
            ),
        ),
        ModelSpec("blip2-itm-vit-g", BLIP2_ALIGN, "Salesforce/blip2-itm-vit-g"),
    ),
    "arch": (_BLIP2_ARCH, _SD15_ARCH),
    "blip2-opt-2.7b-arch": (_BLIP2_ARCH,),
    "sd15-arch": (_SD15_ARCH,),
}


def preset(name: str) -> tuple[ModelSpec, ...]:
    """The model set called ``name``; ValueError listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown preset {name!r}; known presets: {known}") from None


def model_for_service(models: tuple[ModelSpec, ...], service: str) -> ModelSpec | None:
    """The model that answers ``service`` (full gRPC service name), if any."""
    for spec in models:
        if service in family(spec.family).services:
            return spec
    return None


def split_entry(entry: str, models: list[str], what: str) -> tuple[str, str]:
    """(MODEL, VALUE) of a "[MODEL=]VALUE" entry, MODEL "" when bare;
    ValueError, worded with ``what``, when MODEL is not one of ``models``."""
    name, sep, text = entry.rpartition("=")
    if sep and name not in models:
        known = ", ".join(models)
        raise ValueError(f"{what} {entry!r} names unknown model {name!r}; models: {known}")
    return name, text


def per_model(
    entries: tuple[str, ...],
    models: list[str],
    what: str,
    parse: Callable[[str], float],
    valid: Callable[[float], bool],
    form: str = "[MODEL=]VALUE with a valid VALUE",
) -> dict[str, float]:
    """Values by model name from "[MODEL=]VALUE" entries: a bare VALUE is for
    every model of ``models``, and later entries win. Models no entry names
    are left out. ValueError names an entry whose model is unknown or whose
    VALUE ``parse`` rejects, is not finite, or is not ``valid``; ``what`` and
    ``form`` word the message."""
    values: dict[str, float] = {}
    for entry in entries:
        name, text = split_entry(entry, models, what)
        try:
            value = parse(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not valid(value):
            raise ValueError(f"{what} {entry!r} is not {form}")
        for key in [name] if name else models:
            values[key] = value
    return values


def with_batching(
    models: tuple[ModelSpec, ...], sizes: tuple[str, ...] = (), delays_ms: tuple[str, ...] = ()
) -> tuple[ModelSpec, ...]:
    """``models`` with batch limits changed. Each entry is "MODEL=VALUE" for one
    model or a bare "VALUE" for all of them; later entries win. ValueError
    names a malformed entry or an unknown model."""
    names = [spec.name for spec in models]
    size = per_model(sizes, names, "max batch size", int, lambda n: n >= 1)
    delay = per_model(delays_ms, names, "max batch delay", float, lambda ms: ms >= 0)
    changed = []
    for spec in models:
        policy = spec.batch_policy
        if spec.name in size:
            policy = replace(policy, max_batch_size=int(size[spec.name]))
        if spec.name in delay:
            policy = replace(policy, max_batch_delay_ms=delay[spec.name])
        changed.append(replace(spec, batching=policy))
    return tuple(changed)


def with_overrides(
    models: tuple[ModelSpec, ...], overrides: tuple[str, ...]
) -> tuple[ModelSpec, ...]:
    """``models`` with each "FAMILY=SOURCE" override replacing (or adding) the
    model of that family. The model is named after the source's last part.

    "ROLE=SOURCE", where ROLE is an extra role of a family (its
    :class:`~imago.workers.contract.families.ExtraRole`: inpaint, taesd,
    loras and ip_adapter for Stable Diffusion, adapters for BLIP-2), gives
    that family's model SOURCE in that role instead of its own; "ROLE=" takes
    it away ("inpaint=": generic inpainting on the base UNet). ValueError for
    a malformed override, an unknown family, or a role whose family has no
    model here."""
    chosen = {spec.family: spec for spec in models}
    for override in overrides:
        name, sep, source = override.partition("=")
        owner = role_owner(name)
        if owner is not None and sep:
            if owner.name not in chosen:
                raise ValueError(f"{override!r}: there is no {owner.title} model to give it")
            spec = chosen[owner.name]
            extras = tuple((role, extra) for role, extra in spec.extras if role != name)
            if source:
                extras += ((name, source),)
            chosen[owner.name] = replace(spec, extras=extras)
            continue
        if not sep or not source:
            raise ValueError(f"model override {override!r} is not FAMILY=SOURCE")
        family(name)  # ValueError listing the known families for an unknown one
        model = source.rstrip("/").rsplit("/", 1)[-1].replace(":", "-")
        chosen[name] = ModelSpec(model, name, source)
    return tuple(chosen.values())
