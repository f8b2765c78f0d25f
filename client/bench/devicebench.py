"""``imago bench-device``: imago served against the raw libraries on one
device, side by side in one run, with the figures written to a JSON file.

This module is the command: its options, the servers it starts and the order
of everything. The served requests are :mod:`imago.client.bench.deviceserved`; the
direct library calls are :mod:`imago.workers.runtime.devicebench` (imported when the
command runs, so that importing this module pulls in no torch); the figures,
goals and table are :mod:`imago.client.bench.devicereport`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from imago.client import api
from imago.client.bench import devicereport, deviceserved, loadgen
from imago.client.bench.closedloop import BenchError, OwnServer, free_port, number_arg
from imago.workers.contract import presets
from imago.workers.contract.families import BLIP2, STABLE_DIFFUSION
from imago.workers.contract.presets import COMPILE_MODES, DTYPES

DESCRIPTION = """\
Measure imago served against the raw libraries on one device, and write every
figure to --out as JSON (a table goes to stdout).

bench-device loads the preset's Stable Diffusion and BLIP-2 models twice: in an
"imago serve" it starts (on a free local port) and in this process, with the
server's own loader (same weights, dtype and attention). It then measures
each figure served and direct in turn, so that only one of them uses the
device at a time:

  1. SD text-to-image at --size and --steps for each of --sd-batches B: served,
     one Generate request of B images (PNG, no previews); direct, one
     diffusers pipeline call of B images (PIL). it/s = steps / median wall.
  2. with --compile-mode other than off, a second server compiles the SD model
     (at its start, which is timed) and serves --compile-batches; each is
     compared with the direct uncompiled it/s of part 1.
  3. BLIP-2 captions of exactly --new-tokens tokens (greedy) for each of
     --caption-batches B: served, rounds of B concurrent Caption requests;
     direct, one generate call of B images. Served tokens are counted by the
     server (its imago_generated_tokens metric), direct ones from the output.
  4. previews at batch 1, one every step, by each method the model offers:
     time from sending to the first preview, and the cost per step.

Each measurement is the median of --repeats after one unmeasured warm-up.
The goals are served SD it/s >= 0.97 x direct at every batch, compiled served
>= 1.5 x direct at batch 1, and BLIP-2 served tokens/s >= 0.9 x direct at the
largest caption batch; a missed goal is reported, not an error.

Exit status: 0 when it ran; 1 when a request failed or a server did not
start; 2 for bad options."""

#: Server limits the options must stay within: images per request, new tokens.
MAX_IMAGES, MAX_NEW_TOKENS, MAX_SIZE, MAX_STEPS = 8, 256, 2048, 150


def bench_models(preset_name: str) -> tuple[presets.ModelSpec, presets.ModelSpec]:
    """The Stable Diffusion and BLIP-2 model specs of preset ``preset_name``;
    ValueError for an unknown preset or one without either family."""
    models = presets.preset(preset_name)
    found = {spec.family: spec for spec in models}
    missing = [f for f in (STABLE_DIFFUSION, BLIP2) if f not in found]
    if missing:
        raise ValueError(f"preset {preset_name!r} has no {' or '.join(missing)} model")
    return found[STABLE_DIFFUSION], found[BLIP2]


def sd_only_preset(preset_name: str) -> str:
    """A preset serving only ``preset_name``'s Stable Diffusion model, so that
    the compiled server loads nothing else; ``preset_name`` when none does."""
    sd, _ = bench_models(preset_name)
    return next((name for name, models in presets.PRESETS.items() if models == (sd,)), preset_name)


# ------------------------------------------------------------------ options


def _preset_arg(text: str) -> str:
    try:
        bench_models(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _batches_arg(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if any(value < 1 for value in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"batches must be distinct positive integers: {text!r}")
    return values


def _device_arg(text: str) -> str:
    kind, _, index = text.partition(":")
    if text == "cpu" or (kind == "cuda" and (not index or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"not cpu, cuda or cuda:N: {text!r}")


def add_device_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``bench-device`` subcommand to ``imago``'s subparsers ``sub``."""
    p = sub.add_parser("bench-device", help="measure served against direct library calls",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    at_least_1, count = number_arg(int, 1), number_arg(int, 0)
    add = p.add_argument
    add("--preset", type=_preset_arg, default="arch", help="models (default: arch)")
    add("--device", type=_device_arg, help="cpu, cuda or cuda:N (default: cuda if any, else cpu)")
    add("--dtype", choices=DTYPES, default="auto", help="(default: auto, fp16 on CUDA, else fp32)")
    add("--cache-dir", metavar="DIR", help="model cache of the server and of this process")
    add("--size", type=number_arg(int, 64), default=512, metavar="PX",
        help="width = height of SD images, a multiple of 8 (default: 512)")  # fmt: skip
    add("--steps", type=at_least_1, default=20, metavar="N", help="SD steps (default: 20)")
    add("--guidance", type=number_arg(float, 0), default=7.5, metavar="X", help="(default: 7.5)")
    add("--sd-batches", type=_batches_arg, default=[1, 4, 8], metavar="B,...",
        help="images per SD request (default: 1,4,8)")  # fmt: skip
    add("--caption-batches", type=_batches_arg, default=[1, 8, 32], metavar="B,...",
        help="concurrent caption requests (default: 1,8,32)")  # fmt: skip
    add("--new-tokens", type=at_least_1, default=20, metavar="N", help="(default: 20)")
    add("--repeats", type=at_least_1, default=3, metavar="N",
        help="measured runs of each figure, after one warm-up (default: 3)")  # fmt: skip
    add("--compile-mode", choices=COMPILE_MODES, default="reduce-overhead",
        help="torch.compile mode of SD in part 2; off skips it (default: %(default)s)")  # fmt: skip
    add("--compile-batches", type=_batches_arg, default=[1], metavar="B,...",
        help="SD batches of part 2, among --sd-batches (default: 1)")  # fmt: skip
    add("--prompt", default="a lighthouse at dusk", metavar="TEXT", help="SD prompt")
    add("--seed", type=count, default=0, help="seed of the first SD image and the input image")
    add("--start-timeout", type=number_arg(float, 1), default=600.0, metavar="S",
        help="longest a server may take to be SERVING, compiling too (default: 600)")  # fmt: skip
    add("--out", type=Path, default=Path("device-bench.json"), metavar="FILE",
        help="where the JSON report goes (default: device-bench.json)")  # fmt: skip
    p.set_defaults(func=run, device_bench_parser=p)
    return p


def _check(args: argparse.Namespace) -> None:
    fail = args.device_bench_parser.error
    if args.size % 8 or args.size > MAX_SIZE:
        fail(f"--size must be a multiple of 8 in 64..{MAX_SIZE}, got {args.size}")
    if args.steps > MAX_STEPS:
        fail(f"--steps must be at most {MAX_STEPS}, got {args.steps}")
    if args.guidance > 30:
        fail(f"--guidance must be in 0..30, got {args.guidance:g}")
    if max(args.sd_batches) > MAX_IMAGES:
        fail(f"--sd-batches: a request has at most {MAX_IMAGES} images, got {args.sd_batches}")
    if args.new_tokens > MAX_NEW_TOKENS:
        fail(f"--new-tokens must be at most {MAX_NEW_TOKENS}, got {args.new_tokens}")
    if max(args.caption_batches) > 256:
        fail(f"--caption-batches: at most 256 concurrent requests, got {args.caption_batches}")
    others = sorted(set(args.compile_batches) - set(args.sd_batches))
    if args.compile_mode != "off" and others:
        fail(f"--compile-batches {others} are not among --sd-batches {args.sd_batches}")
    if not args.out.parent.is_dir():
        fail(f"--out {args.out}: no such directory {args.out.parent}")


def server_gpu_env(device: str) -> dict[str, str]:
    """The environment that shows a server only the GPU ``device`` ("cuda:N",
    N counted among the GPUs this process sees) is; nothing for "cpu". This
    process itself is left as it is and addresses the GPU as ``device``."""
    if device == "cpu":
        return {}
    index = int(device.partition(":")[2] or 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if visible is None:
        return {"CUDA_VISIBLE_DEVICES": str(index)}
    return {"CUDA_VISIBLE_DEVICES": ids[index] if index < len(ids) else "-1"}


# ------------------------------------------------------------------ run


def _server_args(args: argparse.Namespace, device: str, preset: str) -> list[str]:
    extra = ["--preset", preset]
    extra += ["--cpu"] if device == "cpu" else []
    extra += ["--dtype", args.dtype] if args.dtype != "auto" else []
    extra += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    return extra


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _measure(args: argparse.Namespace, device: str, report: dict[str, Any]) -> None:
    """Parts 1, 3 and 4 on one server, then part 2 on a compiling one."""
    from PIL import Image

    from imago.workers.runtime import devicebench

    sd, blip2 = bench_models(args.preset)
    metrics_port = free_port()
    extra = _server_args(args, device, args.preset) + [
        "--max-batch-size", f"{sd.name}={max(args.sd_batches)}",
        "--max-batch-size", f"{blip2.name}={max(args.caption_batches)}",
        "--max-queue", str(max(256, max(args.caption_batches))),
        "--metrics-port", str(metrics_port)]  # fmt: skip
    server = OwnServer(extra, args.start_timeout, env=server_gpu_env(device))
    _log(f"starting imago {' '.join(server.command[3:])} and loading the models here ...")
    try:
        with ThreadPoolExecutor(1) as pool:
            starting, started = pool.submit(server.start), time.perf_counter()
            direct = devicebench.load_direct(sd, blip2, device, args.dtype, args.cache_dir)
            starting.result()
        report["server"].update(args=server.command[3:], start_s=time.perf_counter() - started)
        report["settings"]["direct_dtypes"] = direct.dtypes()
        with api.ImagoClient(server.target, timeout=args.timeout) as client:
            walls: dict[int, list[float]] = {}
            for batch in args.sd_batches:
                _log(f"Stable Diffusion, batch {batch}: served, then direct ...")
                served = deviceserved.served_generate(client, args, batch)
                mine = devicebench.time_text_to_image(
                    direct, args.prompt, batch, args.steps, args.size, args.guidance,
                    args.seed, args.repeats)  # fmt: skip
                row = devicereport.sd_row(batch, args.steps, served.seconds, mine.seconds,
                                          served.inference_seconds)  # fmt: skip
                row["max_pixel_difference"] = devicebench.max_pixel_difference(
                    served.image, mine.image
                )
                report["sd"].append(row)
                walls[batch] = served.seconds
            report["png_encode_ms"] = devicebench.png_encode_ms(mine.image)
            if 1 not in walls:
                walls[1] = deviceserved.served_generate(client, args, 1).seconds
            without = devicereport.median(walls[1])
            report["previews"] = {"batch": 1, "without_wall_s": without, "methods": []}
            for method in direct.preview_methods:
                _log(f"previews by {method} ...")
                served = deviceserved.served_generate(client, args, 1, method)
                row = devicereport.preview_row(method, args.steps, served.seconds,
                                               served.first_preview_s, without)  # fmt: skip
                report["previews"]["methods"].append(row)
        image_bytes = loadgen.sample_image(224, "jpeg", args.seed)
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        count = deviceserved.tokens_counter(metrics_port, blip2.name)
        for batch in args.caption_batches:
            _log(f"BLIP-2, batch {batch}: served, then direct ...")
            calls = deviceserved.served_captions(server.target, image_bytes, batch, args, count)
            served, tokens = asyncio.run(calls)
            source = "server metric imago_generated_tokens_total"
            if tokens is None:
                tokens, source = float(batch * args.new_tokens), "requested (min = max new tokens)"
            mine = devicebench.time_captions(direct, image, batch, args.new_tokens, args.repeats)
            row = devicereport.caption_row(batch, served.seconds, tokens, mine.seconds,
                                           devicereport.median(mine.tokens),
                                           served.batch_sizes)  # fmt: skip
            report["captions"].append({**row, "served_tokens_source": source})
    finally:
        report["server"]["exit_code"] = server.stop()
    if args.compile_mode != "off":
        _measure_compiled(args, device, sd, report)


def _measure_compiled(
    args: argparse.Namespace, device: str, sd: presets.ModelSpec, report: dict[str, Any]
) -> None:
    """Part 2: a server compiling the SD model, timed to SERVING, then each of
    --compile-batches against the direct uncompiled it/s of part 1."""
    extra = _server_args(args, device, sd_only_preset(args.preset)) + [
        "--compile", f"{sd.name}={args.compile_mode}",
        "--max-batch-size", f"{sd.name}={max(args.compile_batches)}",
        "--load-timeout-s", f"{args.start_timeout:g}"]  # fmt: skip
    server = OwnServer(extra, args.start_timeout, env=server_gpu_env(device))
    _log(f"starting imago {' '.join(server.command[3:])} (it compiles as it starts) ...")
    direct = {row["batch"]: row["direct_it_per_s"] for row in report["sd"]}
    compiled: dict[str, Any] = {"mode": args.compile_mode, "model": sd.name, "rows": []}
    report["compile"] = compiled
    try:
        started = time.perf_counter()
        server.start()
        compiled["start_s"] = time.perf_counter() - started
        with api.ImagoClient(server.target, timeout=args.timeout) as client:
            for batch in args.compile_batches:
                _log(f"compiled Stable Diffusion, batch {batch} ...")
                served = deviceserved.served_generate(client, args, batch)
                compiled["rows"].append(devicereport.compiled_row(
                    batch, args.steps, served.seconds, direct.get(batch),
                    served.inference_seconds))  # fmt: skip
    finally:
        compiled["server_args"], compiled["exit_code"] = server.command[3:], server.stop()


def run(args: argparse.Namespace) -> int:
    """``imago bench-device``: prints the table, writes the JSON report to
    --out; 0 when it ran, 1 when a request failed or a server did not start."""
    _check(args)
    from imago.workers.runtime import devicebench
    from imago.workers.runtime.device_setup import dtype_name

    device = devicebench.resolve_device(args.device)
    if device.startswith("cuda") and not devicebench.cuda_available():
        args.device_bench_parser.error(f"--device {device}: torch sees no CUDA device here")
    devicebench.use_device(device)
    sd, blip2 = bench_models(args.preset)
    settings = {
        "preset": args.preset, "sd_model": sd.name, "sd_source": sd.source,
        "blip2_model": blip2.name, "blip2_source": blip2.source, "device": device,
        "dtype": args.dtype, "dtype_resolved": dtype_name(args.dtype, device),
        "size": args.size, "steps": args.steps, "guidance": args.guidance,
        "sd_batches": args.sd_batches, "caption_batches": args.caption_batches,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "seed": args.seed,
        "prompt": args.prompt, "compile_mode": args.compile_mode,
        "compile_batches": args.compile_batches if args.compile_mode != "off" else [],
        "caption_image": "224 px JPEG (quality 90)",
    }  # fmt: skip
    report: dict[str, Any] = {
        "device": devicebench.device_description(device), "settings": settings, "server": {},
        "sd": [], "png_encode_ms": None, "compile": None, "captions": [], "previews": None,
    }  # fmt: skip
    failure = None
    try:
        _measure(args, device, report)
    except grpc.RpcError as err:
        code = err.code().name if hasattr(err, "code") else "UNKNOWN"
        failure = f"a request failed: {code}: {err.details() if hasattr(err, 'details') else err}"
    except (BenchError, RuntimeError, OSError, ValueError) as err:
        failure = str(err)
    report["goals"] = devicereport.goals(report)
    report["error"] = failure
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    print(devicereport.format_report(report), end="")
    _log(f"wrote {args.out}")
    return 0
