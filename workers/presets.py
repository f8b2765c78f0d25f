"""Named model sets. Torch-free: the frontend reads them to know which
services a server offers before any worker has started.

A model source is a local directory, a Hugging Face hub id, or ``tiny:<kind>``
for the small random-weight checkpoints imago builds itself (see
:mod:`imago.workers.tiny`).
"""

from __future__ import annotations

from dataclasses import dataclass

BLIP2 = "blip2"
STABLE_DIFFUSION = "stable-diffusion"

#: Services each family answers.
FAMILY_SERVICES: dict[str, tuple[str, ...]] = {
    BLIP2: ("imago.v1.CaptionService", "imago.v1.VqaService"),
    STABLE_DIFFUSION: ("imago.v1.ImageGenService",),
}


@dataclass(frozen=True)
class ModelSpec:
    """A model a server loads: its name in the API, its family and its source."""

    name: str
    family: str
    source: str


PRESETS: dict[str, tuple[ModelSpec, ...]] = {
    "tiny": (
        ModelSpec("blip2-tiny", BLIP2, "tiny:blip2"),
        ModelSpec("sd-tiny", STABLE_DIFFUSION, "tiny:stable-diffusion"),
    ),
    "default": (
        ModelSpec("blip2-opt-2.7b-coco", BLIP2, "Salesforce/blip2-opt-2.7b-coco"),
        ModelSpec("sd15", STABLE_DIFFUSION, "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ),
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
        if service in FAMILY_SERVICES[spec.family]:
            return spec
    return None


def with_overrides(
    models: tuple[ModelSpec, ...], overrides: tuple[str, ...]
) -> tuple[ModelSpec, ...]:
    """``models`` with each "family=source" override replacing (or adding) the
    model of that family. The model is named after the source's last part."""
    chosen = {spec.family: spec for spec in models}
    for override in overrides:
        family, sep, source = override.partition("=")
        if not sep or not source:
            raise ValueError(f"model override {override!r} is not FAMILY=SOURCE")
        if family not in FAMILY_SERVICES:
            known = ", ".join(sorted(FAMILY_SERVICES))
            raise ValueError(f"unknown model family {family!r}; known families: {known}")
        name = source.rstrip("/").rsplit("/", 1)[-1].replace(":", "-")
        chosen[family] = ModelSpec(name, family, source)
    return tuple(chosen.values())
