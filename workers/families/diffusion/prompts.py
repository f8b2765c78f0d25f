"""What CLIP does not see of a prompt: Stable Diffusion pipelines keep the
first ``model_max_length`` tokens (start and end tokens included) and drop
the rest silently, so the runner names the dropped text in a warning."""

from __future__ import annotations

from typing import Any

from imago.workers.contract.jobs import TextToImageJob


def dropped_text(tokenizer: Any, text: str) -> str:
    """The part of ``text`` past ``tokenizer``'s limit, "" when it all fits."""
    if not text:
        return ""
    ids = tokenizer(text, truncation=False, verbose=False).input_ids
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return ""
    # Same slice as diffusers' own truncation log: everything between the
    # last kept position (given to the end token) and the end token.
    return tokenizer.decode(ids[limit - 1 : -1])


def truncation_warnings(tokenizer: Any, job: TextToImageJob) -> list[str]:
    """A warning for the prompt and the negative prompt each, naming the text
    the model will ignore, when there is any."""
    warnings = []
    for name, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
        dropped = dropped_text(tokenizer, text)
        if dropped:
            limit = tokenizer.model_max_length
            warnings.append(f"{name} is longer than {limit} tokens; ignored: {dropped!r}")
    return warnings
