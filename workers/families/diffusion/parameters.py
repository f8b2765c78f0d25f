"""The generation parameters embedded in PNG results.

They are written as one text chunk named ``parameters`` in the layout
AUTOMATIC1111's web UI writes and that image browsers, ComfyUI loaders and
model-sharing sites read back: the prompt, an optional ``Negative prompt:``
line, then comma-separated ``key: value`` settings. LoRA adapters are
named in the prompt line as ``<lora:NAME:WEIGHT>``, as those tools write them.
"""

from __future__ import annotations

from imago.workers.contract.jobs import ImageToImageJob, TextToImageJob

#: How those tools name each scheduler imago offers.
SAMPLER_LABELS: dict[str, str] = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "lms": "LMS",
    "unipc": "UniPC",
}


def parameters_text(job: TextToImageJob, seed: int, model: str, sampler: str) -> str:
    """The ``parameters`` text of the image made with ``seed`` by ``job`` on
    ``model``; ``sampler`` labels the scheduler that ran."""
    loras = " ".join(f"<lora:{name}:{weight:g}>" for name, weight in job.params.loras)
    lines = [f"{job.prompt} {loras}" if loras else job.prompt]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    params = job.params
    settings = [
        ("Steps", params.steps),
        ("Sampler", sampler),
        ("CFG scale", f"{params.guidance_scale:g}"),
        ("Seed", seed),
        ("Size", f"{params.width}x{params.height}"),
        ("Model", model),
    ]
    # Only image-to-image and inpainting have a strength (text-to-image's is 1).
    if isinstance(job, ImageToImageJob):
        settings.append(("Denoising strength", f"{job.strength:g}"))
    lines.append(", ".join(f"{key}: {value}" for key, value in settings))
    return "\n".join(lines)
