"""The ``imago`` command line: run a server, caption, ask, generate, rank images,
check health.

Exit codes: 0 success; 1 a gRPC error (printed as ``error: CODE: details``) or a
health status other than SERVING; 2 bad usage or an unreadable/unwritable
local file; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from imago.client.api import DEFAULT_TARGET, GENERATION_FIELDS, ImagoClient
from imago.client.bench.closedloop import add_bench_parser
from imago.client.bench.devicebench import add_device_bench_parser
from imago.client.bench.soak import add_soak_parser
from imago.client.cli.argtypes import uint
from imago.client.cli.bulk import BulkReport, ask_to_file, caption_to_file, image_paths
from imago.client.cli.connect import add_connection_options, client_from_args
from imago.client.cli.finetune import add_finetune_parser
from imago.client.cli.generating import add_generate_parser
from imago.client.cli.localfiles import InputError, local, read
from imago.client.cli.ranking import add_rank_parser
from imago.client.cli.serve import add_serve_parser
from imago.client.options import TextOptions

_CAPTION_DOC = """Caption images, printing one line per image. With --out FILE, caption
them all through one bulk stream into JSON lines, with a progress bar: an
existing FILE is resumed (images already captioned are skipped), unreadable
files are skipped and reported, and the exit status is 1 if any image was
skipped or refused."""

_ASK_DOC = """Answer a question about an image: imago ask IMG QUESTION. With
--questions FILE --out FILE, ask every question of FILE about every image
named (files or directories) through one bulk stream into JSON lines,
resuming an existing FILE; the exit status is 1 if anything was skipped or
refused."""


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (unset options take the model's defaults)")
    add = group.add_argument
    add("--max-new-tokens", type=uint, metavar="N", help="new tokens at most")
    add("--min-new-tokens", type=uint, metavar="N", help="new tokens at least")
    add("--num-beams", type=uint, metavar="N", help="beam search width (1: none)")
    add("--sample", dest="do_sample", action=argparse.BooleanOptionalAction, help="sample tokens")
    add("--temperature", type=float, metavar="T", help="softmax temperature when sampling")
    add("--top-p", type=float, metavar="P", help="nucleus sampling mass")
    add("--top-k", type=uint, metavar="K", help="keep the K most likely tokens (0: all)")
    add("--repetition-penalty", type=float, metavar="X", help="1.0 means none")
    add("--num-return-sequences", type=uint, metavar="N", help="outputs per input")
    add("--length-penalty", type=float, metavar="X", help="> 0 favours longer beams")
    add("--seed", type=uint, help="seed for sampling, for reproducible output")


def _add_adapter_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        default="",
        metavar="NAME",
        help="adapter the server loaded (serve --caption-adapter-dir) to use (default: none)",
    )


#: Commands that talk to a server: they take --target, --timeout and the
#: connection options after the command name as well as before it.
CLIENT_COMMANDS = ("caption", "ask", "generate", "health", "rank", "bench", "soak")


def add_target_options(parser: argparse.ArgumentParser, *, repeated: bool = False) -> None:
    """Adds --target and --timeout to the top-level parser, or with
    ``repeated`` to a client command's (see :func:`add_connection_options`)."""
    target_default = os.environ.get("IMAGO_TARGET") or DEFAULT_TARGET
    parser.add_argument(
        "--target",
        default=argparse.SUPPRESS if repeated else target_default,
        metavar="HOST:PORT",
        help="server to talk to; a comma-separated list, or a DNS name with several "
        f"addresses, spreads calls over them (default: $IMAGO_TARGET, else {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS if repeated else None,
        metavar="SECONDS",
        help="deadline of each call (default: none)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``imago`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="imago", description="gRPC model server for BLIP-2 and Stable Diffusion."
    )
    add_target_options(parser)
    add_connection_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    add_serve_parser(sub)

    p = sub.add_parser("caption", help="caption images", description=_CAPTION_DOC)
    p.add_argument(
        "images", nargs="+", metavar="IMG", help="image files (PNG, JPEG, WebP) or directories"
    )
    p.add_argument(
        "--out", type=Path, metavar="FILE", help="append JSON lines here through one bulk stream"
    )
    p.add_argument("--prefix", default="", metavar="TEXT", help="text the caption starts with")
    _add_adapter_option(p)
    _add_generation_options(p)
    p.add_argument("--json", action="store_true", help="print JSON lines with all details")
    p.set_defaults(func=_caption)

    p = sub.add_parser("ask", help="ask about an image", description=_ASK_DOC)
    p.add_argument(
        "inputs", nargs="+", metavar="IMG QUESTION | IMG...", help="an image and a question, "
        "or with --questions, image files and directories",
    )  # fmt: skip
    p.add_argument("--questions", type=Path, metavar="FILE", help="questions, one per line")
    p.add_argument("--out", type=Path, metavar="FILE", help="with --questions: JSON lines here")
    _add_adapter_option(p)
    _add_generation_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON line with all details")
    p.set_defaults(func=_ask)

    add_generate_parser(sub)

    p = sub.add_parser("health", help="check server health", description="Check health.")
    p.add_argument(
        "service", nargs="?", default="", help="full service name (default: the whole server)"
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep asking until SERVING or SECONDS have passed (default: ask once)",
    )
    p.set_defaults(func=_health)

    add_rank_parser(sub)
    add_bench_parser(sub)
    add_device_bench_parser(sub)
    add_soak_parser(sub)
    add_finetune_parser(sub)
    for name in CLIENT_COMMANDS:
        add_target_options(sub.choices[name], repeated=True)
        add_connection_options(sub.choices[name], repeated=True)
    return parser


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The GenerationSettings fields set on the command line, by field name."""
    return {
        name: getattr(args, name)
        for name in GENERATION_FIELDS
        if getattr(args, name, None) is not None
    }


def text_options(args: argparse.Namespace) -> TextOptions:
    """How to generate captions and answers, from the command line: the
    options given set, the others left to the model."""
    return TextOptions(**generation_options(args))


def _check_readable(paths: list[str]) -> None:
    for path in paths:
        if not Path(path).exists():
            raise InputError(f"cannot read {path}: no such file")
        if not Path(path).is_file():
            raise InputError(f"cannot read {path}: not a file")
        if not os.access(path, os.R_OK):
            raise InputError(f"cannot read {path}: permission denied")


def _texts(items: Any) -> list[dict[str, Any]]:
    return [
        {"text": item.text, "score": item.score if item.HasField("score") else None}
        for item in items
    ]


def _details(reply: Any) -> dict[str, Any]:
    info = reply.info
    return {
        "seed": reply.seed if reply.HasField("seed") else None,
        "model": info.model,
        "request_id": info.request_id,
        "worker": info.worker,
        "queue_seconds": info.queue_seconds,
        "inference_seconds": info.inference_seconds,
    }


def _one_line(text: str) -> str:
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _client(args: argparse.Namespace) -> ImagoClient:
    return client_from_args(args)


def _caption(args: argparse.Namespace) -> int:
    generation = text_options(args)
    if args.out is not None:
        return _caption_to_file(args, generation)
    args.images = [str(path) for path in image_paths(args.images)]
    _check_readable(args.images)
    with _client(args) as client:
        for path in args.images:
            reply = client.caption(
                read(path), prefix=args.prefix, adapter=args.adapter, generation=generation
            )
            if args.json:
                line = {"image": path, "captions": _texts(reply.captions), **_details(reply)}
                print(json.dumps(line), flush=True)
            else:
                text = reply.captions[0].text if reply.captions else ""
                print(f"{path}\t{_one_line(text)}", flush=True)
    return 0


def _caption_to_file(args: argparse.Namespace, generation: TextOptions) -> int:
    with local("append to", args.out), args.out.open("a"):
        pass
    with _client(args) as client:
        report = caption_to_file(
            client, args.images, args.out, args.prefix, generation, adapter=args.adapter
        )
    return _bulk_done("captioned", report, args.out)


def _ask_to_file(args: argparse.Namespace) -> int:
    if args.questions is None or args.out is None:
        print("error: --questions and --out go together", file=sys.stderr)
        return 2
    with local("read", args.questions):
        text = args.questions.read_text(encoding="utf-8")
    questions = [line.strip() for line in text.splitlines() if line.strip()]
    with local("append to", args.out), args.out.open("a"):
        pass
    with _client(args) as client:
        report = ask_to_file(
            client, args.inputs, questions, args.out, text_options(args), adapter=args.adapter
        )
    return _bulk_done("answered", report, args.out)


def _bulk_done(verb: str, report: BulkReport, out: Path) -> int:
    for path, reason in report.unreadable:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    counts = f"refused {report.refused}, unreadable {len(report.unreadable)}"
    print(f"{verb} {report.answered}, {counts} -> {out}", file=sys.stderr)
    return 1 if report.refused or report.unreadable else 0


def _ask(args: argparse.Namespace) -> int:
    if args.questions is not None or args.out is not None:
        return _ask_to_file(args)
    if len(args.inputs) != 2:
        print("error: ask takes IMG QUESTION, or IMG... with --questions and --out",
              file=sys.stderr)  # fmt: skip
        return 2
    image, question = args.inputs
    data = read(image)
    with _client(args) as client:
        reply = client.ask(data, question, adapter=args.adapter, generation=text_options(args))
    if args.json:
        line = {"image": image, "question": question, "answers": _texts(reply.answers)}
        print(json.dumps({**line, **_details(reply)}))
    else:
        print(reply.answers[0].text if reply.answers else "")
    return 0


def _health(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.wait
    with _client(args) as client:
        while True:
            try:
                status = client.health(args.service)
            except grpc.RpcError as err:
                # Not listening yet, or still starting: only an error once time
                # is up. A refused token will not become valid by waiting.
                refused = err.code() == grpc.StatusCode.UNAUTHENTICATED
                if refused or time.monotonic() >= deadline:
                    raise
                status = ""
            if status == "SERVING" or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    print(status)
    return 0 if status == "SERVING" else 1


# ------------------------------------------------------------------ errors


def format_rpc_error(err: grpc.RpcError, target: str) -> str:
    """``error: CODE: details``, plus any field violations and retry delay the
    server attached; an unreachable server is named as such."""
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else None) or ""
    name = code.name if code is not None else "UNKNOWN"
    lowered = details.lower()
    unreachable = ("failed to connect", "connection refused", "dns", "errors resolving")
    if code == grpc.StatusCode.UNAVAILABLE and any(s in lowered for s in unreachable):
        return f"error: UNAVAILABLE: cannot reach an imago server at {target} ({details})"
    lines = [f"error: {name}: {details}" if details else f"error: {name}"]
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(err)
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                lines += [f"  {v.field}: {v.description}" for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                lines.append(f"  retry after {retry.retry_delay.ToTimedelta().total_seconds()}s")
    except ValueError:
        # Details that contradict the status line: that line is what counts.
        pass
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the ``imago`` command line on ``argv`` (default: ``sys.argv[1:]``)
    and returns its exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(format_rpc_error(err, args.target), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
