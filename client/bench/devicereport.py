"""Figures, goals and the printed table of ``imago bench-device``.

Pure functions of measured wall times: nothing here talks to a server or
touches a device, so every figure and goal can be checked on known numbers.
Times are in seconds unless a name says ms; rates are per second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import median
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

#: (name, wording, threshold) of each goal; a ratio at or above the threshold meets it.
GOALS: tuple[tuple[str, str, float], ...] = (
    ("sd_served_vs_direct", "served SD it/s >= 0.97 x direct at every batch", 0.97),
    ("compiled_vs_direct", "compiled served SD it/s >= 1.5 x direct (SDPA) at batch 1", 1.5),
    ("blip2_served_vs_direct", "served BLIP-2 tokens/s >= 0.9 x direct at the largest batch", 0.9),
)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; None when either is None or ``b`` is 0."""
    return a / b if a is not None and b else None


def per_second(count: float | None, seconds: float) -> float | None:
    """``count`` per second of ``seconds``; None when either is missing or 0."""
    return count / seconds if count is not None and seconds > 0 else None


def sd_row(
    batch: int,
    steps: int,
    served_s: Sequence[float],
    direct_s: Sequence[float],
    inference_s: Sequence[float] = (),
) -> dict[str, Any]:
    """Figures of one Stable Diffusion batch: ``served_s`` and ``direct_s`` are
    the measured wall seconds of each served request and each direct pipeline
    call, ``inference_s`` the worker's own seconds the served results
    reported. it/s is ``steps`` over the median wall; ratio served / direct."""
    served, direct = median(served_s), median(direct_s)
    row = {
        "batch": batch,
        "served_wall_s": served,
        "served_it_per_s": per_second(steps, served),
        "served_images_per_s": per_second(batch, served),
        "served_inference_s": median(inference_s) if inference_s else None,
        "direct_wall_s": direct,
        "direct_it_per_s": per_second(steps, direct),
        "direct_images_per_s": per_second(batch, direct),
        "served_walls_s": list(served_s),
        "direct_walls_s": list(direct_s),
    }
    row["ratio"] = ratio(row["served_it_per_s"], row["direct_it_per_s"])
    return row


def compiled_row(
    batch: int,
    steps: int,
    served_s: Sequence[float],
    direct_it_per_s: float | None,
    inference_s: Sequence[float] = (),
) -> dict[str, Any]:
    """Figures of one batch on the compiled server, against the direct
    (uncompiled) it/s of the same batch."""
    served = median(served_s)
    it_per_s = per_second(steps, served)
    return {
        "batch": batch,
        "served_wall_s": served,
        "served_it_per_s": it_per_s,
        "served_inference_s": median(inference_s) if inference_s else None,
        "direct_it_per_s": direct_it_per_s,
        "ratio": ratio(it_per_s, direct_it_per_s),
        "served_walls_s": list(served_s),
    }


def caption_row(
    batch: int,
    served_s: Sequence[float],
    served_tokens: float | None,
    direct_s: Sequence[float],
    direct_tokens: float | None,
    batch_sizes: Sequence[int] = (),
) -> dict[str, Any]:
    """Figures of one caption batch: ``served_s`` are the wall seconds of each
    round of ``batch`` concurrent requests, ``direct_s`` those of each
    ``generate`` call of ``batch`` images; ``*_tokens`` the new tokens of one
    round or call. Rates are over the median wall; "ratio" is served / direct
    tokens/s. ``batch_sizes`` are the info.batch_size the served replies gave."""
    served, direct = median(served_s), median(direct_s)
    row = {
        "batch": batch,
        "served_round_s": served,
        "served_captions_per_s": per_second(batch, served),
        "served_tokens_per_s": per_second(served_tokens, served),
        "served_tokens_per_round": served_tokens,
        "served_mean_batch_size": sum(batch_sizes) / len(batch_sizes) if batch_sizes else None,
        "direct_call_s": direct,
        "direct_captions_per_s": per_second(batch, direct),
        "direct_tokens_per_s": per_second(direct_tokens, direct),
        "direct_tokens_per_call": direct_tokens,
        "served_rounds_s": list(served_s),
        "direct_calls_s": list(direct_s),
    }
    row["captions_ratio"] = ratio(row["served_captions_per_s"], row["direct_captions_per_s"])
    row["ratio"] = ratio(row["served_tokens_per_s"], row["direct_tokens_per_s"])
    return row


def preview_row(
    method: str, steps: int, with_s: Sequence[float], first_s: Sequence[float], without_s: float
) -> dict[str, Any]:
    """Figures of one preview method at a preview every step: ``with_s`` the
    wall seconds of each request, ``first_s`` the seconds from sending each to
    its first preview, ``without_s`` the median wall of the same request
    without previews."""
    wall = median(with_s)
    return {
        "method": method,
        "first_preview_ms": median(first_s) * 1000 if first_s else None,
        "wall_s": wall,
        "without_wall_s": without_s,
        "overhead_ms_per_step": (wall - without_s) * 1000 / steps,
        "walls_s": list(with_s),
    }


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of :data:`GOALS` with the ``value`` it is judged on (the
    least served/direct ratio over the SD batches; the compiled ratio at
    batch 1; the BLIP-2 ratio at the largest caption batch) and ``passed``:
    True, False, or None when the figure was not measured."""
    sd = [row["ratio"] for row in report.get("sd", [])]
    compiled = report.get("compile") or {}
    at_one = [row["ratio"] for row in compiled.get("rows", []) if row["batch"] == 1]
    captions = report.get("captions", [])
    largest = max(captions, key=lambda row: row["batch"]) if captions else None
    values = {
        "sd_served_vs_direct": min(sd) if sd and None not in sd else None,
        "compiled_vs_direct": at_one[0] if at_one else None,
        "blip2_served_vs_direct": largest["ratio"] if largest else None,
    }
    judged = []
    for name, wording, threshold in GOALS:
        value = values[name]
        passed = None if value is None else value >= threshold
        judged.append({"name": name, "goal": wording, "threshold": threshold,
                       "value": value, "passed": passed})  # fmt: skip
    return judged


def counter_value(text: str, name: str, labels: dict[str, str]) -> float | None:
    """The value of sample ``name`` with exactly ``labels`` in Prometheus text
    exposition ``text``; None when there is no such sample."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value if math.isfinite(sample.value) else None
    return None


# ------------------------------------------------------------------ table


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return ["  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True))
            for line in (header, *rows)]  # fmt: skip


def format_report(report: dict[str, Any]) -> str:
    """The plain-text table of a bench-device report (see ``imago bench-device``)."""
    device, s = report["device"], report["settings"]
    lines = [
        f"device: {device['name']}; torch {device['torch']}, diffusers {device['diffusers']}, "
        f"transformers {device['transformers']}; dtype {s['dtype_resolved']}",
        "",
        f"Stable Diffusion {s['sd_model']}: {s['size']}x{s['size']}, {s['steps']} steps, "
        f"guidance {s['guidance']:g}, median of {s['repeats']}",
    ]
    header = ("batch", "served it/s", "direct it/s", "served/direct", "served s", "worker s",
              "direct s")  # fmt: skip
    rows = [(str(r["batch"]), _num(r["served_it_per_s"]), _num(r["direct_it_per_s"]),
             _num(r["ratio"], 3), _num(r["served_wall_s"], 3), _num(r["served_inference_s"], 3),
             _num(r["direct_wall_s"], 3)) for r in report["sd"]]  # fmt: skip
    lines += _table(header, rows)
    if report.get("png_encode_ms") is not None:
        lines.append(f"PNG encoding of one result image: {report['png_encode_ms']:.1f} ms")
    compiled = report.get("compile")
    if compiled:
        lines += ["", f"compiled ({compiled['mode']}): server SERVING after "
                      f"{compiled['start_s']:.1f} s"]  # fmt: skip
        header = ("batch", "served it/s", "direct it/s", "compiled/direct", "served s")
        rows = [(str(r["batch"]), _num(r["served_it_per_s"]), _num(r["direct_it_per_s"]),
                 _num(r["ratio"], 3), _num(r["served_wall_s"], 3))
                for r in compiled["rows"]]  # fmt: skip
        lines += _table(header, rows)
    tokens = s["new_tokens"]
    lines += ["", f"BLIP-2 {s['blip2_model']}: {tokens} new tokens per caption, "
                  f"median of {s['repeats']} rounds"]  # fmt: skip
    header = ("batch", "served cap/s", "direct cap/s", "served tok/s", "direct tok/s",
              "served/direct", "mean batch")  # fmt: skip
    rows = [(str(r["batch"]), _num(r["served_captions_per_s"]), _num(r["direct_captions_per_s"]),
             _num(r["served_tokens_per_s"], 1), _num(r["direct_tokens_per_s"], 1),
             _num(r["ratio"], 3), _num(r["served_mean_batch_size"], 1))
            for r in report["captions"]]  # fmt: skip
    lines += _table(header, rows)
    previews = report.get("previews")
    if previews:
        lines += ["", f"previews: batch 1, one every step; without previews "
                      f"{previews['without_wall_s']:.3f} s"]  # fmt: skip
        header = ("method", "first preview ms", "wall s", "overhead ms/step")
        rows = [(r["method"], _num(r["first_preview_ms"], 1), _num(r["wall_s"], 3),
                 _num(r["overhead_ms_per_step"], 2)) for r in previews["methods"]]  # fmt: skip
        lines += _table(header, rows)
    lines += ["", "goals:"]
    marks = {True: "met", False: "MISSED", None: "not measured"}
    for goal in report["goals"]:
        lines.append(f"  {marks[goal['passed']]:<12} {goal['goal']}: {_num(goal['value'], 3)}")
    return "\n".join(lines) + "\n"
