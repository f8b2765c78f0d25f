"""The direct side of ``imago bench-device``: the served models called through
the libraries themselves in this process, timed on the device.

The models come from the server's own loader (:func:`imago.workers.runtime.main.load_runners`)
with the same model specs, so they have the served weights, dtype and
attention kernel; only the plain library calls are made on them: the
diffusers ``StableDiffusionPipeline`` call and transformers' ``generate``.
Every timing synchronises the device before and after (on CUDA), so a wall
time covers the work and not only its launch. Times are in seconds.
"""

from __future__ import annotations

import io
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from imago.workers.contract.presets import ModelSpec
from imago.workers.contract.preview_methods import DEFAULT_PREVIEW_METHOD, PREVIEW_METHOD_NAMES
from imago.workers.families.diffusion.previews import encode_image

T = TypeVar("T")


@dataclass
class DirectModels:
    """The Stable Diffusion pipeline and BLIP-2 model and processor the server
    would load for the same specs, on ``device``. ``preview_methods`` are the
    preview methods the SD model offers (latent_rgb always)."""

    device: str
    pipe: Any
    preview_methods: list[str]
    model: Any
    processor: Any
    pixel_dtype: torch.dtype

    def dtypes(self) -> dict[str, str]:
        """The dtype of the SD UNet and of the BLIP-2 vision tower, e.g. "float16"."""
        name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
        return {"sd_unet": name(self.pipe.unet.dtype), "blip2_vision": name(self.pixel_dtype)}


@dataclass
class DirectRun:
    """Measured calls: ``seconds`` the wall time of each, ``tokens`` the new
    tokens of each (captions), ``image`` the first image of the last call (SD)."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    image: Image.Image | None = None


def cuda_available() -> bool:
    """Whether torch sees a CUDA device."""
    return torch.cuda.is_available()


def resolve_device(requested: str | None) -> str:
    """``requested`` ("cpu", "cuda" or "cuda:N"), or the first GPU when torch
    sees one and "cpu" otherwise; a GPU always as "cuda:N"."""
    if requested is None:
        requested = "cuda" if cuda_available() else "cpu"
    if requested == "cuda":
        return "cuda:0"
    return requested


def use_device(device: str) -> None:
    """Make ``device`` this process's current GPU, so that synchronising and
    memory figures concern it."""
    if device.startswith("cuda"):
        torch.cuda.set_device(device)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform says."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_description(device: str) -> dict[str, Any]:
    """The device's name and the library versions, for the report."""
    import diffusers
    import transformers

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu ({cpu_model()}, {os.cpu_count()} logical cores)"
    return {
        "name": name,
        "kind": "cuda" if device.startswith("cuda") else device,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def load_direct(
    sd: ModelSpec, blip2: ModelSpec, device: str, dtype: str, cache_dir: str | None
) -> DirectModels:
    """Load ``sd`` and ``blip2`` onto ``device`` as a worker would, in ``dtype``
    ("auto": the server's default), uncompiled. RuntimeError names a model
    that cannot be loaded."""
    from transformers.utils import logging as transformers_logging

    from imago.workers.runtime.inprocess import quiet_libraries
    from imago.workers.runtime.main import load_runners

    quiet_libraries()

    transformers_logging.disable_progress_bar()

    # The direct side runs eagerly whatever the preset says.
    specs = tuple(replace(s, settings=replace(s.settings, compile="off")) for s in (sd, blip2))
    if dtype != "auto":
        from imago.workers.contract.settings import SettingEntries, with_device_settings

        specs = with_device_settings(specs, SettingEntries(dtype=(dtype,)))
    runners = load_runners(list(specs), device, cache_dir)
    image_runner, text_runner = runners[sd.name], runners[blip2.name]
    image_runner.pipe.set_progress_bar_config(disable=True)
    methods = [DEFAULT_PREVIEW_METHOD, *image_runner.info().preview_methods]
    return DirectModels(
        device=device,
        pipe=image_runner.pipe,
        preview_methods=[m for m in PREVIEW_METHOD_NAMES if m in methods],
        model=text_runner.model,
        processor=text_runner.processor,
        pixel_dtype=text_runner.pixel_dtype,
    )


def timed(call: Callable[[], T], device: str) -> tuple[float, T]:
    """Wall seconds of ``call()`` with the device idle before and after, and its value."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    value = call()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, value


def time_text_to_image(
    models: DirectModels,
    prompt: str,
    batch: int,
    steps: int,
    size: int,
    guidance: float,
    seed: int,
    repeats: int,
) -> DirectRun:
    """One unmeasured pipeline call, then ``repeats`` measured ones, each
    ``batch`` images of ``size`` x ``size`` pixels in ``steps`` steps,
    returning PIL images. Image i has a CPU generator seeded ``seed + i``, as
    on the server, so the images equal the served ones."""

    def call() -> Any:
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
        return models.pipe(
            prompt,
            num_images_per_prompt=batch,
            num_inference_steps=steps,
            height=size,
            width=size,
            guidance_scale=guidance,
            generator=generators,
        )

    timed(call, models.device)
    run = DirectRun()
    for _ in range(repeats):
        seconds, output = timed(call, models.device)
        run.seconds.append(seconds)
        run.image = output.images[0]
    return run


def new_tokens(sequences: torch.Tensor, prompt_length: int, eos: int | Sequence[int] | None) -> int:
    """New tokens in ``sequences`` (rows of prompt then continuation), each row
    counted up to and including its first end of text, as the server counts."""
    continuations = sequences[:, prompt_length:]
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    is_eos = torch.isin(continuations, torch.tensor(ids, device=continuations.device)).int()
    return int(((is_eos.cumsum(dim=1) - is_eos) == 0).sum())


def time_captions(
    models: DirectModels, image: Image.Image, batch: int, tokens: int, repeats: int
) -> DirectRun:
    """One unmeasured ``generate`` call, then ``repeats`` measured ones, each
    captioning ``batch`` copies of ``image`` greedily with exactly ``tokens``
    new tokens (min_new_tokens = max_new_tokens). The processor's work is
    part of each call."""
    model, processor = models.model, models.processor
    eos = model.generation_config.eos_token_id

    def call() -> int:
        inputs = processor(images=[image] * batch, return_tensors="pt")
        inputs = inputs.to(models.device, models.pixel_dtype)
        output = model.generate(
            **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
        )
        # Without input_ids, generate starts from the image tokens and BOS.
        prompt = inputs["input_ids"].shape[1] if "input_ids" in inputs else None
        return new_tokens(output, prompt or model.config.num_query_tokens + 1, eos)

    timed(call, models.device)
    run = DirectRun()
    for _ in range(repeats):
        seconds, count = timed(call, models.device)
        run.seconds.append(seconds)
        run.tokens.append(count)
    return run


def png_encode_ms(image: Image.Image, repeats: int = 5) -> float:
    """Median milliseconds to encode ``image`` as the server encodes a PNG
    result (with a ``parameters`` text chunk)."""
    text = {"parameters": "a lighthouse at dusk\nSteps: 20, Sampler: PNDM, CFG scale: 7.5"}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        encode_image(image, "PNG", text=text)
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def max_pixel_difference(encoded: bytes, image: Image.Image) -> int:
    """Largest difference of any channel of any pixel (0..255) between the
    encoded image ``encoded`` and ``image``; 255 when their sizes differ."""
    with Image.open(io.BytesIO(encoded)) as opened:
        served = np.asarray(opened.convert("RGB"), dtype=np.int16)
    direct = np.asarray(image.convert("RGB"), dtype=np.int16)
    if served.shape != direct.shape:
        return 255
    return int(np.abs(served - direct).max())
