"""LoRA adapters of a Stable Diffusion model: the files of its adapter
directory loaded into the pipelines, and the ones a model call runs with.
Which files count as adapters, and which names a request may use, is the
torch-free :mod:`imago.workers.contract.adapters`."""

from __future__ import annotations

from pathlib import Path

from imago.workers.contract.adapters import adapter_files


def sync_adapters(pipes: list, directory: Path | None, loaded: set[str]) -> set[str]:
    """Bring the LoRA adapters of ``pipes`` (diffusers pipelines, one per
    distinct UNet) in line with ``directory``: load new files, drop adapters
    whose file is gone. ``loaded`` is what is loaded now; returns what is
    loaded after. A file that changed under an existing name is reloaded."""
    files = adapter_files(directory) if directory is not None else {}
    for name in sorted(loaded - files.keys()):
        for pipe in pipes:
            pipe.delete_adapters(name)
    for name, path in files.items():
        for pipe in pipes:
            if name in loaded:
                pipe.delete_adapters(name)
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    return set(files)


def apply_adapters(pipe, loras: tuple[tuple[str, float], ...], loaded: set[str]) -> None:
    """Make ``pipe`` run with exactly the adapters of ``loras`` at their
    weights (none for an empty ``loras``)."""
    if not loaded:
        return
    if not loras:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters([name for name, _ in loras], adapter_weights=[w for _, w in loras])
