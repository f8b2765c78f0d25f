"""Adapters: which entries of an adapter directory are adapters, and which
names a request may use. Torch-free: the frontend validates names with
:func:`check_name` before anything is queued.

A Stable Diffusion adapter is ``<name>.safetensors`` in diffusers' or kohya's
LoRA format, directly inside the directory. A BLIP-2 adapter is a folder
``<name>/`` holding a peft adapter (``adapter_config.json`` and
``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes it).
A name is a plain file stem: letters, digits, ``_``, ``-`` and ``.``,
starting with a letter or digit, at most 64 characters. So a name can never
be a path, and ``..`` never appears.
"""

from __future__ import annotations

import re
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SUFFIX = ".safetensors"
#: The file that makes a folder a peft adapter.
PEFT_CONFIG = "adapter_config.json"


def check_name(name: str) -> str | None:
    """None for a well-formed adapter name, else what is wrong with it."""
    if not _NAME.fullmatch(name) or ".." in name:
        return (
            f"{name!r} is not an adapter name: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit, at most 64 characters, no paths"
        )
    return None


def adapter_files(directory: Path) -> dict[str, Path]:
    """{name: file} of the adapters directly in ``directory``; files whose
    stem is not a valid name are left out."""
    found = {}
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        name = path.name.removesuffix(SUFFIX)
        if path.is_file() and check_name(name) is None:
            found[name] = path
    return found


def adapter_folders(directory: Path) -> dict[str, Path]:
    """{name: folder} of the peft adapters directly in ``directory``: folders
    with a valid name that hold an ``adapter_config.json``. Anything else
    (other files, a training run's ``NAME.checkpoints/``, hidden folders
    being written) is left out."""
    found = {}
    for path in sorted(directory.iterdir()):
        if path.is_dir() and check_name(path.name) is None and (path / PEFT_CONFIG).is_file():
            found[path.name] = path
    return found
