"""Which devices the workers run on, and how CPU workers share the cores.

Torch-free: the frontend asks nvidia-smi, never torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

log = logging.getLogger("imago.pool")


def detect_devices(workers: int, cpu_only: bool) -> list[str]:
    """One "cuda:N" per visible NVIDIA GPU, else ``workers`` times "cpu".

    Asks nvidia-smi rather than torch, so the frontend never imports torch.
    """
    if not cpu_only:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            ids = [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
            if ids:
                return [f"cuda:{i}" for i in ids]
        elif shutil.which("nvidia-smi"):
            try:
                listing = subprocess.run(
                    ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
                ).stdout
                count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
                if count:
                    return [f"cuda:{i}" for i in range(count)]
            except (OSError, subprocess.SubprocessError):
                log.warning("nvidia-smi failed; starting CPU workers")
    return ["cpu"] * max(1, workers)


def cpu_threads(devices: list[str]) -> int:
    """Compute threads for each CPU worker: this process's cores shared out
    evenly, so that several CPU workers do not oversubscribe them."""
    workers = sum(1 for device in devices if device == "cpu")
    if not workers:
        return 0
    return max(1, len(os.sched_getaffinity(0)) // workers)
