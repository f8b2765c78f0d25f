"""The ``imago`` command line against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import png_bytes
from PIL import Image

IMAGO = str(Path(sys.executable).with_name("imago"))


def imago(server, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [IMAGO, "--target", server.target, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def write_image(path: Path) -> Path:
    path.write_bytes(png_bytes())
    return path


def test_caption_prints_one_line_per_image(server, tmp_path):
    first, second = write_image(tmp_path / "a.png"), write_image(tmp_path / "b.png")
    result = imago(server, "caption", str(first), str(second))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(first), str(second)]
    assert all(line.split("\t")[1].strip() for line in lines)


def test_caption_json_carries_scores_and_model(server, tmp_path):
    image = write_image(tmp_path / "a.png")
    result = imago(server, "caption", str(image), "--num-beams", "2", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.splitlines()[0])
    assert record["model"] == "blip2-tiny"
    assert "score" in record["captions"][0]


def test_ask_prints_an_answer(server, tmp_path):
    image = write_image(tmp_path / "a.png")
    result = imago(server, "ask", str(image), "what is in the picture?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_generate_writes_the_image_and_previews(server, tmp_path):
    out, previews = tmp_path / "fox.png", tmp_path / "previews"
    args = ["generate", "a fox", "-o", str(out), "--steps", "4", "--seed", "9"]
    result = imago(server, *args, "--previews", str(previews))
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (64, 64)
    assert "seed=9" in result.stdout
    assert len(list(previews.iterdir())) == 4


def test_generate_redraws_an_init_image_with_a_scheduler(server, tmp_path):
    init, out = tmp_path / "init.png", tmp_path / "redrawn.png"
    init.write_bytes(png_bytes(size=(96, 72)))
    args = ["generate", "a fox", "-o", str(out), "--init", str(init), "--strength", "0.5"]
    result = imago(server, *args, "--steps", "4", "--scheduler", "dpmpp_2m")
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (96, 72)


def test_generate_inpaints_where_the_mask_is_white(server, tmp_path):
    init, mask, out = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "painted.png"
    init.write_bytes(png_bytes(size=(96, 72)))
    mask.write_bytes(png_bytes(size=(96, 72), color=(255, 255, 255)))
    args = ["generate", "a door", "-o", str(out), "--init", str(init), "--mask", str(mask)]
    result = imago(server, *args, "--steps", "3")
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (96, 72)


def test_generate_writes_previews_by_the_method_asked_for(server, tmp_path):
    out, previews = tmp_path / "fox.png", tmp_path / "previews"
    args = ["generate", "a fox", "-o", str(out), "--steps", "2", "--num-images", "2"]
    more = ["--previews", str(previews), "--preview-method", "full", "--all-previews"]
    result = imago(server, *args, *more)
    assert result.returncode == 0, result.stderr
    assert len(list(previews.iterdir())) == 4  # two steps, two images


def test_a_mask_without_an_image_to_repaint_exits_2(server, tmp_path):
    mask = tmp_path / "mask.png"
    mask.write_bytes(png_bytes())
    result = imago(server, "generate", "a door", "-o", str(tmp_path / "o.png"), "--mask", str(mask))
    assert result.returncode == 2 and "--init" in result.stderr


def test_generate_with_a_missing_init_image_exits_2(server, tmp_path):
    args = ["generate", "a fox", "-o", str(tmp_path / "o.png"), "--init", str(tmp_path / "no")]
    result = imago(server, *args)
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_bad_input_exits_1_with_the_field_named(server):
    result = imago(server, "generate", "a fox", "-o", "/tmp/x.png", "--width", "100")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "width" in result.stderr


def test_health_waits_for_serving(server):
    result = imago(server, "health", "imago.v1.ImageGenService", "--wait", "5")
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING")


def test_connection_options_may_follow_the_command(server, tmp_path):
    image = write_image(tmp_path / "a.png")
    result = subprocess.run(
        [IMAGO, "caption", str(image), "--target", server.target, "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(image))


def test_a_connection_option_after_the_command_wins_over_one_before_it(server):
    unreachable = "127.0.0.1:1"
    result = subprocess.run(
        [IMAGO, "--target", unreachable, "health", "--target", server.target],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout
