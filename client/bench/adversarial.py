"""The adversarial profile of ``imago soak``: four classes of load at once
against one server, each from clients with channels of their own.

- bulk: one client streaming captions through the bidirectional
  CaptionStream RPC, keeping up to ``bulk_window`` items in flight, as fast as
  the server answers them;
- interactive: clients each sending single Caption calls one after another,
  with a pause between them and a deadline on each;
- generation: clients sending small Generate calls back to back;
- oversized: one client sending requests the server should refuse at once,
  in turn a caption of several MiB of undecodable bytes and a Generate of
  the most images at the largest size and the most steps, both with a short
  deadline.

Every class runs for the same duration and then finishes the calls it has in
flight. Latency runs from sending a request to its answer; for the oversized
class the figure that matters is the time to the refusal. An oversized call
fails the run when it is answered OK or is not refused within its deadline,
whatever the error's code (see :func:`refused_in_time`); any error of another
class fails it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc

from imago.client import api
from imago.client.bench import loadgen
from imago.client.bench.loadgen import Outcome
from imago.client.options import DiffusionOptions, TextOptions
from imago.v1 import caption_pb2

CLASSES = ("bulk", "interactive", "generation", "oversized")
MiB = 1024 * 1024
PROMPT = "a lighthouse at dusk"
#: The oversized Generate: the most images, the largest side and the most
#: steps the server's default limits name.
OVERSIZED_GENERATE = DiffusionOptions(num_images=8, width=2048, height=2048, steps=150)
#: The end of an oversized call's deadline in which a failure counts as the
#: deadline's, not as a refusal.
HELD_FRACTION = 0.05
#: Seconds the bulk stream may take, past the duration, to answer what it has in flight.
BULK_GRACE_S = 120.0
#: gRPC status code names by number, for the in-band errors of a bulk stream.
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True)
class Adversaries:
    """Sizes and settings of the four classes."""

    interactive_clients: int = 3
    interactive_pause_s: float = 0.2
    interactive_deadline_s: float = 10.0
    generation_clients: int = 2
    generation_size: int = 64
    generation_steps: int = 20
    # Deadline of each generation (None: none).
    generation_deadline_s: float | None = None
    bulk_window: int = 64
    oversized_mib: float = 4.0
    oversized_deadline_s: float = 2.0
    oversized_pause_s: float = 0.1

    def clients(self) -> dict[str, int]:
        """Clients of each class."""
        return {"bulk": 1, "interactive": self.interactive_clients,
                "generation": self.generation_clients, "oversized": 1}  # fmt: skip


# ------------------------------------------------------------------ figures


def spread_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99 (as :func:`loadgen.percentile`) and max of ``seconds``,
    in milliseconds; all None when there are none."""
    if not seconds:
        return dict.fromkeys(("p50", "p95", "p99", "max"))
    millis = [s * 1000 for s in seconds]
    spread: dict[str, float | None] = {f"p{p}": loadgen.percentile(millis, p) for p in (50, 95, 99)}
    spread["max"] = max(millis)
    return spread


def figures(outcomes: Sequence[Outcome], elapsed_s: float) -> dict[str, Any]:
    """``requests``; ``ok``; ``errors`` {code name: count}; ``latency_ms``
    (:func:`spread_ms` of the OK ones); ``throughput_rps`` (OK per second of
    ``elapsed_s``); ``requests_rps`` (all per second); ``elapsed_s``."""
    ok = [o for o in outcomes if o.code == "OK"]
    per_s = (lambda n: n / elapsed_s) if elapsed_s > 0 else (lambda n: 0.0)
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": dict(sorted(Counter(o.code for o in outcomes if o.code != "OK").items())),
        "latency_ms": spread_ms([o.seconds for o in ok]),
        "throughput_rps": per_s(len(ok)),
        "requests_rps": per_s(len(outcomes)),
        "elapsed_s": elapsed_s,
    }


def refused_in_time(outcome: Outcome, deadline_s: float) -> bool:
    """Whether an oversized call was refused within its deadline: it failed,
    whatever its code, before the last :data:`HELD_FRACTION` of
    ``deadline_s``. One that failed later ran up to its deadline (the
    server's timer may fire a little before the client's): it was held, not
    refused."""
    return outcome.code != "OK" and outcome.seconds < deadline_s * (1 - HELD_FRACTION)


def oversized_figures(
    outcomes: Sequence[Outcome], elapsed_s: float, deadline_s: float
) -> dict[str, Any]:
    """:func:`figures`, plus ``refusal_ms`` (:func:`spread_ms` of the failed
    calls: the time to the refusal), ``deadline_s``, ``accepted`` (answered
    OK), ``late`` (failed, but not refused in time) and the same per request
    kind in ``kinds``."""

    def one(chosen: Sequence[Outcome]) -> dict[str, Any]:
        failed = [o for o in chosen if o.code != "OK"]
        return {
            **figures(chosen, elapsed_s),
            "refusal_ms": spread_ms([o.seconds for o in failed]),
            "accepted": sum(o.code == "OK" for o in chosen),
            "late": sum(not refused_in_time(o, deadline_s) for o in failed),
        }

    kinds = sorted({o.kind for o in outcomes})
    by_kind = {kind: one([o for o in outcomes if o.kind == kind]) for kind in kinds}
    return {**one(outcomes), "deadline_s": deadline_s, "kinds": by_kind}


def failures(classes: dict[str, dict[str, Any]]) -> list[str]:
    """Why a report of :func:`class_report` fails the run, one line per
    reason: errors of bulk, interactive or generation; oversized calls
    answered OK or refused late."""
    reasons = []
    for name, figs in classes.items():
        if name == "oversized":
            if figs["accepted"]:
                reasons.append(f"oversized: {figs['accepted']} answered OK instead of refused")
            if figs["late"]:
                reasons.append(f"oversized: {figs['late']} not refused within "
                               f"{figs['deadline_s']:g} s")  # fmt: skip
        elif figs["errors"]:
            codes = ", ".join(f"{code} {n}" for code, n in figs["errors"].items())
            reasons.append(f"{name}: errors {codes}")
    return reasons


def class_report(runs: dict[str, tuple[list[Outcome], float]], load: Adversaries) -> dict:
    """Figures of every class from its outcomes and wall seconds, with its clients."""
    clients = load.clients()
    report = {}
    for name, (outcomes, elapsed) in runs.items():
        if name == "oversized":
            figs = oversized_figures(outcomes, elapsed, load.oversized_deadline_s)
        else:
            figs = figures(outcomes, elapsed)
        report[name] = {"clients": clients[name], **figs}
    return report


# ------------------------------------------------------------------ requests


def undecodable(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that are no image: a text line, then random bytes."""
    head = b"imago soak: not an image\n"
    return (head + random.Random(seed).randbytes(max(size - len(head), 0)))[:size]


async def _timed(kind: str, index: int, call: Callable[[], Awaitable[Any]]) -> Outcome:
    started = time.perf_counter()
    try:
        answer = await call()
    except grpc.RpcError as err:
        code = err.code().name if hasattr(err, "code") else "UNKNOWN"
        return Outcome(kind, index, time.perf_counter() - started, code=code)
    except RuntimeError:  # a generation stream that ended without a result
        return Outcome(kind, index, time.perf_counter() - started, code="NO_RESULT")
    images = len(answer.images) if kind == "generate" else 0
    return Outcome(kind, index, time.perf_counter() - started, images=images)


async def _interactive(target: str, load: Adversaries, image: bytes, end: float) -> list[Outcome]:
    outcomes = []
    async with api.AsyncImagoClient(target, timeout=load.interactive_deadline_s) as client:
        index = 0
        while time.perf_counter() < end:
            call = lambda i=index: client.caption(image, generation=_greedy(i))  # noqa: E731
            outcomes.append(await _timed("caption", index, call))
            index += 1
            await asyncio.sleep(load.interactive_pause_s)
    return outcomes


def _greedy(seed: int) -> TextOptions:
    """Text generation of the caption classes: greedy, with a fixed seed."""
    return TextOptions(do_sample=False, seed=seed)


def _diffusion(load: Adversaries, seed: int) -> DiffusionOptions:
    side = load.generation_size
    return DiffusionOptions(width=side, height=side, steps=load.generation_steps, seed=seed)


async def _generation(target: str, load: Adversaries, end: float) -> list[Outcome]:
    outcomes = []
    async with api.AsyncImagoClient(target, timeout=load.generation_deadline_s) as client:
        index = 0
        while time.perf_counter() < end:
            diffusion = _diffusion(load, index)
            call = lambda d=diffusion: client.generate_result(PROMPT, diffusion=d)  # noqa: E731
            outcomes.append(await _timed("generate", index, call))
            index += 1
    return outcomes


async def _oversized(target: str, load: Adversaries, end: float) -> list[Outcome]:
    garbage = undecodable(int(load.oversized_mib * MiB))
    outcomes = []
    async with api.AsyncImagoClient(target, timeout=load.oversized_deadline_s) as client:
        index = 0
        while time.perf_counter() < end:
            if index % 2 == 0:
                call = lambda: client.caption(garbage)  # noqa: E731
                outcomes.append(await _timed("caption", index, call))
            else:
                call = lambda i=index: client.generate_result(  # noqa: E731
                    PROMPT, diffusion=replace(OVERSIZED_GENERATE, seed=i)
                )
                outcomes.append(await _timed("generate", index, call))
            index += 1
            await asyncio.sleep(load.oversized_pause_s)
    return outcomes


def _bulk(target: str, load: Adversaries, image: bytes, end: float) -> list[Outcome]:
    """The bulk class, blocking: one CaptionStream, at most ``bulk_window``
    items in flight, sending until ``end``."""
    outcomes: list[Outcome] = []
    sent: dict[str, float] = {}
    room, stopped = threading.Semaphore(load.bulk_window), threading.Event()
    timeout = max(end - time.perf_counter(), 0.0) + BULK_GRACE_S

    def requests() -> Iterator[caption_pb2.CaptionStreamRequest]:
        for index in itertools.count():
            room.acquire()
            if stopped.is_set() or time.perf_counter() >= end:
                return
            request = api.caption_request(image, generation=_greedy(index))
            sent[str(index)] = time.perf_counter()
            yield caption_pb2.CaptionStreamRequest(id=str(index), request=request)

    with api.ImagoClient(target, timeout=timeout) as client:
        try:
            for reply in client.caption_stream(requests()):
                seconds = time.perf_counter() - sent.pop(reply.id)
                error = reply.error.code if reply.HasField("error") else None
                code = "OK" if error is None else CODE_NAMES.get(error, str(error))
                outcomes.append(Outcome("caption", int(reply.id), seconds, code=code))
                room.release()
        except grpc.RpcError as err:  # the stream itself failed: so did what was in flight
            code, now = err.code().name, time.perf_counter()
            outcomes += [Outcome("caption", int(i), now - t, code=code) for i, t in sent.items()]
        finally:
            stopped.set()
            room.release()  # a sender waiting for room sees the end
    return outcomes


async def _class(run: Callable[[], Awaitable[list[Outcome]]]) -> tuple[list[Outcome], float]:
    started = time.perf_counter()
    outcomes = await run()
    return outcomes, time.perf_counter() - started


async def _clients(
    count: int, run: Callable[[], Awaitable[list[Outcome]]]
) -> tuple[list[Outcome], float]:
    async def together() -> list[Outcome]:
        return [o for outcomes in await asyncio.gather(*(run() for _ in range(count)))
                for o in outcomes]  # fmt: skip

    return await _class(together)


async def warm_up(target: str, load: Adversaries, image: bytes, timeout: float | None) -> None:
    """One caption and one generation, so that every model has run once. A
    server that cannot be reached raises :class:`grpc.RpcError`."""
    async with api.AsyncImagoClient(target, timeout=timeout) as client:
        await client.health()
        await client.caption(image, generation=_greedy(0))
        await client.generate_result(PROMPT, diffusion=_diffusion(load, 0))


async def drive(
    target: str, load: Adversaries, duration_s: float
) -> dict[str, tuple[list[Outcome], float]]:
    """Run the four classes at once for ``duration_s`` seconds; per class, its
    outcomes and its wall seconds (to the end of its last call)."""
    image = loadgen.sample_image(224)
    end = time.perf_counter() + duration_s
    bulk = _class(lambda: asyncio.to_thread(_bulk, target, load, image, end))
    interactive = _clients(load.interactive_clients,
                           lambda: _interactive(target, load, image, end))  # fmt: skip
    generation = _clients(load.generation_clients, lambda: _generation(target, load, end))
    oversized = _class(lambda: _oversized(target, load, end))
    runs = await asyncio.gather(bulk, interactive, generation, oversized)
    return dict(zip(CLASSES, runs, strict=True))


# ------------------------------------------------------------------ output


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(name: str, clients: str, figs: dict[str, Any], times: dict[str, Any]) -> str:
    errors = ", ".join(f"{code} {n}" for code, n in figs["errors"].items()) or "-"
    spread = "".join(f"{_num(times[key]):>9}" for key in ("p50", "p95", "p99", "max"))
    counts = f"{name:<14}{clients:>7}{figs['requests']:>9}{figs['ok']:>7}"
    rates = f"{_num(figs['requests_rps'], 2):>8}{_num(figs['throughput_rps'], 2):>8}"
    return f"{counts}{rates}{spread}  {errors}"


def format_classes(classes: dict[str, dict[str, Any]]) -> list[str]:
    """Lines of the table of :func:`class_report`: a row per class (and per
    oversized kind), then the oversized class's refusals and deadline."""
    lines = [f"{'class':<14}{'clients':>7}{'requests':>9}{'ok':>7}{'req/s':>8}{'ok/s':>8}"
             f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}  errors"]  # fmt: skip
    for name, figs in classes.items():
        if name != "oversized":
            lines.append(_row(name, str(figs["clients"]), figs, figs["latency_ms"]))
            continue
        lines.append(_row(name, str(figs["clients"]), figs, figs["refusal_ms"]))
        for kind, sub in figs["kinds"].items():
            lines.append(_row(f"  {kind}", "", sub, sub["refusal_ms"]))
    if "oversized" in classes:
        over = classes["oversized"]
        late, accepted = over["late"], over["accepted"]
        lines.append(f"oversized: times are to the refusal; deadline {over['deadline_s']:g} s, "
                     f"{late} not refused in time, {accepted} answered OK")  # fmt: skip
    return lines
