"""Denoising schedulers a request may name. Torch-free: the frontend
validates names against :data:`SCHEDULERS` before anything is queued.

Each name maps to a diffusers scheduler class and the config overrides that
make it the sampler people know by that name (A1111 / ComfyUI naming). The
worker builds it with ``from_config`` from the model's own scheduler config,
so the checkpoint's noise schedule (betas, timestep spacing, prediction type)
carries over and nothing is reloaded.
"""

from __future__ import annotations

SCHEDULERS: dict[str, tuple[str, dict[str, object]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def check_scheduler(name: str) -> str | None:
    """None when ``name`` is "" (the model's own scheduler) or a known name,
    else a message listing the known ones."""
    if not name or name in SCHEDULERS:
        return None
    return f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}"
