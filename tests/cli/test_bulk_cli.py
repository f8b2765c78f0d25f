"""imago caption --out: one bulk stream into JSON lines, resumable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import png_bytes

from imago.client.cli.bulk import captioned, image_paths


def images(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"img-{i:02d}.png"
        path.write_bytes(png_bytes(color=(10 * i, 200 - 5 * i, 90)))
        paths.append(path)
    return paths


def caption(server, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "imago.client.cli", "--target", server.target, "caption"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_directories_are_searched_for_images_and_files_taken_as_given(tmp_path):
    found = images(tmp_path / "a" / "b", 2)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    extra = tmp_path / "photo.data"
    assert image_paths([str(tmp_path / "a"), str(extra)]) == [*found, extra]


def test_a_directory_is_captioned_into_json_lines(server, tmp_path):
    paths = images(tmp_path / "in", 12)
    out = tmp_path / "captions.jsonl"
    done = caption(server, str(tmp_path / "in"), "--out", str(out), "--max-new-tokens", "5")
    assert done.returncode == 0, done.stderr
    records = lines(out)
    assert sorted(r["image"] for r in records) == sorted(map(str, paths))
    assert all(r["captions"][0]["text"] and r["model"] == "blip2-tiny" for r in records)
    assert "captioned 12" in done.stderr


def test_a_second_run_resumes_where_the_first_stopped(server, tmp_path):
    paths = images(tmp_path / "in", 6)
    out = tmp_path / "captions.jsonl"
    first = {"image": str(paths[0]), "captions": [{"text": "earlier"}], "model": "m"}
    out.write_text(json.dumps(first) + "\n" + '{"image": "cut sho')  # an interrupted line
    done = caption(server, str(tmp_path / "in"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert captioned(out) == set(map(str, paths))
    assert "captioned 5" in done.stderr
    again = caption(server, str(tmp_path / "in"), "--out", str(out))
    assert "captioned 0" in again.stderr


def test_unreadable_files_are_skipped_and_reported(server, tmp_path):
    good = images(tmp_path / "in", 2)
    missing = tmp_path / "in" / "gone.png"
    out = tmp_path / "captions.jsonl"
    done = caption(server, *map(str, good), str(missing), "--out", str(out))
    assert done.returncode == 1
    assert f"skipped {missing}" in done.stderr
    assert sorted(r["image"] for r in lines(out)) == sorted(map(str, good))


def test_images_the_server_refuses_get_an_error_line_and_are_retried_later(server, tmp_path):
    good = images(tmp_path / "in", 1)
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"not really a png")
    out = tmp_path / "captions.jsonl"
    done = caption(server, str(tmp_path / "in"), "--out", str(out))
    assert done.returncode == 1
    errors = [r for r in lines(out) if "error" in r]
    assert [r["image"] for r in errors] == [str(broken)]
    assert errors[0]["error"]["field"] == "image.data"
    assert captioned(out) == {str(good[0])}


def ask(server, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "imago.client.cli", "--target", server.target, "ask"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


def test_every_question_is_asked_about_every_image_and_resumed(server, tmp_path):
    paths = images(tmp_path / "in", 3)
    questions = tmp_path / "questions.txt"
    questions.write_text("what colour is it?\n\nis there a stripe?\n")
    out = tmp_path / "answers.jsonl"
    done = ask(server, str(tmp_path / "in"), "--questions", str(questions), "--out", str(out))
    assert done.returncode == 0, done.stderr
    pairs = {(r["image"], r["question"]) for r in lines(out) if r["answers"]}
    expected = {(str(p), q) for p in paths for q in ("what colour is it?", "is there a stripe?")}
    assert pairs == expected
    again = ask(server, str(tmp_path / "in"), "--questions", str(questions), "--out", str(out))
    assert "answered 0" in again.stderr and len(lines(out)) == 6


def test_ask_needs_an_image_and_a_question_or_a_questions_file(server, tmp_path):
    assert ask(server, "a.png", "b.png", "why?").returncode == 2
    lone = ask(server, "a.png", "--questions", str(tmp_path / "q.txt"))
    assert lone.returncode == 2 and "go together" in lone.stderr
