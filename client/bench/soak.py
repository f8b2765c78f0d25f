"""``imago soak``: mixed load at a fixed concurrency for a set time, watching
throughput, errors and memory.

By default it starts its own server (with a Prometheus endpoint) and stops it
afterwards; ``--external`` loads the server at ``--target`` and reads its
memory from ``--metrics-url``. Memory comes from the server's own metrics:
``process_resident_memory_bytes`` for the frontend and
``imago_worker_resident_memory_bytes`` for each worker, sampled after the
warm-up, every ``--sample-every`` seconds, and at the end. A leak shows as a
steady climb between the start and the end figures.

Two profiles: ``mixed`` (the default), closed-loop caption, VQA and generate
requests at ``--concurrency``; and ``adversarial``, four classes of load at
once from clients of their own (see :mod:`imago.client.bench.adversarial`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from imago.client.bench import adversarial, loadgen
from imago.client.bench.closedloop import BenchError, OwnServer, free_port, mix_arg, number_arg
from imago.client.bench.loadgen import Plan, phase_report

DESCRIPTION = """Run load for --duration seconds and print throughput, errors by
code, and the resident memory of the frontend and of each worker at the start
and at the end. --profile mixed (the default) sends caption, VQA and generate
requests at --concurrency; exit status 1 when any request failed. --profile
adversarial runs four classes at once, each from clients with channels of
their own: bulk (one CaptionStream kept full), interactive (single captions
with a pause and a deadline), generation (small generations back to back) and
oversized (several MiB of undecodable image bytes, and 8 images of 2048x2048
in 150 steps, each with a short deadline); it prints requests, errors by code,
latency p50/p95/p99/max and throughput per class (for oversized, the time to
the refusal). Its exit status is 1 when a bulk, interactive or generation
request failed, or an oversized one was answered OK or not refused within its
deadline, whatever the code (one that fails in the last 5% of its deadline ran
up to it)."""

PROFILES = ("mixed", "adversarial")

MiB = 1024 * 1024


def memory_of(metrics_text: str) -> dict[str, float]:
    """Resident bytes by process ("frontend", then each worker id) in a
    Prometheus text scrape of an imago server."""
    memory: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "process_resident_memory_bytes":
                memory["frontend"] = sample.value
            elif sample.name == "imago_worker_resident_memory_bytes":
                memory[sample.labels["worker"]] = sample.value
    return memory


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """:func:`memory_of` the scrape at ``url``."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return memory_of(response.read().decode())


@dataclass
class MemoryWatch:
    """Samples memory every ``every_s`` seconds on a thread until stopped."""

    url: str
    every_s: float
    samples: list[dict[str, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.samples.append(scrape(self.url))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(scrape(self.url))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append(scrape(self.url))

    def report(self) -> dict[str, dict[str, float]]:
        """Per process: start, end, peak and change, in MiB."""
        first, last = self.samples[0], self.samples[-1]
        table = {}
        for name in first:
            peak = max(sample.get(name, 0.0) for sample in self.samples)
            start, end = first[name] / MiB, last.get(name, 0.0) / MiB
            table[name] = {"start": start, "end": end, "peak": peak / MiB, "change": end - start}
        return table


def add_soak_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``soak`` subcommand to ``imago``'s subparsers ``sub``."""
    p = sub.add_parser("soak", help="long mixed load, watching errors and memory",
                       description=DESCRIPTION)  # fmt: skip
    at_least_1, seconds = number_arg(int, 1), number_arg(float, 0.001)
    add = p.add_argument
    add("--external", action="store_true",
        help="load the server at imago --target instead of starting one")  # fmt: skip
    add("--metrics-url", metavar="URL",
        help="its Prometheus endpoint, with --external (http://HOST:PORT/metrics)")  # fmt: skip
    add("--preset", default="tiny", help="models of the started server (default: tiny)")
    add("--cache-dir", metavar="DIR", help="model cache of the started server")
    add("--workers", type=at_least_1, metavar="N", help="worker processes of the started server")
    add("--profile", choices=PROFILES, default="mixed",
        help="mixed: caption, VQA and generate at --concurrency; adversarial: bulk, "
        "interactive, generation and oversized load at once (default: mixed)")  # fmt: skip
    add("--duration", type=seconds, default=60.0, metavar="S", help="(default: 60)")
    add("--concurrency", type=at_least_1, default=8, metavar="C",
        help="mixed profile: workers sending requests (default: 8)")  # fmt: skip
    add("--mix", type=mix_arg, default={"caption": 2, "vqa": 1, "generate": 1},
        metavar="KIND=W,...", help="mixed profile: weights of caption, vqa, generate "
        "(default: caption=2,vqa=1,generate=1)")  # fmt: skip
    add("--steps", type=at_least_1, default=4, metavar="N",
        help="mixed profile: denoising steps (default: 4)")  # fmt: skip
    add("--size", type=number_arg(int, 64), default=0, metavar="PX",
        help="mixed profile: side of generated images, a multiple of 8 "
        "(default: the model's)")  # fmt: skip
    add("--preview-every", type=number_arg(int, 0), default=1, metavar="N",
        help="mixed profile: a preview every N steps, 0 for none (default: 1)")  # fmt: skip
    add("--sample-every", type=seconds, default=5.0, metavar="S",
        help="memory sampling interval (default: 5)")  # fmt: skip
    add("--start-timeout", type=seconds, default=600.0, metavar="S", help="(default: 600)")
    add("--json", action="store_true", help="print one JSON object instead of a table")
    _add_adversarial_options(p)
    p.set_defaults(func=run, soak_parser=p)
    return p


def _add_adversarial_options(p: argparse.ArgumentParser) -> None:
    at_least_1, seconds = number_arg(int, 1), number_arg(float, 0.001)
    pause, d = number_arg(float, 0.0), adversarial.Adversaries()
    add = p.add_argument_group("adversarial profile").add_argument
    add("--interactive-clients", type=at_least_1, default=d.interactive_clients, metavar="N",
        help="clients sending single captions one after another "
        "(default: %(default)s)")  # fmt: skip
    add("--interactive-pause", type=pause, default=d.interactive_pause_s, metavar="S",
        help="pause of each after every answer (default: %(default)s)")  # fmt: skip
    add("--interactive-deadline", type=seconds, default=d.interactive_deadline_s, metavar="S",
        help="deadline of each of their captions (default: %(default)s)")  # fmt: skip
    add("--generation-clients", type=at_least_1, default=d.generation_clients, metavar="N",
        help="clients sending generations back to back, each with imago's --timeout as "
        "its deadline (default: %(default)s)")  # fmt: skip
    add("--generation-size", type=number_arg(int, 64), default=d.generation_size, metavar="PX",
        help="side of their images, a multiple of 8 (default: %(default)s)")  # fmt: skip
    add("--generation-steps", type=at_least_1, default=d.generation_steps, metavar="N",
        help="their denoising steps (default: %(default)s)")  # fmt: skip
    add("--bulk-window", type=at_least_1, default=d.bulk_window, metavar="N",
        help="captions of the bulk stream in flight at most (default: %(default)s)")  # fmt: skip
    add("--oversized-mib", type=number_arg(float, 0.001), default=d.oversized_mib, metavar="MIB",
        help="size of the undecodable image of the oversized caption "
        "(default: %(default)s)")  # fmt: skip
    add("--oversized-deadline", type=seconds, default=d.oversized_deadline_s, metavar="S",
        help="deadline of each oversized request; one not refused within it fails the run "
        "(default: %(default)s)")  # fmt: skip
    add("--oversized-pause", type=pause, default=d.oversized_pause_s, metavar="S",
        help="pause after each oversized request (default: %(default)s)")  # fmt: skip


def format_memory(memory: dict[str, dict[str, float]]) -> list[str]:
    """Lines of the memory table: start, end, peak and change per process."""
    lines = [f"{'memory MiB':<12}{'start':>10}{'end':>10}{'peak':>10}{'change':>10}"]
    for name, m in memory.items():
        lines.append(f"{name:<12}{m['start']:>10.1f}{m['end']:>10.1f}{m['peak']:>10.1f}"
                     f"{m['change']:>+10.1f}")  # fmt: skip
    return lines


def format_report(report: dict[str, Any]) -> str:
    if report["profile"] == "adversarial":
        return format_adversarial(report)
    overall = report["served"]["overall"]
    errors = ", ".join(f"{code} {n}" for code, n in overall["errors"].items()) or "none"
    kinds = ", ".join(
        f"{kind} {figures['throughput_rps']:.1f}"
        for kind, figures in report["served"]["kinds"].items()
    )
    latency = overall["latency_ms"]
    lines = [
        f"soak: {overall['elapsed_s']:.1f} s at concurrency {report['concurrency']} "
        f"against {report['target']} ({report['server']})",
        f"requests: {overall['completed']} completed; errors: {errors}",
        f"throughput: {overall['throughput_rps']:.1f} req/s ({kinds})",
    ]
    if overall["images_per_s"] is not None:
        lines.append(f"images: {overall['images_per_s']:.2f}/s")
    if latency["p50"] is not None:
        lines.append(f"latency ms: p50 {latency['p50']:.1f}, p95 {latency['p95']:.1f}, "
                     f"p99 {latency['p99']:.1f}")  # fmt: skip
    return "\n".join(lines + format_memory(report["memory_mib"]))


def format_adversarial(report: dict[str, Any]) -> str:
    """The table of an adversarial soak: a row per class, then memory and
    what failed the run."""
    lines = [
        f"soak (adversarial): {report['wall_s']:.1f} s against {report['target']} "
        f"({report['server']})",
        *adversarial.format_classes(report["classes"]),
        *format_memory(report["memory_mib"]),
    ]
    lines += [f"failed: {reason}" for reason in report["failures"]] or ["failed: nothing"]
    return "\n".join(lines)


def _adversaries(args: argparse.Namespace) -> adversarial.Adversaries:
    return adversarial.Adversaries(
        interactive_clients=args.interactive_clients,
        interactive_pause_s=args.interactive_pause,
        interactive_deadline_s=args.interactive_deadline,
        generation_clients=args.generation_clients,
        generation_size=args.generation_size,
        generation_steps=args.generation_steps,
        generation_deadline_s=args.timeout,
        bulk_window=args.bulk_window,
        oversized_mib=args.oversized_mib,
        oversized_deadline_s=args.oversized_deadline,
        oversized_pause_s=args.oversized_pause,
    )


def _mixed_plan(args: argparse.Namespace) -> Plan:
    order = tuple(loadgen.rotation(args.mix))
    return Plan(order, loadgen.sample_image(224), "what is in the picture?",
                "a lighthouse at dusk", args.steps, args.size, 0,
                min(args.preview_every, args.steps))  # fmt: skip


def _warm_up(args: argparse.Namespace, target: str) -> None:
    if args.profile == "adversarial":
        image = loadgen.sample_image(224)
        asyncio.run(adversarial.warm_up(target, _adversaries(args), image, args.timeout))
        return
    plan = _mixed_plan(args)
    warmup = max(args.concurrency, len(plan.order))
    asyncio.run(loadgen.drive(target, [plan], args.concurrency, warmup, None, 0,
                              args.timeout, floor_calls=0))  # fmt: skip


def _load(args: argparse.Namespace, target: str) -> dict[str, Any]:
    """Run the profile's load; its figures, to go into the report."""
    if args.profile == "adversarial":
        load = _adversaries(args)
        runs = asyncio.run(adversarial.drive(target, load, args.duration))
        classes = adversarial.class_report(runs, load)
        return {"classes": classes, "failures": adversarial.failures(classes)}
    soak = loadgen.drive(target, [_mixed_plan(args)], args.concurrency, None, args.duration, 0,
                         args.timeout, floor_calls=0)  # fmt: skip
    outcomes, elapsed = asyncio.run(soak).phases[0]
    return {"served": phase_report(outcomes, elapsed)}


def _failed(report: dict[str, Any]) -> bool:
    if report["profile"] == "adversarial":
        return bool(report["failures"])
    return bool(report["served"]["overall"]["errors"])


def run(args: argparse.Namespace) -> int:
    """``imago soak``: prints the report; 0 when the load went as it should
    (mixed: every request succeeded; adversarial: see :data:`DESCRIPTION`), else 1."""
    if args.external and not args.metrics_url:
        args.soak_parser.error("--external needs --metrics-url to read the server's memory")
    for option in ("size", "generation_size"):
        if getattr(args, option) % 8:
            name = "--" + option.replace("_", "-")
            args.soak_parser.error(f"{name} must be a multiple of 8, got {getattr(args, option)}")
    server, url = None, args.metrics_url
    if not args.external:
        metrics_port = free_port()
        extra = ["--preset", args.preset, "--metrics-port", str(metrics_port)]
        extra += ["--cache-dir", args.cache_dir] if args.cache_dir else []
        extra += ["--workers", str(args.workers)] if args.workers else []
        server = OwnServer(extra, args.start_timeout)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
    target = args.target if server is None else server.target
    where = "external" if server is None else f"started, preset {args.preset}"
    report: dict[str, Any] = {"profile": args.profile, "target": target, "server": where}
    if args.profile == "mixed":
        report.update(mix=args.mix, concurrency=args.concurrency)
    else:
        report.update(duration_s=args.duration, adversaries=asdict(_adversaries(args)))
    try:
        if server is not None:
            print("starting imago", *server.command[3:], file=sys.stderr, flush=True)
            server.start()
        _warm_up(args, target)
        watch = MemoryWatch(url, args.sample_every)
        watch.start()
        print(f"soaking {target} for {args.duration:g} s ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            figures = _load(args, target)
        finally:
            watch.stop()
        report["wall_s"] = time.perf_counter() - started
    except grpc.RpcError as err:
        details = err.details() if hasattr(err, "details") else err
        print(f"error: cannot reach an imago server at {target}: {details}", file=sys.stderr)
        return 1
    except (BenchError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            report["server_exit_code"] = server.stop()
    report.update(figures)
    report["memory_mib"] = watch.report()
    report["memory_samples"] = len(watch.samples)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if _failed(report) else 0
