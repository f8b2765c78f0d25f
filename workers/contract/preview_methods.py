"""The preview methods requests may name, without torch.

A preview method draws a picture of a denoising step's predicted image. The
API names the methods in its ``PreviewMethod`` enum; workers know each one by
the lower-case rest of its value's name (``PREVIEW_METHOD_TAESD`` is
"taesd"), which is what jobs carry and what :class:`ModelInfo.preview_methods
<imago.workers.contract.protocol.ModelInfo>` lists. This module derives those
names from the enum, so that a new method is one new enum value here; how a
worker draws it is registered in :mod:`imago.workers.families.diffusion.previews`.
"""

from __future__ import annotations

from imago.v1 import imagegen_pb2

_PREFIX = "PREVIEW_METHOD_"

#: The method every image model runs (it needs no weights of its own), and
#: what an unset ``PreviewOptions.method`` means.
DEFAULT_PREVIEW_METHOD = "latent_rgb"

#: ``PreviewMethod`` enum value -> the name workers know the method by, for
#: every value the API defines; PREVIEW_METHOD_UNSPECIFIED is the default.
PREVIEW_METHOD_BY_VALUE: dict[int, str] = {
    value: (
        DEFAULT_PREVIEW_METHOD
        if value == imagegen_pb2.PREVIEW_METHOD_UNSPECIFIED
        else name.removeprefix(_PREFIX).lower()
    )
    for name, value in imagegen_pb2.PreviewMethod.items()
}

#: The name of every method, in the order of the enum.
PREVIEW_METHOD_NAMES: tuple[str, ...] = tuple(
    PREVIEW_METHOD_BY_VALUE[value]
    for value in sorted(PREVIEW_METHOD_BY_VALUE)
    if value != imagegen_pb2.PREVIEW_METHOD_UNSPECIFIED
)


def preview_method_name(value: int) -> str | None:
    """The name of ``PreviewMethod`` enum value ``value``; None for a value
    the API does not define."""
    return PREVIEW_METHOD_BY_VALUE.get(value)
