"""``imago rank``: order images by how well they match a prompt.

Images go to the AlignService's Match in groups of ``--group`` (the server
takes 32 images per request by default). Each image gets the contrastive
similarity and, when the model has an image-text matching (ITM) head, the
ITM probability, which ranks more accurately; ``--similarity-only`` skips it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from imago.client.api import ImagoClient
from imago.client.cli.argtypes import positive
from imago.client.cli.bulk import image_paths
from imago.client.cli.connect import client_from_args
from imago.client.cli.localfiles import read

_RANK_DOC = """Order images (files or directories) by how well they match --prompt,
best first: one line per image with its rank, score and path. The score is the
image-text matching probability when the server's model has an ITM head, the
contrastive similarity otherwise (or with --similarity-only)."""

# Images per Match request: the server's default limit.
DEFAULT_GROUP = 32


@dataclass(frozen=True)
class Ranked:
    """One image's scores against the prompt."""

    image: str
    similarity: float
    match_probability: float | None = None

    @property
    def score(self) -> float:
        if self.match_probability is None:
            return self.similarity
        return self.match_probability


def add_rank_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``rank`` subcommand to ``sub`` (an argparse subparsers action)."""
    p = sub.add_parser(
        "rank", help="order images by how well they match a prompt", description=_RANK_DOC
    )
    add = p.add_argument
    add("images", nargs="+", metavar="IMG", help="image files (PNG, JPEG, WebP) or directories")
    add("--prompt", required=True, metavar="TEXT", help="what the best image shows")
    add("--top", type=positive, metavar="K", help="print only the K best images")
    add(
        "--similarity-only",
        action="store_true",
        help="rank by contrastive similarity alone, without the ITM head",
    )
    add(
        "--group",
        type=positive,
        default=DEFAULT_GROUP,
        metavar="N",
        help="images per request (default: %(default)s)",
    )
    add("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(func=run_rank)
    return p


def rank_images(
    client: ImagoClient,
    paths: list[str],
    prompt: str,
    *,
    matching: bool = True,
    group: int = DEFAULT_GROUP,
) -> tuple[list[Ranked], bool]:
    """Score every image of ``paths`` against ``prompt``, best first, and say
    whether ITM probabilities were used. With ``matching``, a model without
    an ITM head (FAILED_PRECONDITION) falls back to similarities."""
    ranked: list[Ranked] = []
    for start in range(0, len(paths), group):
        chunk = paths[start : start + group]
        images = [read(path) for path in chunk]
        try:
            reply = client.match(images, [prompt], image_text_matching=matching)
        except grpc.RpcError as err:
            if not matching or err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            print(f"note: {err.details()}; ranking by similarity", file=sys.stderr)
            matching = False
            reply = client.match(images, [prompt])
        similarities = list(reply.similarities.values)
        probabilities = list(reply.match_probabilities.values) if matching else None
        for i, path in enumerate(chunk):
            probability = probabilities[i] if probabilities is not None else None
            ranked.append(Ranked(path, similarities[i], probability))
    ranked.sort(key=lambda r: r.score, reverse=True)
    return ranked, matching


def run_rank(args: argparse.Namespace) -> int:
    paths = [str(path) for path in image_paths(args.images)]
    if not paths:
        print("error: no images found", file=sys.stderr)
        return 2
    with client_from_args(args) as client:
        ranked, matching = rank_images(
            client, paths, args.prompt, matching=not args.similarity_only, group=args.group
        )
    ranked_by = "match_probability" if matching else "similarity"
    for place, item in enumerate(ranked[: args.top], start=1):
        if args.json:
            print(json.dumps({"rank": place, **asdict(item), "ranked_by": ranked_by}))
        else:
            print(f"{place}\t{item.score:.4f}\t{Path(item.image)}")
    return 0
