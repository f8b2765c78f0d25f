"""``imago bench``: closed-loop load against a server, in the spirit of Triton's
perf_analyzer, with an in-process baseline measured side by side.

This module is the command: its options, the server it starts and stops, the
in-process baseline, the comparisons and the report. The load and its figures
are :mod:`imago.client.bench.loadgen`. Importing this module pulls in neither torch
nor the server: ``--baseline`` imports both when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import grpc

from imago.client import api
from imago.client.bench import loadgen
from imago.client.bench.loadgen import Outcome, Plan, phase_report, ratio
from imago.client.messages import PREVIEW_METHODS

DESCRIPTION = """\
Drive closed-loop load at an imago server and print throughput and latency.

By default bench starts its own server ("imago serve --preset P" on a free
local port, plus any --server-arg), waits until it is SERVING and stops it at
the end. With --external it loads the server at imago's --target instead:
  imago --target HOST:PORT bench --external ...
--concurrency C workers each send their next request as soon as the previous
one is answered, for --requests N requests or --duration S seconds, after
--warmup unmeasured ones. Kinds follow --mix in a fixed weighted rotation;
text requests decode greedily, request i has seed --seed + i. Caption and VQA
send one synthetic photo-like image (--image-format, --image-size).

Latency runs from sending a request to its response (generate: to the Result
event). Percentiles interpolate linearly between ranks, as numpy.percentile
does. Throughput is completed requests (images) per second of the phase's wall
time; each kind's is over the same wall time. batch: mean info.batch_size.
rpc_floor_ms: p50 of 200 sequential health checks on the load's channel, sent
first: what a call that does no work costs.

--baseline then loads the preset's models in this process (no server) and runs
the same requests (same jobs, images, settings and seeds) one per call and in
batches of C of one kind, and prints overhead_ms (served p50 - in-process p50;
rpc_floor_ms of it is transport), batched_ratio (served req/s / batched req/s)
and sequential_speedup (served req/s / one-at-a-time req/s). --compare-previews
repeats the load with a preview every step and prints previews_ratio (images/s
with / without).

Exit status: 0; 1 when a request failed (figures are printed all the same) or
the server could not be started or reached; 2 for bad options."""


class BenchError(Exception):
    """A run that cannot go on (server did not start, model missing)."""


# ------------------------------------------------------------------ server


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OwnServer:
    """An ``imago serve`` subprocess on a free local port. Its output goes to
    a temporary file, whose end is quoted when the server fails to start."""

    def __init__(
        self,
        extra_args: Sequence[str],
        start_timeout_s: float,
        env: dict[str, str] | None = None,
    ) -> None:
        """``env``: variables to set in the server's environment on top of this
        process's."""
        port = free_port()
        self.target = f"127.0.0.1:{port}"
        self.command = [sys.executable, "-m", "imago.client.cli", "serve"]
        self.command += ["--host", "127.0.0.1", "--port", str(port), *extra_args]
        self.start_timeout_s = start_timeout_s
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()

    def _failure(self, what: str) -> BenchError:
        self._log.seek(0)
        tail = self._log.read().decode(errors="replace").splitlines()[-30:]
        return BenchError("\n".join([what + "; its last lines:", *tail]))

    def start(self) -> None:
        """Start the server and wait until its health is SERVING (BenchError if not)."""
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
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
    from imago.server.config import Limits
    from imago.server.errors import RequestError
    from imago.server.image_jobs import text_to_image_job
    from imago.server.validation import caption_job, vqa_job
    from imago.workers.runtime.inprocess import load_for_services
    from imago.workers.runtime.runner import Request

    services = {loadgen.SERVICES[kind] for kind in plan.order}
    try:
        runners = load_for_services(preset_name, services, device, cache_dir)
    except ValueError as err:
        raise BenchError(str(err)) from None
    limits = Limits()
    builders = {"caption": caption_job, "vqa": vqa_job, "generate": text_to_image_job}

    def prepare(index: int) -> tuple[Any, Request] | str:
        kind, proto = plan.kind(index), plan.proto(index)
        runner = runners[loadgen.SERVICES[kind]]
        try:
            job, images = builders[kind](proto, runner.info(), limits)
        except RequestError as err:  # the server would have answered with err.code
            return err.code.name
        return runner, Request(f"{kind}-{index}", job, images)

    phases = loadgen.run_in_process(plan, indices, warmup, batch_size, prepare)
    return {"device": device, "batch_size": batch_size, **phases}


# ------------------------------------------------------------------ output

_HEADER = "kind        done  errors    req/s    img/s   p50 ms   p95 ms   p99 ms  mean ms  batch"
FIGURES = {
    "rpc_floor_ms": "p50 of an empty health check round trip: the least any served call costs",
    "overhead_ms": "served p50 - in-process sequential p50, ms",
    "batched_ratio": "served req/s / in-process batch-of-C req/s",
    "sequential_speedup": "served req/s / in-process sequential req/s",
    "previews_ratio": "images/s with a preview every step / images/s without",
    "preview_cost_ms_per_step": "p50 latency with previews - without, per step",
    "first_preview_ms": "p50 from sending a generation to its first preview",
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
    header = (f"target {report['target']} ({report['server']}), concurrency "
              f"{report['concurrency']}, mix {mix}, warmup {report['warmup']}")  # fmt: skip
    if report.get("input"):
        image = report["input"]
        header += f", input {image['format']} {image['side']}px {image['bytes']} bytes"
    lines = [header, "", *format_phase("served", report["served"])]
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
    lines += [f"{k} = {_num(report[k], 3)}   ({m})" for k, m in FIGURES.items() if k in report]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------ command


def number_arg(kind: Callable[[str], Any], least: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not least <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be at least {least}: {text}")
        return value

    return parse


def mix_arg(text: str) -> dict[str, int]:
    try:
        return loadgen.parse_mix(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``imago``'s subparsers ``sub``."""
    p = sub.add_parser("bench", help="drive load at a server and print figures",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    count, at_least_1, seconds = number_arg(int, 0), number_arg(int, 1), number_arg(float, 0.001)
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
    add("--mix", type=mix_arg, default={"caption": 1}, metavar="KIND=W,...",
        help="weights of caption, vqa, generate (default: caption=1)")  # fmt: skip
    add("--image-size", type=at_least_1, default=224, metavar="PX",
        help="side of the square input image of caption and VQA (default: 224)")  # fmt: skip
    add("--image-format", choices=tuple(loadgen.IMAGE_FORMATS), default="jpeg",
        help="encoding of that image (default: jpeg, quality 90)")  # fmt: skip
    add("--question", default="what is in the picture?", metavar="TEXT", help="VQA question")
    add("--prompt", default="a lighthouse at dusk", metavar="TEXT", help="generate prompt")
    add("--steps", type=at_least_1, default=10, metavar="N", help="denoising steps (default: 10)")
    add("--size", type=number_arg(int, 64), default=0, metavar="PX", help="width = height of "
        "generated images, a multiple of 8 (default: the model's)")  # fmt: skip
    add("--preview-every", type=count, default=0, metavar="N",
        help="a preview every N steps (default: 0, none)")  # fmt: skip
    add("--preview-method", choices=PREVIEW_METHODS, default="latent_rgb",
        help="how previews are made (default: %(default)s)")  # fmt: skip
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


def _own_server(args: argparse.Namespace) -> OwnServer | None:
    if args.external:
        return None
    extra = ["--preset", args.preset, *args.server_arg]
    extra += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    extra += ["--workers", str(args.workers)] if args.workers else []
    return OwnServer(extra, args.start_timeout)


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
    report["batched_ratio"] = ratio(served["throughput_rps"], batched)
    report["sequential_speedup"] = ratio(served["throughput_rps"], seq["throughput_rps"])


def run(args: argparse.Namespace) -> int:
    """``imago bench``: prints the report; 0 when every request succeeded, else 1.

    The JSON report holds target, server, concurrency, mix, warmup, "input"
    (format, side, bytes of the image caption and VQA send; null without
    them), rpc_floor_ms, "served" (a :func:`phase_report`), with
    --compare-previews "served_with_previews" and previews_ratio, with
    --baseline "baseline" and overhead_ms, batched_ratio and
    sequential_speedup; a started server's pid and exit code.
    """
    _check(args)
    order = tuple(loadgen.rotation(args.mix))
    image = loadgen.sample_image(args.image_size, args.image_format, args.seed)
    plan = Plan(order, image, args.question, args.prompt, args.steps, args.size, args.seed,
                args.preview_every, args.preview_method)  # fmt: skip
    plans = [plan, replace(plan, preview_every=1)] if args.compare_previews else [plan]
    count = args.requests if args.requests or args.duration else 200
    every_kind = max(order.index(kind) for kind in args.mix) + 1
    warmup = max(args.concurrency, 2, every_kind) if args.warmup is None else args.warmup
    server = _own_server(args)
    target = args.target if server is None else server.target
    where = "external" if server is None else f"started, preset {args.preset}"
    sent = {"format": args.image_format, "side": args.image_size, "bytes": len(image)}
    sent = sent if any(kind in loadgen.IMAGE_KINDS for kind in args.mix) else None
    report: dict[str, Any] = {"target": target, "server": where, "concurrency": args.concurrency,
                              "mix": args.mix, "warmup": warmup, "input": sent}  # fmt: skip
    try:
        if server is not None:
            print("starting imago", *server.command[3:], file=sys.stderr, flush=True)
            server.start()
            report["server_pid"] = server.process.pid
        print(f"measuring {target} ...", file=sys.stderr, flush=True)
        load = asyncio.run(loadgen.drive(target, plans, args.concurrency, count, args.duration,
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
    phases, report["rpc_floor_ms"] = load.phases, load.rpc_floor_ms
    report["served"] = phase_report(*phases[0])
    failed = any(o.code != "OK" for outcomes, _ in phases for o in outcomes)
    if report["served"]["overall"]["first_preview_ms"] is not None:
        report["first_preview_ms"] = report["served"]["overall"]["first_preview_ms"]
    if args.compare_previews:
        report["served_with_previews"] = with_previews = phase_report(*phases[1])
        report["previews_ratio"] = ratio(with_previews["overall"]["images_per_s"],
                                         report["served"]["overall"]["images_per_s"])  # fmt: skip
        slower = with_previews["overall"]["latency_ms"]["p50"]
        plain = report["served"]["overall"]["latency_ms"]["p50"]
        if slower is not None and plain is not None:
            report["preview_cost_ms_per_step"] = (slower - plain) / args.steps
        report["first_preview_ms"] = with_previews["overall"]["first_preview_ms"]
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
