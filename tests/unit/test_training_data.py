"""The fine-tuning data folder, settings and batching (imago.workers.training.common)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from imago.workers.training.common import (
    Example,
    TrainSettings,
    autocast_dtype,
    batches,
    load_examples,
    share_readable,
)


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 60)).save(path)
    return path


def metadata(directory: Path, *records: dict | str) -> None:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def texts(examples: list[Example]) -> dict[str, tuple[str, str | None]]:
    return {e.image.name: (e.text, e.question) for e in examples}


def test_sidecar_texts_are_read_stripped_and_sorted_by_file(tmp_path):
    for name in ("b.png", "a.jpg"):
        image(tmp_path / name)
    (tmp_path / "a.txt").write_text("  a fox \n")
    (tmp_path / "b.txt").write_text("a hen")
    examples = load_examples(tmp_path)
    assert [e.image.name for e in examples] == ["a.jpg", "b.png"]
    assert texts(examples) == {"a.jpg": ("a fox", None), "b.png": ("a hen", None)}


def test_metadata_wins_over_a_sidecar_and_sidecars_fill_the_rest(tmp_path):
    for name in ("a.png", "b.png"):
        image(tmp_path / name)
    (tmp_path / "a.txt").write_text("from the sidecar")
    (tmp_path / "b.txt").write_text("b from the sidecar")
    metadata(tmp_path, {"file_name": "a.png", "text": "from metadata"})
    assert texts(load_examples(tmp_path)) == {
        "a.png": ("from metadata", None),
        "b.png": ("b from the sidecar", None),
    }


def test_questions_and_subfolders(tmp_path):
    image(tmp_path / "sub" / "c.PNG")
    image(tmp_path / "sub" / "d.webp")
    (tmp_path / "sub" / "d.txt").write_text("a dog")
    (tmp_path / "notes.md").write_text("not an image")
    metadata(
        tmp_path,
        {"file_name": "sub/c.PNG", "text": " red ", "question": " what colour? "},
        "",  # blank lines are skipped
    )
    assert texts(load_examples(tmp_path)) == {
        "c.PNG": ("red", "what colour?"),
        "d.webp": ("a dog", None),
    }


def test_an_image_without_text_is_named(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a fox")
    image(tmp_path / "sub" / "lonely.png")
    with pytest.raises(ValueError, match=r"sub/lonely\.png has no text"):
        load_examples(tmp_path)


def test_an_empty_sidecar_is_named(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(" \n")
    with pytest.raises(ValueError, match=r"a\.txt is empty"):
        load_examples(tmp_path)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "is not"),
        ('{"file_name": "a.png"}', "is not"),
        ('["a.png", "a fox"]', "is not"),
        ('{"file_name": "a.png", "text": "  "}', "empty text"),
        ('{"file_name": "a.png", "text": 7}', "empty text"),
        ('{"file_name": "a.png", "text": "a fox", "question": ""}', "empty question"),
    ],
)
def test_a_bad_metadata_line_is_named_by_number(tmp_path, line, problem):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    metadata(tmp_path, {"file_name": "b.png", "text": "a hen"}, "", line)
    with pytest.raises(ValueError, match=f"metadata.jsonl line 3 .*{problem}"):
        load_examples(tmp_path)


def test_metadata_naming_a_missing_image_is_an_error(tmp_path):
    image(tmp_path / "a.png")
    metadata(tmp_path, {"file_name": "a.png", "text": "a"}, {"file_name": "gone.png", "text": "b"})
    with pytest.raises(ValueError, match="gone.png"):
        load_examples(tmp_path)


def test_a_folder_without_images_or_no_folder_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("text without an image")
    with pytest.raises(ValueError, match="no images"):
        load_examples(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        load_examples(tmp_path / "missing")


def test_batches_shuffle_each_epoch_deterministically():
    examples = [Example(Path(f"{i}.png"), str(i)) for i in range(5)]
    stream = batches(examples, 2, seed=7)
    drawn = [e for _ in range(10) for e in next(stream)]  # four epochs
    assert all(Counter(drawn[i : i + 5]) == Counter(examples) for i in range(0, 20, 5))
    again = batches(examples, 2, seed=7)
    assert [e for _ in range(10) for e in next(again)] == drawn
    other = batches(examples, 2, seed=8)
    assert [e for _ in range(10) for e in next(other)] != drawn


def test_settings_name_the_adapter_after_out_and_check_their_ranges(tmp_path):
    base = dict(data=tmp_path, base="tiny:stable-diffusion")
    assert TrainSettings(out=Path("x/ink.safetensors"), **base).adapter_name == "ink"
    assert TrainSettings(out=Path("x/v1.2_soft"), **base).adapter_name == "v1.2_soft"
    with pytest.raises(ValueError, match="out: "):
        TrainSettings(out=Path("x/not a name"), **base)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainSettings(out=Path("ink"), steps=0, **base)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainSettings(out=Path("ink"), mixed_precision="fp8", **base)


def test_half_precision_is_for_gpus_only():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("no", cpu) is None
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast_dtype("bf16", cpu)


def test_share_readable_gives_a_folder_and_its_files_the_umasks_modes(tmp_path):
    folder = tmp_path / "adapter"
    (folder / "inner").mkdir(parents=True)
    for path in (folder / "a.safetensors", folder / "inner" / "b.json"):
        path.write_bytes(b"x")
        path.chmod(0o600)
    (folder / "inner").chmod(0o700)
    old = os.umask(0o027)
    try:
        share_readable(folder)
    finally:
        os.umask(old)
    modes = {path.name: path.stat().st_mode & 0o777 for path in [folder, *folder.rglob("*")]}
    assert modes == {"adapter": 0o750, "inner": 0o750, "a.safetensors": 0o640, "b.json": 0o640}
