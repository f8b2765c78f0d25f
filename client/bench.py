"""``imago bench``: closed-loop load against a server, in the spirit of Triton's
perf_analyzer, with an in-process baseline measured side by side.

Every clock is ``time.perf_counter``; :func:`percentile` and :func:`summarize`
define the figures. Importing this module pulls in neither torch nor the
server: ``--baseline`` imports both when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc

from imago.client import api

KINDS = ("caption", "vqa", "generate")
SERVICES = dict(zip(KINDS, ("imago.v1.CaptionService", "imago.v1.VqaService",
                            "imago.v1.ImageGenService"), strict=True))  # fmt: skip

DESCRIPTION = """\
Drive closed-loop load at an imago server and print throughput and latency.

By default bench starts its own server ("imago serve --preset P" on a free
local port, plus any --server-arg), waits until it is SERVING and stops it at
the end. With --external it loads the server at imago's --target instead:
  imago --target HOST:PORT bench --external ...
--concurrency C workers each send their next request as soon as the previous
one is answered, for --requests N requests or --duration S seconds, after
--warmup unmeasured ones. Kinds follow --mix in a fixed weighted rotation;
text requests decode greedily, request i has seed --seed + i.

Latency runs from sending a request to its response (generate: to the Result
event). Percentiles interpolate linearly between ranks, as numpy.percentile
does. Throughput is completed requests (images) per second of the phase's wall
time; each kind's is over the same wall time. batch: mean info.batch_size.

--baseline then loads the preset's models in this process (no server) and runs
the same requests (same jobs, images, settings and seeds) one per call and in
batches of C of one kind, and prints overhead_ms (served p50 - in-process p50),
batched_ratio (served req/s / batched req/s) and sequential_speedup (served
req/s / one-at-a-time req/s). --compare-previews repeats the load with a
preview every step and prints previews_ratio (images/s with / without).

Exit status: 0; 1 when a request failed (figures are printed all the same) or
the server could not be started or reached; 2 for bad options."""


class BenchError(Exception):
    """A run that cannot go on (server did not start, model missing)."""


# ------------------------------------------------------------------ figures


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


def summarize(outcomes: Sequence[Outcome], elapsed_s: float) -> dict[str, Any]:
    """Figures of ``outcomes`` measured over ``elapsed_s`` seconds of wall time:
    ``completed``; ``errors`` {code name: count}; ``throughput_rps`` (completed
    per second of ``elapsed_s``); ``images_per_s`` (None without generate
    requests); ``latency_ms`` p50/p95/p99/mean of the completed ones (None
    when none completed); ``mean_batch_size`` (of ``batch_size`` > 0, None
    when none reported); ``elapsed_s``."""
    done = [o for o in outcomes if o.code == "OK"]
    millis = [o.seconds * 1000 for o in done]
    batches = [o.batch_size for o in done if o.batch_size > 0]
    latency = dict.fromkeys(("p50", "p95", "p99", "mean"))
    if millis:
        latency = {f"p{p}": percentile(millis, p) for p in (50, 95, 99)}
        latency["mean"] = sum(millis) / len(millis)
    images = sum(o.images for o in done)
    generates = any(o.kind == "generate" for o in outcomes)
    return {
        "completed": len(done),
        "errors": dict(sorted(Counter(o.code for o in outcomes if o.code != "OK").items())),
        "throughput_rps": len(done) / elapsed_s if elapsed_s > 0 else 0.0,
        "images_per_s": (images / elapsed_s if elapsed_s > 0 else 0.0) if generates else None,
        "latency_ms": latency,
        "mean_batch_size": sum(batches) / len(batches) if batches else None,
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


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ------------------------------------------------------------------ requests


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

    def kind(self, index: int) -> str:
        return self.order[index % len(self.order)]

    def settings(self, index: int) -> dict[str, Any]:
        """GenerationSettings of text request ``index``: greedy, fixed seed."""
        return {"do_sample": False, "seed": self.seed + index}

    def generate_options(self, index: int) -> dict[str, Any]:
        """Keywords of ``generate`` for generate request ``index``."""
        size, seed, every = self.size, self.seed + index, self.preview_every
        return dict(width=size, height=size, steps=self.steps, seed=seed, preview_every=every)

    def proto(self, index: int) -> Any:
        """The protobuf request the client sends for request ``index``."""
        kind = self.kind(index)
        if kind == "caption":
            return api.caption_request(self.image, **self.settings(index))
        if kind == "vqa":
            return api.ask_request(self.image, self.question, **self.settings(index))
        return api.generate_request(self.prompt, **self.generate_options(index))


def noise_png(side: int, seed: int = 0) -> bytes:
    """A ``side`` x ``side`` PNG of seeded colour noise over a gradient."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side] * (160 / max(side - 1, 1))
    pixels = np.stack([x, y, (x + y) / 2], -1)
    pixels += np.random.default_rng(seed).uniform(0, 95, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


async def _one(client: api.AsyncImagoClient, plan: Plan, index: int) -> Outcome:
    kind = plan.kind(index)
    started = time.perf_counter()
    try:
        if kind != "generate":
            if kind == "caption":
                reply = await client.caption(plan.image, **plan.settings(index))
            else:
                reply = await client.ask(plan.image, plan.question, **plan.settings(index))
            seconds = time.perf_counter() - started
            texts = reply.captions if kind == "caption" else reply.answers
            text = texts[0].text if texts else ""
            return Outcome(kind, index, seconds, batch_size=reply.info.batch_size, text=text)
        events = client.generate(plan.prompt, **plan.generate_options(index))
        try:
            async for event in events:
                if event.WhichOneof("event") == "result":
                    seconds, result = time.perf_counter() - started, event.result
                    count, batch = len(result.images), result.info.batch_size
                    return Outcome(kind, index, seconds, images=count, batch_size=batch)
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


async def drive(
    target: str,
    plans: Sequence[Plan],
    concurrency: int,
    count: int | None,
    duration: float | None,
    warmup: int,
    timeout: float | None = None,
) -> list[tuple[list[Outcome], float]]:
    """Closed-loop load on one channel. For each plan: ``warmup`` unmeasured
    requests, then ``count`` requests or ``duration`` seconds, whichever ends
    first, from ``concurrency`` workers. Returns (outcomes, wall seconds) per
    plan. A server that cannot be reached raises :class:`grpc.RpcError`."""
    phases = []
    async with api.AsyncImagoClient(target, timeout=timeout) as client:
        await client.health()
        for plan in plans:
            await _loop(client, plan, concurrency, warmup, None)
            phases.append(await _loop(client, plan, concurrency, count, duration))
    return phases


# ------------------------------------------------------------------ server


class OwnServer:
    """An ``imago serve`` subprocess on a free local port. Its output goes to
    a temporary file, whose end is quoted when the server fails to start."""

    def __init__(self, extra_args: Sequence[str], start_timeout_s: float) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.target = f"127.0.0.1:{port}"
        self.command = [sys.executable, "-m", "imago.client.cli", "serve"]
        self.command += ["--host", "127.0.0.1", "--port", str(port), *extra_args]
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()

    def _failure(self, what: str) -> BenchError:
        self._log.seek(0)
        tail = self._log.read().decode(errors="replace").splitlines()[-30:]
        return BenchError("\n".join([what + "; its last lines:", *tail]))

    def start(self) -> None:
        """Start the server and wait until its health is SERVING (BenchError if not)."""
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        with api.ImagoClient(self.target, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise self._failure(f"the server exited with {self.process.returncode}")
                try:
                    if client.health() == "SERVING":
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise self._failure(f"the server was not SERVING after {self.start_timeout_s:g} s")

    def stop(self) -> int | None:
        """SIGTERM the server and wait for it (SIGKILL after 60 s); its exit code."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return None if self.process is None else self.process.returncode


# ------------------------------------------------------------------ baseline


def run_baseline(
    plan: Plan,
    indices: Sequence[int],
    warmup: int,
    batch_size: int,
    preset_name: str,
    cache_dir: str | None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run requests ``indices`` of ``plan`` in this process, with no server.

    The jobs are those the server builds from the same protobuf requests (its
    own validation functions, default limits) and run on the preset's models
    loaded onto ``device``: first ``warmup`` unmeasured requests, then each
    request alone (one ``runner.run`` call each), then batches of up to
    ``batch_size`` requests of one kind. Returns phase reports "sequential"
    and "batched" and the sequential :class:`Outcome` list as "outcomes"."""
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from imago.server.config import Limits
    from imago.server.errors import RequestError
    from imago.server.images import check_image
    from imago.server.validation import caption_job, text_to_image_job, vqa_job
    from imago.workers.inprocess import run_direct
    from imago.workers.main import load_runners
    from imago.workers.presets import model_for_service, preset
    from imago.workers.runner import Request

    models = preset(preset_name)
    specs = {kind: model_for_service(models, SERVICES[kind]) for kind in set(plan.order)}
    missing = sorted(kind for kind, spec in specs.items() if spec is None)
    if missing:
        raise BenchError(f"preset {preset_name!r} has no model for {', '.join(missing)}")
    runners = load_runners(list({s.name: s for s in specs.values()}.values()), device, cache_dir)
    limits = Limits()

    def runner_of(index: int) -> Any:
        return runners[specs[plan.kind(index)].name]

    def request(index: int) -> Request:
        kind, proto = plan.kind(index), plan.proto(index)
        if kind == "generate":
            job = text_to_image_job(proto, runner_of(index).info(), limits)
            return Request(f"{kind}-{index}", job, [])
        job = (caption_job if kind == "caption" else vqa_job)(proto, limits)
        return Request(f"{kind}-{index}", job, [check_image(proto.image, "image", limits)])

    def run(batches: list[list[int]]) -> tuple[list[Outcome], float]:
        requests, done = {}, []
        for index in itertools.chain.from_iterable(batches):
            try:
                requests[index] = request(index)
            except RequestError as err:  # the server would have answered with err.code
                done.append(Outcome(plan.kind(index), index, 0.0, err.code.name))
        started = time.perf_counter()
        for batch in ([i for i in batch if i in requests] for batch in batches):
            if not batch:
                continue
            results = run_direct(runner_of(batch[0]), [requests[i] for i in batch], len(batch))
            done += [Outcome(plan.kind(i), i, r.seconds, r.code, len(r.images), r.batch_size,
                             r.texts[0] if r.texts else None)
                     for i, r in zip(batch, results, strict=True)]  # fmt: skip
        return done, time.perf_counter() - started

    run([[i] for i in range(warmup)])
    sequential = run([[i] for i in indices])
    batches = []
    for kind in KINDS:
        mine = [i for i in indices if plan.kind(i) == kind]
        batches += [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    return {
        "device": device,
        "batch_size": batch_size,
        "sequential": phase_report(*sequential),
        "batched": phase_report(*run(batches)),
        "outcomes": sequential[0],
    }


# ------------------------------------------------------------------ output

_HEADER = "kind        done  errors    req/s    img/s   p50 ms   p95 ms   p99 ms  mean ms  batch"
RATIOS = {
    "overhead_ms": "served p50 - in-process sequential p50, ms",
    "batched_ratio": "served req/s / in-process batch-of-C req/s",
    "sequential_speedup": "served req/s / in-process sequential req/s",
    "previews_ratio": "images/s with a preview every step / images/s without",
}


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_phase(title: str, phase: dict[str, Any]) -> list[str]:
    """Lines of a table of one phase report: a row per kind and overall,
    then the errors of each kind by code."""
    lines = [f"{title}: {phase['elapsed_s']:.2f} s", _HEADER]
    rows = [*phase["kinds"].items(), ("overall", phase["overall"])]
    for kind, s in rows:
        lat = s["latency_ms"]
        rates = f"{_num(s['throughput_rps'], 2):>9}{_num(s['images_per_s'], 2):>9}"
        times = "".join(f"{_num(lat[key]):>9}" for key in ("p50", "p95", "p99", "mean"))
        counts = f"{kind:<10}{s['completed']:>6}{sum(s['errors'].values()):>8}"
        lines.append(f"{counts}{rates}{times}{_num(s['mean_batch_size'], 2):>7}")
    for kind, s in rows[:-1]:
        if s["errors"]:
            codes = ", ".join(f"{code}={n}" for code, n in s["errors"].items())
            lines.append(f"  {kind} errors: {codes}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The plain-text rendering of a bench report (see :func:`run`)."""
    mix = ",".join(f"{k}={w}" for k, w in report["mix"].items())
    lines = [f"target {report['target']} ({report['server']}), concurrency "
             f"{report['concurrency']}, mix {mix}, warmup {report['warmup']}", ""]  # fmt: skip
    lines += format_phase("served", report["served"])
    if "served_with_previews" in report:
        lines += ["", *format_phase("served, preview every step", report["served_with_previews"])]
    if "baseline" in report:
        base = report["baseline"]
        where = f"in process on {base['device']}"
        lines += ["", *format_phase(f"{where}, one request per call", base["sequential"])]
        lines += ["", *format_phase(f"{where}, batches of {base['batch_size']}", base["batched"])]
        if base["text_mismatches"]:
            lines.append(f"note: {base['text_mismatches']} served texts differ from in-process")
    lines.append("")
    lines += [f"{k} = {_num(report[k], 3)}   ({m})" for k, m in RATIOS.items() if k in report]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------ command


def _number(kind: Callable[[str], Any], least: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not least <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be at least {least}: {text}")
        return value

    return parse


def _mix(text: str) -> dict[str, int]:
    try:
        return parse_mix(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``imago``'s subparsers ``sub``."""
    p = sub.add_parser("bench", help="drive load at a server and print figures",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    count, at_least_1, seconds = _number(int, 0), _number(int, 1), _number(float, 0.001)
    add = p.add_argument_group("server").add_argument
    add("--external", action="store_true",
        help="load the server at imago --target HOST:PORT instead of starting one")  # fmt: skip
    add("--preset", default="tiny", help="models of the started server and of --baseline "
        "(default: tiny)")  # fmt: skip
    add("--cache-dir", metavar="DIR", help="model cache of the server and of --baseline")
    add("--workers", type=at_least_1, metavar="N", help="worker processes of the started server")
    add("--server-arg", action="append", default=[], metavar="ARG", help="pass ARG to imago "
        "serve as it is; repeatable, e.g. --server-arg=--max-batch-delay-ms=0")  # fmt: skip
    add("--start-timeout", type=seconds, default=600.0, metavar="S", help="(default: 600)")
    add = p.add_argument_group("load").add_argument
    add("--concurrency", type=at_least_1, default=1, metavar="C", help="(default: 1)")
    add("--requests", type=at_least_1, metavar="N",
        help="measured requests (default: 200, or unlimited with --duration)")  # fmt: skip
    add("--duration", type=seconds, metavar="S", help="stop sending after S seconds")
    add("--warmup", type=count, metavar="N",
        help="unmeasured requests first (default: C, at least 2 and one of each kind)")  # fmt: skip
    add = p.add_argument_group("requests").add_argument
    add("--mix", type=_mix, default={"caption": 1}, metavar="KIND=W,...",
        help="weights of caption, vqa, generate (default: caption=1)")  # fmt: skip
    add("--image-size", type=at_least_1, default=224, metavar="PX",
        help="side of the square input image of caption and VQA (default: 224)")  # fmt: skip
    add("--question", default="what is in the picture?", metavar="TEXT", help="VQA question")
    add("--prompt", default="a lighthouse at dusk", metavar="TEXT", help="generate prompt")
    add("--steps", type=at_least_1, default=10, metavar="N", help="denoising steps (default: 10)")
    add("--size", type=_number(int, 64), default=0, metavar="PX", help="width = height of "
        "generated images, a multiple of 8 (default: the model's)")  # fmt: skip
    add("--preview-every", type=count, default=0, metavar="N",
        help="a preview every N steps (default: 0, none)")  # fmt: skip
    add("--seed", type=count, default=0, help="request i has seed SEED + i (default: 0)")
    add = p.add_argument_group("comparisons and output").add_argument
    add("--baseline", action="store_true", help="also run the requests in process, no server")
    add("--baseline-device", default="cpu", metavar="DEVICE", help="(default: cpu)")
    add("--compare-previews", action="store_true",
        help="also run the load with a preview every step (needs generate in --mix)")  # fmt: skip
    add("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run, bench_parser=p)
    return p


def _check(args: argparse.Namespace) -> None:
    fail = args.bench_parser.error
    if args.external and (args.workers is not None or args.server_arg):
        fail("--workers and --server-arg are for the server bench starts, not --external")
    if args.size % 8:
        fail(f"--size must be a multiple of 8, got {args.size}")
    if args.preview_every > args.steps:
        fail(f"--preview-every {args.preview_every} exceeds --steps {args.steps}")
    if args.compare_previews and "generate" not in args.mix:
        fail("--compare-previews needs generate requests in --mix")
    if args.compare_previews and args.preview_every:
        fail("--compare-previews compares every step with none: leave out --preview-every")


def _add_baseline(report: dict[str, Any], outcomes: list[Outcome], base: dict[str, Any]) -> None:
    served_texts = {o.index: o.text for o in outcomes if o.code == "OK" and o.text is not None}
    direct = base.pop("outcomes")
    base["failed"] = sum(o.code != "OK" for o in direct)
    base["text_mismatches"] = sum(
        o.index in served_texts and o.text != served_texts[o.index] for o in direct
    )
    report["baseline"] = base
    served, seq = report["served"]["overall"], base["sequential"]["overall"]
    p50, seq_p50 = served["latency_ms"]["p50"], seq["latency_ms"]["p50"]
    report["overhead_ms"] = None if p50 is None or seq_p50 is None else p50 - seq_p50
    batched = base["batched"]["overall"]["throughput_rps"]
    report["batched_ratio"] = _ratio(served["throughput_rps"], batched)
    report["sequential_speedup"] = _ratio(served["throughput_rps"], seq["throughput_rps"])


def run(args: argparse.Namespace) -> int:
    """``imago bench``: prints the report; 0 when every request succeeded, else 1.

    The JSON report holds target, server, concurrency, mix, warmup, "served"
    (a :func:`phase_report`), with --compare-previews "served_with_previews"
    and previews_ratio, with --baseline "baseline" and overhead_ms,
    batched_ratio and sequential_speedup; a started server's pid and exit code.
    """
    _check(args)
    order = tuple(rotation(args.mix))
    plan = Plan(order, noise_png(args.image_size, args.seed), args.question, args.prompt,
                args.steps, args.size, args.seed, args.preview_every)  # fmt: skip
    plans = [plan, replace(plan, preview_every=1)] if args.compare_previews else [plan]
    count = args.requests if args.requests or args.duration else 200
    every_kind = max(order.index(kind) for kind in args.mix) + 1
    warmup = max(args.concurrency, 2, every_kind) if args.warmup is None else args.warmup
    server = None
    if not args.external:
        extra = ["--preset", args.preset, *args.server_arg]
        extra += ["--cache-dir", args.cache_dir] if args.cache_dir else []
        extra += ["--workers", str(args.workers)] if args.workers else []
        server = OwnServer(extra, args.start_timeout)
    target = args.target if server is None else server.target
    report: dict[str, Any] = {
        "target": target,
        "server": "external" if server is None else f"started, preset {args.preset}",
        "concurrency": args.concurrency,
        "mix": args.mix,
        "warmup": warmup,
    }
    try:
        if server is not None:
            print("starting imago", *server.command[3:], file=sys.stderr, flush=True)
            server.start()
            report["server_pid"] = server.process.pid
        print(f"measuring {target} ...", file=sys.stderr, flush=True)
        phases = asyncio.run(drive(target, plans, args.concurrency, count, args.duration,
                                   warmup, args.timeout))  # fmt: skip
    except grpc.RpcError as err:
        details = err.details() if hasattr(err, "details") else err
        print(f"error: cannot reach an imago server at {target}: {details}", file=sys.stderr)
        return 1
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            report["server_exit_code"] = server.stop()
    report["served"] = phase_report(*phases[0])
    failed = any(o.code != "OK" for outcomes, _ in phases for o in outcomes)
    if args.compare_previews:
        report["served_with_previews"] = phase_report(*phases[1])
        with_previews = report["served_with_previews"]["overall"]["images_per_s"]
        report["previews_ratio"] = _ratio(
            with_previews, report["served"]["overall"]["images_per_s"]
        )
    if args.baseline:
        print("running the same requests in process ...", file=sys.stderr, flush=True)
        indices = sorted(o.index for o in phases[0][0])
        try:
            base = run_baseline(plan, indices, warmup, args.concurrency, args.preset,
                                args.cache_dir, args.baseline_device)  # fmt: skip
        except (BenchError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        _add_baseline(report, phases[0][0], base)
        failed = failed or base["failed"] > 0
    print(json.dumps(report, indent=2) if args.json else format_report(report), end="\n")
    return 1 if failed else 0
