"""Unit tests of the client library and command line that need no server."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from imago.client import (
    DiffusionOptions,
    ImagoClient,
    OutputOptions,
    PreviewOptions,
    image_bytes,
)
from imago.client.api import generate_request, generation_settings, image_format
from imago.client.cli import build_parser, generation_options, main, text_options
from imago.client.cli.generating import output_format, output_paths, preview_name
from imago.client.cli.serve import serve_config
from imago.client.messages import text_settings
from imago.v1 import common_pb2, imagegen_pb2

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------- generation options


def test_generation_options_map_to_settings_fields():
    args = parse(
        "caption",
        "a.png",
        "--max-new-tokens", "20",
        "--min-new-tokens", "2",
        "--num-beams", "3",
        "--sample",
        "--temperature", "0.7",
        "--top-p", "0.9",
        "--top-k", "50",
        "--repetition-penalty", "1.2",
        "--num-return-sequences", "2",
        "--length-penalty", "-0.5",
        "--seed", "42",
    )  # fmt: skip
    assert generation_options(args) == {
        "max_new_tokens": 20,
        "min_new_tokens": 2,
        "num_beams": 3,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 50,
        "repetition_penalty": 1.2,
        "num_return_sequences": 2,
        "length_penalty": -0.5,
        "seed": 42,
    }
    settings = text_settings(text_options(args))
    assert settings.num_beams == 3 and settings.do_sample and settings.seed == 42


def test_unset_generation_options_stay_unset():
    args = parse("ask", "a.png", "what is it?")
    assert generation_options(args) == {}
    settings = text_settings(text_options(args))
    assert settings == common_pb2.GenerationSettings()
    assert not settings.HasField("do_sample")


def test_no_sample_sets_do_sample_false():
    args = parse("ask", "a.png", "what?", "--no-sample", "--top-k", "0")
    assert generation_options(args) == {"do_sample": False, "top_k": 0}
    settings = text_settings(text_options(args))
    assert settings.HasField("do_sample") and settings.HasField("top_k")


def test_ask_and_caption_positionals():
    args = parse("ask", "cat.jpg", "what colour is the cat?", "--json")
    assert (args.inputs, args.json) == (["cat.jpg", "what colour is the cat?"], True)
    args = parse("caption", "a.png", "b.jpg", "--prefix", "a photo of")
    assert (args.images, args.prefix, args.json) == (["a.png", "b.jpg"], "a photo of", False)


@pytest.mark.parametrize("bad", [["--num-beams", "-1"], ["--seed", "x"], ["--top-p", "high"]])
def test_bad_option_values_are_usage_errors(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        parse("caption", "a.png", *bad)
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_generation_keywords_merge_over_settings_message():
    base = common_pb2.GenerationSettings(num_beams=4, max_new_tokens=10)
    merged = generation_settings(base, max_new_tokens=30, seed=None)
    assert (merged.num_beams, merged.max_new_tokens) == (4, 30)
    assert not merged.HasField("seed")
    assert base.max_new_tokens == 10  # not modified


def test_unknown_generation_keyword_raises_type_error():
    with pytest.raises(TypeError, match="num_beam\\b"):
        generation_settings(num_beam=3)
    with ImagoClient(f"127.0.0.1:{closed_port()}") as client:
        with pytest.raises(TypeError, match="max_tokens"):
            client.caption(b"not sent", max_tokens=5)
        with pytest.raises(TypeError, match="temp"):
            client.ask(b"not sent", "why?", temp=0.5)


# ------------------------------------------------------------------- generate


def test_generate_arguments_and_previews_default():
    args = parse("generate", "a fox", "-o", "fox.png")
    assert (args.prompt, args.output, args.num_images, args.previews) == (
        "a fox",
        Path("fox.png"),
        1,
        None,
    )
    assert args.guidance is None and args.seed is None and args.preview_every is None
    args = parse(
        "generate", "a fox", "-o", "o.webp", "--negative", "blur", "--width", "64",
        "--height", "48", "--steps", "5", "--guidance", "3.5", "--seed", "7",
        "--num-images", "3", "--format", "jpeg", "--previews", "prev",
    )  # fmt: skip
    assert (args.width, args.height, args.steps, args.guidance, args.seed) == (64, 48, 5, 3.5, 7)
    assert (args.negative, args.num_images, args.format) == ("blur", 3, "jpeg")
    assert args.previews == Path("prev") and args.preview_every is None


def test_output_needs_o():
    with pytest.raises(SystemExit):
        parse("generate", "a fox")


def test_output_paths_for_one_and_several_images():
    assert output_paths(Path("out.png"), 1) == [Path("out.png")]
    assert output_paths(Path("dir/out.png"), 3) == [
        Path("dir/out-0.png"),
        Path("dir/out-1.png"),
        Path("dir/out-2.png"),
    ]
    assert output_paths(Path("my.image.jpg"), 2, "jpeg") == [
        Path("my.image-0.jpg"),
        Path("my.image-1.jpg"),
    ]
    assert output_paths(Path("out"), 1, "webp") == [Path("out.webp")]
    assert output_paths(Path("out"), 2, "jpeg") == [Path("out-0.jpg"), Path("out-1.jpg")]


def test_output_format_from_suffix_or_option():
    assert output_format(Path("a.png")) == "png"
    assert output_format(Path("a.JPG")) == "jpeg"
    assert output_format(Path("a.jpeg")) == "jpeg"
    assert output_format(Path("a.webp")) == "webp"
    assert output_format(Path("a")) == "png"
    assert output_format(Path("a.png"), "webp") == "webp"


def test_preview_names():
    assert preview_name(5, 0, 1, "image/jpeg") == "step-0005.jpg"
    assert preview_name(12, 1, 2, "image/png") == "step-0012-1.png"
    assert preview_name(3, 0, 1) == "step-0003.jpg"


def test_generate_request_fields():
    request = generate_request(
        "a fox",
        diffusion=DiffusionOptions(width=64, height=32, steps=4, seed=9, num_images=2),
        output=OutputOptions(format="webp"),
        previews=PreviewOptions(every_n_steps=2),
    )
    assert request.WhichOneof("task") == "text_to_image"
    assert (request.width, request.height, request.steps, request.num_images) == (64, 32, 4, 2)
    assert request.seed == 9 and not request.HasField("guidance_scale")
    assert request.output_format == common_pb2.IMAGE_FORMAT_WEBP
    assert request.previews.every_n_steps == 2
    assert request.previews.format == common_pb2.IMAGE_FORMAT_JPEG
    assert generate_request("x", diffusion=DiffusionOptions(guidance_scale=0.0)).HasField(
        "guidance_scale"
    )
    assert generate_request("x", diffusion=DiffusionOptions(scheduler="euler")).scheduler == "euler"
    assert parse("generate", "x", "-o", "o.png", "--scheduler", "lms").scheduler == "lms"
    shown = generate_request(
        "x", previews=PreviewOptions(every_n_steps=1, method="taesd", all_images=True)
    )
    assert shown.previews.method == imagegen_pb2.PREVIEW_METHOD_TAESD and shown.previews.all_images
    with pytest.raises(ValueError, match="latent_rgb, taesd or full"):
        generate_request("x", previews=PreviewOptions(method="vae"))
    args = parse("generate", "x", "-o", "o.png", "--lora", "ink", "--lora", "chalk:0.5")
    assert args.lora == [("ink", 1.0), ("chalk", 0.5)]
    request = generate_request("x", diffusion=DiffusionOptions(loras=dict(args.lora)))
    assert [(lora.name, lora.weight) for lora in request.loras] == [("ink", 1.0), ("chalk", 0.5)]
    quality = generate_request("x", output=OutputOptions(quality=40, embed_parameters=False))
    assert (quality.output_quality, quality.omit_parameters) == (40, True)
    args = parse("generate", "x", "-o", "o.jpg", "--quality", "40", "--no-parameters")
    assert (args.quality, args.omit_parameters) == (40, True)
    assert image_format("JPG") == common_pb2.IMAGE_FORMAT_JPEG
    with pytest.raises(ValueError, match="gif"):
        image_format("gif")


def test_preview_every_needs_previews(capsys, tmp_path):
    code = main(["generate", "x", "-o", str(tmp_path / "o.png"), "--preview-every", "2"])
    assert code == 2
    assert "--previews" in capsys.readouterr().err


# ------------------------------------------------------------------ images


def test_image_bytes_from_bytes_path_and_pil(tmp_path):
    image = Image.new("RGB", (8, 6), (200, 10, 10))
    data = image_bytes(image)
    assert data.startswith(PNG_SIGNATURE)
    assert Image.open(io.BytesIO(data)).size == (8, 6)
    assert image_bytes(data) == data
    assert image_bytes(bytearray(data)) == data
    path = tmp_path / "red.png"
    path.write_bytes(data)
    assert image_bytes(path) == data
    assert image_bytes(str(path)) == data


def test_image_bytes_converts_modes_png_cannot_hold():
    data = image_bytes(Image.new("CMYK", (4, 4)))
    assert Image.open(io.BytesIO(data)).mode == "RGB"


def test_image_bytes_rejects_missing_files_and_other_types(tmp_path):
    with pytest.raises(OSError):
        image_bytes(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="int"):
        image_bytes(42)


# ----------------------------------------------------------- target, serve, errors


def test_target_default_from_environment(monkeypatch):
    monkeypatch.delenv("IMAGO_TARGET", raising=False)
    assert parse("health").target == "localhost:50051"
    monkeypatch.setenv("IMAGO_TARGET", "models.internal:6000")
    assert parse("health").target == "models.internal:6000"
    assert parse("--target", "h:1", "health").target == "h:1"
    assert parse("health", "imago.v1.CaptionService").service == "imago.v1.CaptionService"


def test_serve_arguments_build_serve_config(tmp_path):
    from imago.server.config import Limits, MiB, ServeConfig

    config = serve_config(parse("serve"))
    assert config == ServeConfig()
    config = serve_config(
        parse(
            "serve",
            "--preset",
            "default",
            "--host",
            "127.0.0.1",
            "--port",
            "6000",
            "--workers",
            "3",
            "--cpu",
            "--max-message-mb",
            "16",
            "--cache-dir",
            str(tmp_path),
        )  # fmt: skip
    )
    assert config == ServeConfig(
        preset="default",
        host="127.0.0.1",
        port=6000,
        workers=3,
        cpu_only=True,
        cache_dir=tmp_path,
        limits=Limits(max_message_bytes=16 * MiB),
    )


def test_serve_batching_and_queue_options_reach_the_config():
    from imago.server.config import Limits, ServeConfig

    args = parse(
        "serve", "--max-batch-size", "8", "--max-batch-size", "sd-tiny=2",
        "--max-batch-delay-ms", "blip2-tiny=5", "--max-queue", "10",
    )  # fmt: skip
    config = serve_config(args)
    assert config == ServeConfig(
        max_batch_sizes=("8", "sd-tiny=2"),
        max_batch_delays_ms=("blip2-tiny=5",),
        limits=Limits(max_queue_size=10),
    )
    policies = {spec.name: spec.batch_policy for spec in config.resolve().models}
    assert policies["blip2-tiny"].max_batch_size == 8
    assert policies["blip2-tiny"].max_batch_delay_ms == 5
    assert policies["sd-tiny"].max_batch_size == 2


def test_serve_bad_batch_limit_is_a_usage_error(capsys):
    assert main(["serve", "--max-batch-size", "nope=3"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_serve_unknown_preset_is_a_usage_error(capsys):
    assert main(["serve", "--preset", "no-such-preset"]) == 2
    assert "no-such-preset" in capsys.readouterr().err


def test_unreadable_input_exits_2_without_contacting_a_server(tmp_path, capsys):
    missing = tmp_path / "missing.png"
    target = f"127.0.0.1:{closed_port()}"
    assert main(["--target", target, "caption", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read") and str(missing) in err
    assert main(["--target", target, "ask", str(tmp_path), "what?"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_an_output_suffix_no_image_format_uses_is_refused_before_connecting(tmp_path, capsys):
    output = tmp_path / "fox.gif"
    target = f"127.0.0.1:{closed_port()}"
    assert main(["--target", target, "generate", "a fox", "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: -o {output}: images are written as png, jpeg or webp")
    assert not output.exists()


def test_unreachable_server_is_reported_clearly(tmp_path, capsys):
    target = f"127.0.0.1:{closed_port()}"
    assert main(["--target", target, "--timeout", "10", "health"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: cannot reach an imago server at " + target)
    assert "Traceback" not in err


def test_help_works_from_any_directory(tmp_path):
    for argv in (["--help"], ["generate", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "imago.client.cli", *argv],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "usage: imago" in done.stdout


def test_client_modules_stay_free_of_torch_and_server():
    code = (
        "import sys, imago.client, imago.client.cli; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('imago.server')]; "
        "sys.exit(bool(bad))"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_a_connection_age_becomes_the_serve_config_setting():
    config = serve_config(parse("serve", "--max-connection-age-s", "300"))
    assert config.max_connection_age_s == 300.0
    assert serve_config(parse("serve")).max_connection_age_s is None


@pytest.mark.parametrize("option", ["--max-connection-age-s", "--load-timeout-s"])
@pytest.mark.parametrize("bad", ["0", "-5", "inf", "nan", "soon"])
def test_a_bad_number_of_seconds_is_a_usage_error_naming_the_option(option, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        parse("serve", option, bad)
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def test_a_load_timeout_becomes_the_serve_config_setting():
    assert serve_config(parse("serve", "--load-timeout-s", "1800")).load_timeout_s == 1800.0
    assert serve_config(parse("serve")).load_timeout_s == 600.0
