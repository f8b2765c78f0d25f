"""``imago soak``: mixed load at a fixed concurrency for a set time, watching
throughput, errors and memory.

By default it starts its own server (with a Prometheus endpoint) and stops it
afterwards; ``--external`` loads the server at ``--target`` and reads its
memory from ``--metrics-url``. Memory comes from the server's own metrics:
``process_resident_memory_bytes`` for the frontend and
``imago_worker_resident_memory_bytes`` for each worker, sampled after the
warm-up, every ``--sample-every`` seconds, and at the end. A leak shows as a
steady climb between the start and the end figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from imago.client import loadgen
from imago.client.bench import BenchError, OwnServer, free_port, mix_arg, number_arg
from imago.client.loadgen import Plan, phase_report

DESCRIPTION = """Run mixed load (caption, VQA, generate) at --concurrency for --duration
seconds and print throughput, errors by code, and the resident memory of the
frontend and of each worker at the start and at the end. Exit status 1 when
any request failed."""

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
    add("--duration", type=seconds, default=60.0, metavar="S", help="(default: 60)")
    add("--concurrency", type=at_least_1, default=8, metavar="C", help="(default: 8)")
    add("--mix", type=mix_arg, default={"caption": 2, "vqa": 1, "generate": 1},
        metavar="KIND=W,...",
        help="weights of caption, vqa, generate (default: caption=2,vqa=1,generate=1)")  # fmt: skip
    add("--steps", type=at_least_1, default=4, metavar="N", help="denoising steps (default: 4)")
    add("--size", type=number_arg(int, 64), default=0, metavar="PX",
        help="side of generated images, a multiple of 8 (default: the model's)")  # fmt: skip
    add("--preview-every", type=number_arg(int, 0), default=1, metavar="N",
        help="a preview every N steps, 0 for none (default: 1)")  # fmt: skip
    add("--sample-every", type=seconds, default=5.0, metavar="S",
        help="memory sampling interval (default: 5)")  # fmt: skip
    add("--start-timeout", type=seconds, default=600.0, metavar="S", help="(default: 600)")
    add("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run, soak_parser=p)
    return p


def format_report(report: dict[str, Any]) -> str:
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
    lines.append(f"{'memory MiB':<12}{'start':>10}{'end':>10}{'peak':>10}{'change':>10}")
    for name, m in report["memory_mib"].items():
        lines.append(f"{name:<12}{m['start']:>10.1f}{m['end']:>10.1f}{m['peak']:>10.1f}"
                     f"{m['change']:>+10.1f}")  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``imago soak``: prints the report; 0 when every request succeeded, else 1."""
    if args.external and not args.metrics_url:
        args.soak_parser.error("--external needs --metrics-url to read the server's memory")
    if args.size % 8:
        args.soak_parser.error(f"--size must be a multiple of 8, got {args.size}")
    order = tuple(loadgen.rotation(args.mix))
    plan = Plan(order, loadgen.sample_image(224), "what is in the picture?",
                "a lighthouse at dusk", args.steps, args.size, 0,
                min(args.preview_every, args.steps))  # fmt: skip
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
    report: dict[str, Any] = {"target": target, "server": where, "mix": args.mix,
                              "concurrency": args.concurrency}  # fmt: skip
    try:
        if server is not None:
            print("starting imago", *server.command[3:], file=sys.stderr, flush=True)
            server.start()
        warmup = max(args.concurrency, len(order))
        asyncio.run(loadgen.drive(target, [plan], args.concurrency, warmup, None, 0,
                                  args.timeout, floor_calls=0))  # fmt: skip
        watch = MemoryWatch(url, args.sample_every)
        watch.start()
        print(f"soaking {target} for {args.duration:g} s ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            soak = loadgen.drive(target, [plan], args.concurrency, None, args.duration, 0,
                                 args.timeout, floor_calls=0)  # fmt: skip
            load = asyncio.run(soak)
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
    outcomes, elapsed = load.phases[0]
    report["served"] = phase_report(outcomes, elapsed)
    report["memory_mib"] = watch.report()
    report["memory_samples"] = len(watch.samples)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["served"]["overall"]["errors"] else 0
