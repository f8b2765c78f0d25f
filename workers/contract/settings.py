"""``imago serve``'s per-model device options (``--dtype``, ``--compile``, ...)
turned into each ModelSpec's :class:`~imago.workers.contract.presets.DeviceSettings`.
Torch-free: they are checked before any worker starts.

:mod:`imago.workers.runtime.device_setup` applies the settings to loaded models.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from imago.workers.contract.families import families_with_option, family
from imago.workers.contract.presets import (
    ATTENTIONS,
    COMPILE_MODES,
    DTYPES,
    ModelSpec,
    split_entry,
)

SWITCHES = ("on", "off")


@dataclass(frozen=True)
class SettingEntries:
    """``imago serve``'s per-model device options as given: each a tuple of
    "[MODEL=]VALUE" entries, a bare VALUE for every model it applies to, later
    entries winning."""

    dtype: tuple[str, ...] = ()
    attention: tuple[str, ...] = ()
    channels_last: tuple[str, ...] = ()
    compile: tuple[str, ...] = ()
    vae_slicing: tuple[str, ...] = ()
    vae_tiling: tuple[str, ...] = ()


#: Each option's choices. Which families an option applies to is each
#: family's ``device_options`` in :mod:`imago.workers.contract.families`.
_CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": DTYPES,
    "attention": ATTENTIONS,
    "channels_last": SWITCHES,
    "compile": COMPILE_MODES,
    "vae_slicing": SWITCHES,
    "vae_tiling": SWITCHES,
}


def option_name(field: str) -> str:
    """The command-line spelling of a setting, e.g. "--vae-tiling"."""
    return "--" + field.replace("_", "-")


def with_device_settings(
    models: tuple[ModelSpec, ...], entries: SettingEntries
) -> tuple[ModelSpec, ...]:
    """``models`` with their device settings changed by ``entries``.

    A bare VALUE sets every model the option applies to; "MODEL=VALUE" one
    model, which must exist and be of a family the option applies to.
    ValueError names the option and the entry at fault, and refuses
    compilation for a model that serves LoRA or IP-Adapters (loading one
    changes the compiled UNet)."""
    names = [spec.name for spec in models]
    families = {spec.name: spec.family for spec in models}
    changes: dict[str, dict[str, object]] = {name: {} for name in names}
    for field, choices in _CHOICES.items():
        option = option_name(field)
        owners = families_with_option(field)
        applies = [name for name in names if families[name] in owners]
        for entry in getattr(entries, field):
            model, value = split_entry(entry, names, option)
            if value not in choices:
                raise ValueError(
                    f"{option} {entry!r}: {value!r} is not one of {', '.join(choices)}"
                )
            if model and model not in applies:
                raise ValueError(
                    f"{option} {entry!r}: {model} is a {families[model]} model; "
                    f"{option} applies to {' and '.join(owners)} models only"
                )
            for name in [model] if model else applies:
                changes[name][field] = value == "on" if choices is SWITCHES else value
    changed = []
    for spec in models:
        settings = replace(spec.settings, **changes[spec.name])
        owner = family(spec.family)
        roles = [
            role
            for role, _ in spec.extras
            if (extra := owner.role(role)) is not None and extra.changes_compiled_model
        ]
        if settings.compile != "off" and roles:
            raise ValueError(
                f"--compile: {spec.name} also serves {' and '.join(roles)}, which change its "
                "UNet after compilation; serve it uncompiled or without them"
            )
        changed.append(replace(spec, settings=settings))
    return tuple(changed)
