"""Adapters of a BLIP-2 model: peft adapter folders loaded from a directory,
one of them (or none) active per model call.

Every folder ``NAME/`` of the directory that holds a peft adapter (see
:func:`imago.workers.contract.adapters.adapter_folders`) is loaded into the one model
with peft's multi-adapter API: ``PeftModel`` wraps the model for the first,
``load_adapter`` adds the others. An adapter may carry a LoRA on the language
model and ``modules_to_save`` copies of the Q-Former and language projection;
peft swaps either in for the active adapter only.

A request without an adapter runs under ``disable_adapter()``: every LoRA
layer then returns its base layer's output untouched and every wrapped module
runs its original, so the result is bit-identical to the model with no
adapters loaded at all. Two things peft does are undone for that: it freezes
the base parameters (``requires_grad`` picks other CPU kernels even under
inference mode, which moves the last bits of beam scores), and its
``unload()`` keeps the active adapter's copy of a wrapped module in place of
the original.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper

from imago.workers.contract.adapters import adapter_folders

log = logging.getLogger("imago.worker")


class UnknownAdapter(KeyError):
    """A request named an adapter that is not loaded (any more)."""


class CaptionAdapters:
    """The adapters of ``model`` (a ``Blip2ForConditionalGeneration``, changed
    in place) from ``directory`` (None: no adapters), with their weights on
    ``device``."""

    def __init__(self, model: torch.nn.Module, directory: Path | None, device: str) -> None:
        self.model = model
        self.directory = directory
        self.device = device
        self._peft: PeftModel | None = None
        # Public name -> peft's name for it. peft keys adapters in ModuleDicts,
        # which refuse "." in keys, and names like "lora" clash with its own
        # parameter prefixes: a name of its own per adapter avoids both.
        self._internal: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        """The names of the loaded adapters, sorted."""
        return sorted(self._internal)

    def reload(self) -> None:
        """Drop every adapter and load those in the directory now, so new
        folders load, removed ones unload and changed ones load afresh.

        A folder that fails to load is left out and the others still load;
        ValueError then names each failure (after the rest are in place)."""
        self._unload_all()
        if self.directory is None:
            return
        if not self.directory.is_dir():
            raise ValueError(f"adapter directory {str(self.directory)!r} is not a directory")
        trainable = {id(p): p.requires_grad for p in self.model.parameters()}
        errors = []
        for index, (name, folder) in enumerate(adapter_folders(self.directory).items()):
            internal = f"adapter{index}"
            try:
                self._load(folder, internal)
            except Exception as exc:
                log.exception("adapter %s from %s failed to load", name, folder)
                self._drop(internal)
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            self._internal[name] = internal
        if self._peft is not None:
            self._peft.eval()
        # The base computes exactly as before; adapter weights are never trained here.
        for parameter in self.model.parameters():
            parameter.requires_grad_(trainable.get(id(parameter), False))
        if errors:
            raise ValueError("some caption adapters could not be loaded: " + "; ".join(errors))

    @contextmanager
    def active(self, name: str) -> Iterator[None]:
        """Run the model with adapter ``name`` inside the block; "" for the
        base model. UnknownAdapter for a name that is not loaded."""
        if name and name not in self._internal:
            raise UnknownAdapter(name)
        if self._peft is None:
            yield  # nothing loaded: the plain model is the base model
        elif not name:
            with self._peft.disable_adapter():
                yield
        else:
            self._peft.set_adapter(self._internal[name])
            yield

    def _load(self, folder: Path, internal: str) -> None:
        """Add the adapter in ``folder`` as ``internal``. The wrapper is made
        before any weights are read, so a failure always leaves a handle that
        can take the half-added adapter out again."""
        config = PeftConfig.from_pretrained(str(folder))
        config.inference_mode = True
        if self._peft is None:
            self._peft = PeftModel(self.model, config, adapter_name=internal)
        else:
            self._peft.add_adapter(internal, config)
        # The name is known now, so this reads only the weights.
        self._peft.load_adapter(str(folder), adapter_name=internal, torch_device=self.device)

    def _drop(self, internal: str) -> None:
        """Take a half-loaded adapter out. peft cannot delete its last adapter
        and stay usable, so the last one goes by unloading peft altogether."""
        if self._peft is None or internal not in self._peft.peft_config:
            return
        if len(self._peft.peft_config) == 1:
            self._unload_all()
        else:
            self._peft.delete_adapter(internal)
            # The active adapter may have been the one deleted.
            remaining = [name for name in self._peft.peft_config if name != internal]
            self._peft.set_adapter(remaining[0])

    def _unload_all(self) -> None:
        """Give ``model`` back its own modules, with no peft layers left in it:
        each LoRA layer's base layer and each wrapped module's original."""
        if self._peft is not None:
            # Innermost first, so that every parent is still where its name says.
            for name, module in reversed(list(self.model.named_modules())):
                if isinstance(module, ModulesToSaveWrapper):
                    original = module.original_module
                elif isinstance(module, BaseTunerLayer):
                    original = module.get_base_layer()
                else:
                    continue
                parent, _, attribute = name.rpartition(".")
                setattr(self.model.get_submodule(parent), attribute, original)
            # peft marks the model it wraps; a clean model can be wrapped anew.
            if hasattr(self.model, "peft_config"):
                del self.model.peft_config
            self._peft = None
        self._internal = {}
