"""Small random-weight checkpoints for machines without downloads.

Each builder writes a complete, seeded checkpoint to a directory that is then
loaded through the same ``from_pretrained`` path as a real one. Checkpoints
are cached under ``$IMAGO_CACHE`` (default ``~/.cache/imago``) and built once;
a file lock keeps concurrent workers from building the same one twice.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from imago.workers.contract.families import import_object, tiny_builders

# Bump when a builder changes, so stale caches are rebuilt rather than reused.
TINY_VERSION = "1"


def cache_dir() -> Path:
    return Path(os.environ.get("IMAGO_CACHE", Path.home() / ".cache" / "imago"))


def ensure(kind: str, root: Path | None = None) -> Path:
    """Directory of the tiny checkpoint ``kind``, building it on first use."""
    # Each family names the tiny kinds it provides, and their builders by import path.
    builders = tiny_builders()
    if kind not in builders:
        raise ValueError(f"unknown tiny model {kind!r}; known: {', '.join(sorted(builders))}")
    build: Callable[[Path], None] = import_object(builders[kind])
    root = root or cache_dir()
    target = root / f"tiny-{kind}-v{TINY_VERSION}"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").exists():
            return target
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        build(staging)
        (staging / ".complete").touch()
        staging.rename(target)
    return target


def resolve(source: str, root: Path | None = None) -> str:
    """Turn a ``tiny:<kind>`` source into its local directory; other sources
    (directories, hub ids) pass through unchanged. ``arch:<kind>`` sources
    raise ValueError: they are built in memory (:mod:`imago.workers.checkpoints.arch`)
    and have no checkpoint that ``from_pretrained`` could load."""
    if source.startswith("arch:"):
        # Passed through, they would reach the hub as an invalid repository id.
        raise ValueError(
            f"{source!r} is a random-weight architecture built in memory by "
            "imago.workers.checkpoints.arch for benchmarks; it has no checkpoint to load"
        )
    if source.startswith("tiny:"):
        return str(ensure(source.removeprefix("tiny:"), root))
    return source
