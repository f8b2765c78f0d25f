"""``imago caption --out FILE``: caption many images through one bulk stream.

Inputs are files and directories (searched recursively for PNG, JPEG and
WebP). Results are appended to a JSON Lines file as they arrive, one line per
image; a run that finds the file already there skips the images it already
captioned, so an interrupted run resumes. Files that cannot be read are
skipped and reported at the end; images the server refuses get a line with
their error and are retried by the next run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imago.client.api import ImagoClient, caption_request
from imago.v1 import caption_pb2

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


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


def captioned(out: Path) -> set[str]:
    """Images that already have a caption line (no error) in ``out``."""
    done: set[str] = set()
    if not out.exists():
        return done
    with out.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
            if isinstance(record, dict) and "captions" in record and "image" in record:
                done.add(record["image"])
    return done


def _end_cut_line(out: Path) -> None:
    """End a last line an interrupted run left without its newline, so the
    next record starts on a line of its own (the cut one is ignored)."""
    if out.exists() and out.stat().st_size:
        with out.open("rb+") as file:
            file.seek(-1, 2)
            if file.read(1) != b"\n":
                file.write(b"\n")


def caption_to_file(
    client: ImagoClient,
    inputs: list[str],
    out: Path,
    prefix: str,
    settings: dict[str, Any],
    progress: bool = True,
) -> tuple[int, int, list[tuple[str, str]]]:
    """Caption every image of ``inputs`` not yet in ``out`` into ``out``.
    Returns (captioned, refused by the server, [(unreadable path, reason)])."""
    from tqdm import tqdm

    done = captioned(out)
    todo = [p for p in image_paths(inputs) if str(p) not in done]
    unreadable: list[tuple[str, str]] = []
    by_id: dict[str, str] = {}

    def requests() -> Iterator[caption_pb2.CaptionStreamRequest]:
        for index, path in enumerate(todo):
            try:
                data = path.read_bytes()
            except OSError as err:
                unreadable.append((str(path), err.strerror or str(err)))
                bar.update(1)
                continue
            by_id[str(index)] = str(path)
            request = caption_request(data, prefix, **settings)
            yield caption_pb2.CaptionStreamRequest(id=str(index), request=request)

    ok = refused = 0
    disable = None if progress else True
    _end_cut_line(out)
    with (
        out.open("a", encoding="utf-8") as sink,
        tqdm(total=len(todo), unit="img", file=sys.stderr, disable=disable) as bar,
    ):
        for reply in client.caption_stream(requests()):
            path = by_id.pop(reply.id)
            if reply.HasField("error"):
                refused += 1
                error = {"code": reply.error.code, "message": reply.error.message,
                         "field": reply.error.field}  # fmt: skip
                record: dict[str, Any] = {"image": path, "error": error}
            else:
                ok += 1
                texts = [{"text": c.text, **({"score": c.score} if c.HasField("score") else {})}
                         for c in reply.response.captions]  # fmt: skip
                record = {"image": path, "captions": texts, "model": reply.response.info.model}
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            bar.update(1)
    return ok, refused, unreadable
