"""Bulk tools: ``imago caption --out FILE`` and ``imago ask --questions FILE
--out FILE`` run many requests through one bidirectional stream.

Inputs are files and directories (searched recursively for PNG, JPEG and
WebP). Results are appended to a JSON Lines file as they arrive, one line per
image (per image and question for ``ask``); a run that finds the file already
there skips what it already answered, so an interrupted run resumes. Files
that cannot be read are skipped and reported at the end; requests the server
refuses get a line with their error and are retried by the next run. Images
are read lazily, as the stream's flow control asks for more.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imago.client.api import ImagoClient, ask_request, caption_request
from imago.client.options import TextOptions
from imago.v1 import caption_pb2, vqa_pb2

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


@dataclass
class BulkReport:
    """How a bulk run went: answered, refused by the server, unreadable files."""

    answered: int = 0
    refused: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def image_paths(inputs: list[str]) -> list[Path]:
    """The image files named by ``inputs``: files as given (whatever their
    suffix), directories searched recursively for image suffixes, in order."""
    found: list[Path] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            found += sorted(
                p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            found.append(entry)
    return found


def answered(out: Path, result: str, keys: tuple[str, ...]) -> set[tuple]:
    """The ``keys`` of records in ``out`` that carry ``result`` (no error)."""
    done: set[tuple] = set()
    if not out.exists():
        return done
    with out.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
            if isinstance(record, dict) and result in record and all(k in record for k in keys):
                done.add(tuple(record[k] for k in keys))
    return done


def captioned(out: Path) -> set[str]:
    """Images that already have a caption line (no error) in ``out``."""
    return {image for (image,) in answered(out, "captions", ("image",))}


def caption_to_file(
    client: ImagoClient,
    inputs: list[str],
    out: Path,
    prefix: str,
    generation: TextOptions,
    progress: bool = True,
    adapter: str = "",
) -> BulkReport:
    """Caption every image of ``inputs`` not yet in ``out`` into ``out``,
    generating as ``generation`` says, with the server's adapter ``adapter``
    ("" for the base model)."""
    done = captioned(out)
    todo = [({"image": str(p)}, p) for p in image_paths(inputs) if str(p) not in done]

    def request(key: str, data: bytes, _: dict) -> caption_pb2.CaptionStreamRequest:
        return caption_pb2.CaptionStreamRequest(
            id=key, request=caption_request(data, prefix, generation=generation, adapter=adapter)
        )

    return _stream_to_file(
        todo, out, request, client.caption_stream, "captions", lambda r: r.captions, progress
    )


def ask_to_file(
    client: ImagoClient,
    inputs: list[str],
    questions: list[str],
    out: Path,
    generation: TextOptions,
    progress: bool = True,
    adapter: str = "",
) -> BulkReport:
    """Ask every question of ``questions`` about every image of ``inputs``,
    except the pairs already answered in ``out``, into ``out``, generating
    as ``generation`` says, with the server's adapter ``adapter`` ("" for
    the base model)."""
    done = answered(out, "answers", ("image", "question"))
    todo = [
        ({"image": str(p), "question": q}, p)
        for p in image_paths(inputs)
        for q in questions
        if (str(p), q) not in done
    ]

    def request(key: str, data: bytes, record: dict) -> vqa_pb2.AskStreamRequest:
        request = ask_request(data, record["question"], generation=generation, adapter=adapter)
        return vqa_pb2.AskStreamRequest(id=key, request=request)

    return _stream_to_file(
        todo, out, request, client.ask_stream, "answers", lambda r: r.answers, progress
    )


def _stream_to_file(
    todo: list[tuple[dict, Path]],
    out: Path,
    make_request: Callable[[str, bytes, dict], Any],
    stream: Callable[[Iterator[Any]], Iterator[Any]],
    result: str,
    texts_of: Callable[[Any], Any],
    progress: bool,
) -> BulkReport:
    from tqdm import tqdm

    report = BulkReport()
    pending: dict[str, dict] = {}

    def requests() -> Iterator[Any]:
        for index, (record, path) in enumerate(todo):
            try:
                data = path.read_bytes()
            except OSError as err:
                report.unreadable.append((str(path), err.strerror or str(err)))
                bar.update(1)
                continue
            pending[str(index)] = record
            yield make_request(str(index), data, record)

    _end_cut_line(out)
    with (
        out.open("a", encoding="utf-8") as sink,
        tqdm(
            total=len(todo), unit="req", file=sys.stderr, disable=None if progress else True
        ) as bar,
    ):
        for reply in stream(requests()):
            record = dict(pending.pop(reply.id))
            if reply.HasField("error"):
                report.refused += 1
                error = reply.error
                record["error"] = {"code": error.code, "message": error.message,
                                   "field": error.field}  # fmt: skip
            else:
                report.answered += 1
                record[result] = [
                    {"text": t.text, **({"score": t.score} if t.HasField("score") else {})}
                    for t in texts_of(reply.response)
                ]
                record["model"] = reply.response.info.model
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            bar.update(1)
    return report


def _end_cut_line(out: Path) -> None:
    """End a last line an interrupted run left without its newline, so the
    next record starts on a line of its own (the cut one is ignored)."""
    if out.exists() and out.stat().st_size:
        with out.open("rb+") as file:
            file.seek(-1, 2)
            if file.read(1) != b"\n":
                file.write(b"\n")
