"""What both fine-tuning recipes share: the data folder, the settings, the
device and precision, and the progress bar.

A data folder holds images with their text, given either way:

- ``metadata.jsonl``: one JSON object per line, ``{"file_name": "fox.png",
  "text": "a red fox in the snow"}`` (the layout of Hugging Face's
  ``imagefolder``), with an optional ``"question"``: the text is then the
  answer to it, for visual question answering;
- a sidecar ``fox.txt`` beside ``fox.png`` holding its text.

metadata.jsonl wins where both exist. Images are found directly in the
folder and in its subfolders.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imago.workers.contract.adapters import check_name

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
PRECISIONS = ("auto", "no", "fp16", "bf16")
#: Gradient norm clip: one bad batch must not throw the adapter far off.
MAX_GRAD_NORM = 1.0
#: Weight of the newest step's loss in the progress bar's running loss.
LOSS_SMOOTHING = 0.05


@dataclass(frozen=True)
class Example:
    """One training example: an image file, its text, and for VQA the question."""

    image: Path
    text: str
    question: str | None = None


@dataclass(frozen=True)
class TrainSettings:
    """Settings shared by both recipes.

    ``base`` is the model to adapt (hub id, directory or ``tiny:KIND``);
    ``out`` the adapter to write. ``steps`` counts optimizer steps of
    ``batch_size`` examples; ``learning_rate`` is AdamW's; ``rank`` is the
    LoRA rank (alpha equals it). ``resolution`` is the square side, in
    pixels, images are trained at (Stable Diffusion only). ``mixed_precision``
    is "auto" (bf16 where the GPU has it, else fp16; none on CPU), "no",
    "fp16" or "bf16" (GPU only). ``checkpoint_every`` writes the adapter
    every so many steps beside ``out`` (0: only at the end). ``device`` is
    "auto" (the first CUDA device if there is one) or a torch device name.
    """

    data: Path
    out: Path
    base: str
    steps: int = 500
    batch_size: int = 1
    learning_rate: float = 1e-4
    rank: int = 4
    resolution: int = 512
    seed: int = 0
    mixed_precision: str = "auto"
    checkpoint_every: int = 0
    device: str = "auto"
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "rank", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(PRECISIONS)}")
        problem = check_name(self.adapter_name)
        if problem is not None:
            raise ValueError(f"out: {problem}")

    @property
    def adapter_name(self) -> str:
        """The name the server will know the adapter by: ``out``'s file stem."""
        return self.out.name.removesuffix(".safetensors")


def load_examples(directory: Path) -> list[Example]:
    """The examples of a data folder, sorted by file name; ValueError naming
    the problem (no folder, no images, an image without text, a bad line)."""
    if not directory.is_dir():
        raise ValueError(f"data: {directory} is not a directory")
    metadata = _metadata(directory)
    examples = []
    for image in sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        relative = image.relative_to(directory).as_posix()
        if relative in metadata:
            examples.append(Example(image, *metadata.pop(relative)))
            continue
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            raise ValueError(f"data: {relative} has no text (no {sidecar.name}, not in metadata)")
        text = sidecar.read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"data: {sidecar.relative_to(directory)} is empty")
        examples.append(Example(image, text))
    if metadata:
        raise ValueError(f"data: metadata.jsonl names missing images: {sorted(metadata)[:3]}")
    if not examples:
        raise ValueError(f"data: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {directory}")
    return examples


def _metadata(directory: Path) -> dict[str, tuple[str, str | None]]:
    path = directory / "metadata.jsonl"
    if not path.is_file():
        return {}
    entries = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name, text = record["file_name"], record["text"]
            question = record.get("question")
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"data: metadata.jsonl line {number} is not "
                '{"file_name": ..., "text": ...[, "question": ...]}'
            ) from None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"data: metadata.jsonl line {number} has an empty text")
        if question is not None and (not isinstance(question, str) or not question.strip()):
            raise ValueError(f"data: metadata.jsonl line {number} has an empty question")
        entries[Path(name).as_posix()] = (text.strip(), question and question.strip())
    return entries


def batches(examples: list[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless batches: the examples shuffled anew each epoch with ``seed``."""
    rng = random.Random(seed)
    order: list[Example] = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(examples)
                rng.shuffle(order)
            batch.append(order.pop())
        yield batch


def pick_device(name: str) -> Any:
    """The torch device of a ``device`` setting."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(mixed_precision: str, device: Any) -> Any:
    """The autocast dtype of a ``mixed_precision`` setting on ``device``
    (None: full precision); ValueError for half precision asked on a CPU."""
    import torch

    if mixed_precision == "no":
        return None
    if device.type != "cuda":
        if mixed_precision == "auto":
            return None
        raise ValueError(f"mixed_precision {mixed_precision} needs a CUDA device")
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


def autocast(device: Any, dtype: Any) -> Any:
    """A context running the forward pass in ``dtype`` (none for None)."""
    import torch

    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def progress_bar(total: int, description: str) -> Any:
    """A tqdm bar over optimizer steps; callers set its ``loss`` postfix."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="step", dynamic_ncols=True)


class Optimizer:
    """AdamW over ``params`` with gradient clipping, and the loss scaling
    that float16 needs (its gradients underflow without it; bfloat16 has
    float32's range and needs none). ``half`` is the autocast dtype or None."""

    def __init__(self, params: list[Any], learning_rate: float, device: Any, half: Any) -> None:
        import torch

        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=learning_rate)
        self.scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16)

    def step(self, loss: Any) -> None:
        """One update from ``loss``: backward, unscale, clip, step."""
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()


def running_loss(running: float | None, value: float) -> float:
    """The progress bar's smoothed loss after a step whose loss was ``value``."""
    return value if running is None else running + LOSS_SMOOTHING * (value - running)


def share_readable(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes a
    newly created file or folder gets under the process's umask (0644 and
    0755 under the usual 022). safetensors writes its files 0600, which a
    server running as another user (as in the container) could not read."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
