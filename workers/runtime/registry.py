"""The runner class of each family, imported when a worker loads a model.

:mod:`imago.workers.contract.families` holds only "module:attribute"
strings, so that the frontend can read the registry without importing torch;
this checks that what a string names is the family's Runner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imago.workers.contract.families import family, import_object

if TYPE_CHECKING:
    from imago.workers.runtime.runner import Runner


def load_runner_class(name: str) -> type[Runner]:
    """The Runner subclass of the family ``name``, imported on first use.
    ValueError for an unknown family; TypeError when the registry names a
    class that is not that family's Runner."""
    from imago.workers.runtime.runner import Runner

    info = family(name)
    runner_class = import_object(info.runner)
    if not (isinstance(runner_class, type) and issubclass(runner_class, Runner)):
        raise TypeError(f"{info.runner} (runner of {name!r}) is not a Runner subclass")
    if runner_class.family != name:
        raise TypeError(f"{info.runner} is the runner of {runner_class.family!r}, not {name!r}")
    return runner_class
