"""Image jobs for tests, from flat keywords.

Tests vary a job one setting at a time, and ``image_job(steps=3,
preview_every=1)`` reads better than the nested DiffusionParams, OutputSpec
and PreviewSpec spelt out. Keywords are the job's own fields (prompt, seed,
num_images, strength...), the DiffusionParams fields by their names, and the
output and preview fields by the names in :data:`OUTPUT` and :data:`PREVIEW`.
"""

from __future__ import annotations

from typing import Any, TypeVar

from imago.workers.contract.jobs import DiffusionParams, OutputSpec, PreviewSpec, TextToImageJob

PARAMS = ("width", "height", "steps", "guidance_scale", "scheduler", "loras")
#: Flat keyword -> OutputSpec field.
OUTPUT = {
    "output_format": "format",
    "output_quality": "quality",
    "embed_parameters": "embed_parameters",
}
#: Flat keyword -> PreviewSpec field.
PREVIEW = {
    "preview_every": "every",
    "preview_format": "format",
    "preview_max_size": "max_size",
    "preview_method": "method",
    "preview_all_images": "all_images",
}

ImageJobType = TypeVar("ImageJobType", bound=TextToImageJob)


def image_job(kind: type[ImageJobType] = TextToImageJob, **fields: Any) -> ImageJobType:
    """A ``kind`` job of ``fields``. Every DiffusionParams field without a
    default must be given; output and preview fields default as their specs do."""
    params = {name: fields.pop(name) for name in PARAMS if name in fields}
    output = {OUTPUT[name]: fields.pop(name) for name in list(fields) if name in OUTPUT}
    preview = {PREVIEW[name]: fields.pop(name) for name in list(fields) if name in PREVIEW}
    return kind(
        params=DiffusionParams(**params),
        output=OutputSpec(**output),
        preview=PreviewSpec(**preview),
        **fields,
    )
