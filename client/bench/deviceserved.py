"""The served side of ``imago bench-device``: requests to a running server,
timed from sending to the answer. Times are in seconds.

Stable Diffusion is timed one Generate request at a time, captions in rounds
of concurrent Caption requests; the new tokens of a round come from the
server's own count (its ``imago_generated_tokens`` metric), since a reply
does not carry them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from imago.client import api
from imago.client.bench import devicereport
from imago.client.bench.closedloop import BenchError
from imago.client.options import DiffusionOptions, PreviewOptions, TextOptions


@dataclass
class ServedRun:
    """Measured requests: wall ``seconds`` of each, the worker's reported
    ``inference_seconds``, seconds to the first preview, and the encoded
    first image of the last one."""

    seconds: list[float] = field(default_factory=list)
    inference_seconds: list[float] = field(default_factory=list)
    first_preview_s: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    image: bytes | None = None


def served_generate(
    client: api.ImagoClient, args: argparse.Namespace, batch: int, method: str | None = None
) -> ServedRun:
    """One unmeasured Generate request, then ``--repeats`` measured ones, of
    ``batch`` images; with a preview every step by ``method`` when given."""
    diffusion = DiffusionOptions(
        width=args.size,
        height=args.size,
        steps=args.steps,
        seed=args.seed,
        guidance_scale=args.guidance,
        num_images=batch,
    )
    previews = PreviewOptions(every_n_steps=int(bool(method)), method=method or "latent_rgb")
    run = ServedRun()
    for repeat in range(args.repeats + 1):
        started, first, result = time.perf_counter(), None, None
        events = client.generate(args.prompt, diffusion=diffusion, previews=previews)
        try:
            for event in events:
                which = event.WhichOneof("event")
                if which == "preview" and first is None:
                    first = time.perf_counter() - started
                elif which == "result":
                    seconds, result = time.perf_counter() - started, event.result
                    break
        finally:
            events.close()
        if result is None:
            raise BenchError("a generation stream ended without a result")
        if repeat:
            run.seconds.append(seconds)
            run.inference_seconds.append(result.info.inference_seconds)
            run.first_preview_s += [first] if first is not None else []
            run.image = result.images[0].image.data
    return run


async def served_captions(
    target: str,
    image: bytes,
    batch: int,
    args: argparse.Namespace,
    count_tokens: Callable[[], float | None],
) -> tuple[ServedRun, float | None]:
    """One unmeasured round of ``batch`` concurrent Caption requests, then
    ``--repeats`` measured rounds; returns the rounds and the new tokens per
    measured round by ``count_tokens`` (the server's running total)."""
    generation = TextOptions(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False)  # fmt: skip
    run = ServedRun()
    async with api.AsyncImagoClient(target, timeout=args.timeout) as client:
        before = None
        for repeat in range(args.repeats + 1):
            if repeat == 1:
                before = count_tokens()
            started = time.perf_counter()
            replies = await asyncio.gather(
                *(client.caption(image, generation=generation) for _ in range(batch))
            )
            if repeat:
                run.seconds.append(time.perf_counter() - started)
                run.batch_sizes += [reply.info.batch_size for reply in replies]
        after = count_tokens()
    tokens = None if before is None or after is None else (after - before) / args.repeats
    return run, tokens


def tokens_counter(metrics_port: int, model: str) -> Callable[[], float | None]:
    """A function giving the server's count of new tokens ``model`` generated
    so far, read from its Prometheus endpoint on ``metrics_port``; None when
    it cannot be read."""

    def count() -> float | None:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
        except OSError:
            return None
        return devicereport.counter_value(text, "imago_generated_tokens_total", {"model": model})

    return count
