"""Local files of the command line: reading inputs and writing outputs, with
failures turned into :class:`InputError` (exit status 2) naming the path."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class InputError(Exception):
    """A local file that cannot be read or written."""


@contextlib.contextmanager
def local(verb: str, path: str | Path) -> Iterator[None]:
    """Turns an OSError into an InputError naming ``path``."""
    try:
        yield
    except OSError as err:
        raise InputError(f"cannot {verb} {path}: {err.strerror or err}") from None


def read(path: str) -> bytes:
    """The bytes of the file at ``path``; InputError naming it when unreadable."""
    with local("read", path):
        return Path(path).read_bytes()
