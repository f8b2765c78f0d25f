"""Closed-loop load generation and its statistics, for ``imago bench``.

What requests to send (:func:`parse_mix`, :func:`rotation`, :class:`Plan`,
:func:`sample_image`); sending them (:func:`drive`: closed-loop workers on one
``grpc.aio`` channel, after an :func:`rpc_floor_ms` probe) or running them
with no server (:func:`run_in_process`); what the outcomes come to
(:class:`Outcome`, :func:`percentile`, :func:`summarize`, :func:`phase_report`).
Every clock is ``time.perf_counter``. Importing this module pulls in neither
torch nor the server; numpy and PIL are imported by :func:`sample_image` only.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from imago.client import api
from imago.client.options import DiffusionOptions, PreviewOptions, TextOptions

KINDS = ("caption", "vqa", "generate")
#: Kinds whose requests carry the sample input image.
IMAGE_KINDS = ("caption", "vqa")
SERVICES = dict(zip(KINDS, ("imago.v1.CaptionService", "imago.v1.VqaService",
                            "imago.v1.ImageGenService"), strict=True))  # fmt: skip
#: Encodings :func:`sample_image` makes: PIL format name and save options.
IMAGE_FORMATS = {"jpeg": ("JPEG", {"quality": 90}), "png": ("PNG", {})}
#: Health checks of :func:`rpc_floor_ms`: measured, and unmeasured before them.
FLOOR_CALLS, FLOOR_WARMUP = 200, 20


# ------------------------------------------------------------------ mix


def parse_mix(text: str) -> dict[str, int]:
    """``"caption=2,vqa=1"`` as ``{"caption": 2, "vqa": 1}``, in the order
    given. A kind without ``=W`` weighs 1. ValueError for an unknown or
    repeated kind or a weight that is not a positive integer."""
    mix: dict[str, int] = {}
    for entry in text.split(","):
        kind, sep, weight_text = (part.strip() for part in entry.partition("="))
        if kind not in KINDS:
            known = ", ".join(KINDS)
            raise ValueError(f"unknown request kind {kind!r} in mix {text!r}; known: {known}")
        if kind in mix:
            raise ValueError(f"{kind} appears twice in mix {text!r}")
        weight = int(weight_text) if weight_text.isdigit() else 0 if sep else 1
        if weight < 1:
            raise ValueError(f"weight of {kind} must be a positive integer, got {weight_text!r}")
        mix[kind] = weight
    return mix


def rotation(mix: dict[str, int]) -> list[str]:
    """One period of the request kinds: each kind as often as its weight,
    spread out by smooth weighted round robin (nginx's); ties go to the kind
    named first. Request i has kind ``rotation[i % len(rotation)]``."""
    total = sum(mix.values())
    current = dict.fromkeys(mix, 0)
    order = []
    for _ in range(total):
        for kind, weight in mix.items():
            current[kind] += weight
        chosen = max(current, key=current.__getitem__)
        current[chosen] -= total
        order.append(chosen)
    return order


# ------------------------------------------------------------------ figures


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) of ``values``: the value at rank
    (n-1)*p/100 of the sorted values, interpolated linearly between the two
    nearest ranks (``numpy.percentile``'s default, "linear")."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; None when either is None or ``b`` is 0."""
    return a / b if a is not None and b else None


@dataclass
class Outcome:
    """One measured request: ``seconds`` of latency, ``code`` "OK" or a gRPC
    status code name, ``batch_size`` 0 when unknown."""

    kind: str
    index: int
    seconds: float
    code: str = "OK"
    images: int = 0
    batch_size: int = 0
    text: str | None = None
    # Seconds from sending a generation to its first preview, when it had one.
    first_preview_s: float | None = None


def summarize(outcomes: Sequence[Outcome], elapsed_s: float) -> dict[str, Any]:
    """Figures of ``outcomes`` measured over ``elapsed_s`` seconds of wall time:
    ``completed``; ``errors`` {code name: count}; ``throughput_rps`` (completed
    per second of ``elapsed_s``); ``images_per_s`` (None without generate
    requests); ``latency_ms`` p50/p95/p99/mean of the completed ones (None
    when none completed); ``mean_batch_size`` (of ``batch_size`` > 0, None
    when none reported); ``first_preview_ms`` (p50 from sending a generation
    to its first preview, None without previews); ``elapsed_s``."""
    done = [o for o in outcomes if o.code == "OK"]
    millis = [o.seconds * 1000 for o in done]
    batches = [o.batch_size for o in done if o.batch_size > 0]
    latency = dict.fromkeys(("p50", "p95", "p99", "mean"))
    if millis:
        latency = {f"p{p}": percentile(millis, p) for p in (50, 95, 99)}
        latency["mean"] = sum(millis) / len(millis)
    images = sum(o.images for o in done)
    generates = any(o.kind == "generate" for o in outcomes)
    firsts = [o.first_preview_s * 1000 for o in done if o.first_preview_s is not None]
    return {
        "completed": len(done),
        "errors": dict(sorted(Counter(o.code for o in outcomes if o.code != "OK").items())),
        "throughput_rps": len(done) / elapsed_s if elapsed_s > 0 else 0.0,
        "images_per_s": (images / elapsed_s if elapsed_s > 0 else 0.0) if generates else None,
        "latency_ms": latency,
        "mean_batch_size": sum(batches) / len(batches) if batches else None,
        "first_preview_ms": percentile(firsts, 50) if firsts else None,
        "elapsed_s": elapsed_s,
    }


def phase_report(outcomes: Sequence[Outcome], elapsed_s: float) -> dict[str, Any]:
    """:func:`summarize` overall and per kind (kinds in KINDS order)."""
    kinds = [k for k in KINDS if any(o.kind == k for o in outcomes)]
    return {
        "elapsed_s": elapsed_s,
        "overall": summarize(outcomes, elapsed_s),
        "kinds": {k: summarize([o for o in outcomes if o.kind == k], elapsed_s) for k in kinds},
    }


# ------------------------------------------------------------------ requests


def sample_image(side: int = 224, fmt: str = "jpeg", seed: int = 0) -> bytes:
    """A ``side`` x ``side`` RGB image that looks like a photo to an encoder:
    a smooth sky-to-ground gradient, a few filled shapes with soft edges and
    mild sensor-like noise, all drawn from ``seed``; encoded as ``fmt``, JPEG
    (quality 90, what a camera or browser sends) or PNG. The same arguments
    give the same bytes. ValueError for another format."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, not {fmt!r}")
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    down = np.linspace(0.0, 1.0, side)[:, None, None]
    across = np.linspace(-0.5, 0.5, side)[None, :, None]
    top, bottom = rng.uniform(90, 230, 3), rng.uniform(20, 140, 3)
    pixels = top + (bottom - top) * down + rng.uniform(-40, 40, 3) * across
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for shape in range(5):
        x, y = rng.uniform(-0.1, 0.8, 2) * side
        w, h = rng.uniform(0.15, 0.45, 2) * side
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if shape % 3 == 0:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        elif shape % 3 == 1:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        else:
            draw.polygon([(x, y + h), (x + w / 2, y), (x + w, y + h)], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(max(side / 224, 0.5)))
    noisy = np.asarray(image, np.float32) + rng.normal(0, 3, (side, side, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    name, options = IMAGE_FORMATS[fmt]
    image.save(buffer, name, **options)
    return buffer.getvalue()


@dataclass(frozen=True)
class Plan:
    """Every request of a run: request ``i`` has kind ``order[i % len]``,
    seed ``seed + i`` and otherwise the arguments all requests share: the
    encoded input ``image``, ``size`` (width = height of generated images in
    pixels, 0: the model's), ``steps`` and ``preview_every`` (in steps)."""

    order: tuple[str, ...]
    image: bytes
    question: str
    prompt: str
    steps: int
    size: int
    seed: int
    preview_every: int
    preview_method: str = "latent_rgb"

    def kind(self, index: int) -> str:
        return self.order[index % len(self.order)]

    def text(self, index: int) -> TextOptions:
        """How text request ``index`` is generated: greedy, fixed seed."""
        return TextOptions(do_sample=False, seed=self.seed + index)

    def generate_options(self, index: int) -> dict[str, Any]:
        """Keywords of ``generate`` for generate request ``index``: its
        diffusion and preview options."""
        size, seed = self.size, self.seed + index
        diffusion = DiffusionOptions(width=size, height=size, steps=self.steps, seed=seed)
        previews = PreviewOptions(every_n_steps=self.preview_every, method=self.preview_method)
        return {"diffusion": diffusion, "previews": previews}

    def proto(self, index: int) -> Any:
        """The protobuf request the client sends for request ``index``."""
        kind = self.kind(index)
        if kind == "caption":
            return api.caption_request(self.image, generation=self.text(index))
        if kind == "vqa":
            return api.ask_request(self.image, self.question, generation=self.text(index))
        return api.generate_request(self.prompt, **self.generate_options(index))


# ------------------------------------------------------------------ driving


async def _one(client: api.AsyncImagoClient, plan: Plan, index: int) -> Outcome:
    kind = plan.kind(index)
    started = time.perf_counter()
    try:
        if kind != "generate":
            if kind == "caption":
                reply = await client.caption(plan.image, generation=plan.text(index))
            else:
                reply = await client.ask(plan.image, plan.question, generation=plan.text(index))
            seconds = time.perf_counter() - started
            texts = reply.captions if kind == "caption" else reply.answers
            text = texts[0].text if texts else ""
            return Outcome(kind, index, seconds, batch_size=reply.info.batch_size, text=text)
        events = client.generate(plan.prompt, **plan.generate_options(index))
        first_preview = None
        try:
            async for event in events:
                which = event.WhichOneof("event")
                if which == "preview" and first_preview is None:
                    first_preview = time.perf_counter() - started
                elif which == "result":
                    seconds, result = time.perf_counter() - started, event.result
                    count, batch = len(result.images), result.info.batch_size
                    return Outcome(
                        kind, index, seconds, images=count, batch_size=batch,
                        first_preview_s=first_preview,
                    )  # fmt: skip
        finally:
            await events.aclose()
        return Outcome(kind, index, time.perf_counter() - started, code="NO_RESULT")
    except grpc.RpcError as err:
        code = err.code().name if hasattr(err, "code") else "UNKNOWN"
        return Outcome(kind, index, time.perf_counter() - started, code=code)


async def _loop(
    client: api.AsyncImagoClient,
    plan: Plan,
    workers: int,
    count: int | None,
    duration: float | None,
) -> tuple[list[Outcome], float]:
    outcomes: list[Outcome] = []
    indices = itertools.count()
    started = time.perf_counter()
    deadline = None if duration is None else started + duration

    async def worker() -> None:
        for index in indices:
            if count is not None and index >= count:
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            outcomes.append(await _one(client, plan, index))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return outcomes, time.perf_counter() - started


async def rpc_floor_ms(
    client: api.AsyncImagoClient, calls: int = FLOOR_CALLS, warmup: int = FLOOR_WARMUP
) -> float:
    """p50 in ms of ``calls`` sequential ``grpc.health.v1`` Check round trips
    on ``client``'s channel, after ``warmup`` unmeasured ones: what a call
    costs that does no work, the least any served request can cost."""
    for _ in range(warmup):
        await client.health()
    millis = []
    for _ in range(calls):
        started = time.perf_counter()
        await client.health()
        millis.append((time.perf_counter() - started) * 1000)
    return percentile(millis, 50)


@dataclass
class Load:
    """What :func:`drive` measured: the channel's :func:`rpc_floor_ms` and,
    per plan, the measured outcomes and the phase's wall seconds."""

    rpc_floor_ms: float | None
    phases: list[tuple[list[Outcome], float]]


async def drive(
    target: str,
    plans: Sequence[Plan],
    concurrency: int,
    count: int | None,
    duration: float | None,
    warmup: int,
    timeout: float | None = None,
    floor_calls: int = FLOOR_CALLS,
) -> Load:
    """Closed-loop load on one channel. First :func:`rpc_floor_ms` with
    ``floor_calls`` health checks (none when 0). Then for each plan:
    ``warmup`` unmeasured requests, then ``count`` requests or ``duration``
    seconds, whichever ends first, from ``concurrency`` workers. A server
    that cannot be reached raises :class:`grpc.RpcError`."""
    load = Load(None, [])
    async with api.AsyncImagoClient(target, timeout=timeout) as client:
        await client.health()
        if floor_calls > 0:
            load.rpc_floor_ms = await rpc_floor_ms(client, floor_calls)
        for plan in plans:
            await _loop(client, plan, concurrency, warmup, None)
            load.phases.append(await _loop(client, plan, concurrency, count, duration))
    return load


def run_in_process(
    plan: Plan,
    indices: Sequence[int],
    warmup: int,
    batch_size: int,
    prepare: Callable[[int], tuple[Any, Any] | str],
) -> dict[str, Any]:
    """Requests ``indices`` of ``plan`` run in this process, no server: first
    ``warmup`` unmeasured requests, then each alone (one ``runner.run`` call
    each), then in batches of up to ``batch_size`` requests of one kind.
    ``prepare(index)`` gives the runner and the ``Request`` of request
    ``index``, or the gRPC status code name a server would answer it with.
    Returns :func:`phase_report` "sequential" and "batched" and the
    sequential :class:`Outcome` list as "outcomes"."""
    from imago.workers.runtime.inprocess import run_calls

    prepared, rejected = {}, {}
    for index in sorted({*range(warmup), *indices}):
        ready = prepare(index)
        if isinstance(ready, str):
            rejected[index] = Outcome(plan.kind(index), index, 0.0, ready)
        else:
            prepared[index] = ready

    def run(batches: list[list[int]]) -> tuple[list[Outcome], float]:
        kept = [[i for i in batch if i in prepared] for batch in batches]
        calls = [(prepared[b[0]][0], [prepared[i][1] for i in b]) for b in kept if b]
        results, seconds = run_calls(calls)
        done = [rejected[i] for batch in batches for i in batch if i in rejected]
        done += [Outcome(plan.kind(i), i, r.seconds, r.code, len(r.images), r.batch_size,
                         r.texts[0] if r.texts else None)
                 for i, r in zip((i for b in kept for i in b), results, strict=True)]  # fmt: skip
        return done, seconds

    run([[i] for i in range(warmup)])
    sequential = run([[i] for i in indices])
    batches = []
    for kind in KINDS:
        mine = [i for i in indices if plan.kind(i) == kind]
        batches += [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    return {
        "sequential": phase_report(*sequential),
        "batched": phase_report(*run(batches)),
        "outcomes": sequential[0],
    }
