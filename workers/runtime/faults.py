"""Faults injected on purpose, to test how the server copes with failing workers.

Off by default. A worker started with ``IMAGO_INJECT_FAULTS=1`` in its
environment (the server's environment is inherited) looks in every request it
runs for the marker ``__imago_fault__:KIND``, in any of the request's texts
(its job's ``texts``: caption prefix, question, prompt, negative prompt or
alignment texts). A marked request makes the worker misbehave the first time
its runner checks it for cancellation after reporting it started, that is
inside the model call, where real faults happen:

``oom``
    raise ``torch.cuda.OutOfMemoryError`` (as an accelerator running out of memory)
``memoryerror``
    raise ``MemoryError`` (as the host running out of memory)
``hang``
    stop forever, sending nothing (as a deadlocked kernel or driver)
``exit``
    end the process at once with exit code :data:`EXIT_CODE` (as a crash)

Without the variable, or with any other value than ``1``, markers are ordinary
text. Unknown kinds are ignored.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping

from imago.workers.contract.jobs import Job

#: Environment variable that enables fault injection when it is "1".
ENV = "IMAGO_INJECT_FAULTS"
MARKER = "__imago_fault__:"
KINDS = ("oom", "memoryerror", "hang", "exit")
#: Exit code of the ``exit`` fault (EX_SOFTWARE).
EXIT_CODE = 70

_KIND = re.compile(re.escape(MARKER) + r"([a-z]+)")


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether markers in requests are obeyed."""
    return environ.get(ENV) == "1"


def fault_of(job: Job) -> str | None:
    """The fault ``job`` asks for with a marker, or None."""
    for text in job.texts:
        for kind in _KIND.findall(text):
            if kind in KINDS:
                return kind
    return None


def trigger(kind: str) -> None:
    """Misbehave as ``kind`` says; returns only for an unknown kind."""
    if kind == "oom":
        import torch

        raise torch.cuda.OutOfMemoryError("injected fault: CUDA out of memory")
    if kind == "memoryerror":
        raise MemoryError("injected fault: out of host memory")
    if kind == "exit":
        os._exit(EXIT_CODE)
    if kind == "hang":
        while True:
            time.sleep(3600)
