"""``imago finetune imagegen``: LoRA training for Stable Diffusion, checked on
the tiny model, through a real server and through the command line."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import start_server
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open

from imago.client import DiffusionOptions
from imago.client.api import ImagoClient
from imago.workers.checkpoints import tiny
from imago.workers.training.common import Example, TrainSettings, load_examples
from imago.workers.training.imagegen import (
    Components,
    adapter_path,
    evaluation_loss,
    load_components,
    prepare,
    train,
)

TINY = "tiny:stable-diffusion"
RED = np.array([255.0, 0.0, 0.0])


def write_dataset(directory: Path, images: list[tuple[str, Image.Image, str]]) -> Path:
    """Save ``(name, image, caption)`` as PNGs in ``directory``: the first
    half captioned through metadata.jsonl, the rest through sidecar .txt files."""
    directory.mkdir(parents=True)
    half = len(images) // 2
    lines = []
    for i, (name, image, caption) in enumerate(images):
        image.save(directory / f"{name}.png")
        if i < half:
            lines.append(json.dumps({"file_name": f"{name}.png", "text": caption}))
        else:
            (directory / f"{name}.txt").write_text(caption + "\n")
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def patterns() -> list[tuple[str, Image.Image, str]]:
    """Eight 64x64 solid colours and stripes, each with its caption."""
    y, x = np.mgrid[0:64, 0:64]
    items = []
    for name, colour in [("red", (230, 20, 20)), ("green", (20, 200, 40)), ("blue", (30, 40, 220))]:
        items.append((name, Image.new("RGB", (64, 64), colour), f"a {name} square"))
    for name, mask in [("rows", (y // 8) % 2 == 0), ("columns", (x // 8) % 2 == 0)]:
        stripes = np.where(mask[..., None], [250, 250, 250], [10, 10, 10]).astype(np.uint8)
        items.append((name, Image.fromarray(stripes), f"black and white {name} of stripes"))
    checks = (((x // 16) + (y // 16)) % 2 == 0)[..., None]
    checker = np.where(checks, [255, 0, 0], [0, 0, 255]).astype(np.uint8)
    items.append(("checker", Image.fromarray(checker), "a red and blue checkerboard"))
    ramp = np.stack([x * 4, y * 4, 255 - x * 4], -1).astype(np.uint8)
    items.append(("ramp", Image.fromarray(ramp), "a colour gradient"))
    items.append(("yellow", Image.new("RGB", (64, 64), (240, 220, 30)), "a yellow square"))
    return items


def settings(data: Path, out: Path, base: str, model_cache: Path, **options) -> TrainSettings:
    return TrainSettings(
        data=data, out=out, base=base, resolution=64, cache_dir=model_cache, **options
    )


# --- loss and frozen weights, on the tiny model ------------------------------------------


@dataclass
class Trained:
    examples: list[Example]
    parts: Components
    before_loss: float
    after_loss: float
    frozen_before: dict[str, dict[str, torch.Tensor]]
    trainable: list[str]
    written: Path


EVAL_SEED = 123


@pytest.fixture(scope="module")
def trained(model_cache, tmp_path_factory) -> Trained:
    """The tiny model before and after 200 steps on the pattern dataset."""
    root = tmp_path_factory.mktemp("finetune-patterns")
    data = write_dataset(root / "data", patterns())
    examples = load_examples(data)
    parts = load_components(TINY, model_cache)
    before = evaluation_loss(parts, examples, 64, seed=EVAL_SEED)
    frozen = {
        name: {key: value.clone() for key, value in getattr(parts, name).state_dict().items()}
        for name in ("unet", "vae", "text_encoder")
    }
    options = settings(data, root / "patterns", TINY, model_cache, steps=200, learning_rate=1e-2)
    written = train(options, components=parts)
    trainable = [name for name, p in parts.unet.named_parameters() if p.requires_grad]
    after = evaluation_loss(parts, examples, 64, seed=EVAL_SEED)
    return Trained(examples, parts, before, after, frozen, trainable, written)


def test_training_lowers_the_evaluation_loss(trained, model_cache):
    # The tiny UNet's random weights predict noise worse than zero does (loss > 1),
    # and its random VAE's latents are mostly posterior noise: a rank-4 LoRA on the
    # attention can only take back part of the error (about 9% here).
    print(f"evaluation loss {trained.before_loss:.4f} -> {trained.after_loss:.4f}")
    assert trained.after_loss < 0.95 * trained.before_loss
    # The file holds what was trained: the server's way of loading it gives
    # the same loss on the same draws.
    pipe = StableDiffusionPipeline.from_pretrained(tiny.ensure("stable-diffusion", model_cache))
    path = trained.written
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="patterns")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    served = Components(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, scheduler)
    loss = evaluation_loss(served, trained.examples, 64, seed=EVAL_SEED)
    assert loss == pytest.approx(trained.after_loss, rel=1e-5)


def test_the_frozen_weights_are_untouched_and_only_the_lora_learns(trained):
    assert trained.trainable and all(".lora_" in name for name in trained.trainable)
    assert not any(p.requires_grad for p in trained.parts.vae.parameters())
    assert not any(p.requires_grad for p in trained.parts.text_encoder.parameters())
    for name, before in trained.frozen_before.items():
        after = getattr(trained.parts, name).state_dict()
        # peft moves a wrapped layer's own weights under ".base_layer".
        after = {k.replace(".base_layer", ""): v for k, v in after.items() if ".lora_" not in k}
        assert after.keys() == before.keys(), name
        changed = [key for key in before if not torch.equal(before[key], after[key])]
        assert changed == [], f"{name}: {changed[:5]}"
    ups = [p for n, p in trained.parts.unet.named_parameters() if ".lora_B." in n]
    assert any(p.abs().max() > 0 for p in ups), "the LoRA never moved off its zero start"


# --- a colour the server then paints ------------------------------------------------------


def colour_vae() -> AutoencoderKL:
    """A tiny AutoencoderKL that keeps colours, which the tiny model's random one
    does not: its GroupNorms wipe out any spatially constant signal, and its
    posterior's std (~1) drowns what is left, so every image encodes and decodes
    alike. Here every residual branch is zero (resnets and attention pass their
    input through) and resamplers copy the centre pixel; the encoder spreads
    RGB in [-1, 1] over 8 channels as (r, g, b, -r, -g, -b, 1, -1), so the
    one-group GroupNorm before conv_out keeps the colour (up to scale) and
    silu(x) - silu(-x) = x recovers it linearly; the log-variance is -20, so a
    latent sample is its mean. The decoder mirrors this: red encodes as
    (1, -1, -1, 1) and decodes back to pure red."""
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8,) * 4,
        latent_channels=4,
        norm_num_groups=1,
        sample_size=64,
        scaling_factor=1.0,
    )
    spread = torch.zeros(8, 4)
    spread[:3, :3], spread[3:6, :3] = torch.eye(3), -torch.eye(3)
    spread[6, 3], spread[7, 3] = 1.0, -1.0
    pairs = spread.T.clone()  # (a, -a) channel pairs back to a

    def centre(conv: torch.nn.Conv2d, matrix: torch.Tensor) -> None:
        conv.weight[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = matrix

    with torch.no_grad():
        for name, param in vae.named_parameters():
            if "norm" not in name:
                param.zero_()
        for block in (*vae.encoder.down_blocks, *vae.decoder.up_blocks):
            samplers = getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None)
            for sampler in samplers or []:
                centre(sampler.conv, torch.eye(8))
        centre(vae.encoder.conv_in, spread[:, :3])
        vae.encoder.conv_in.bias[6:] = torch.tensor([1.0, -1.0])
        centre(vae.encoder.conv_out, torch.cat([pairs, torch.zeros(4, 8)]))
        vae.encoder.conv_out.bias[4:] = -20.0
        centre(vae.quant_conv, torch.eye(8))
        centre(vae.post_quant_conv, torch.eye(4))
        centre(vae.decoder.conv_in, spread)
        centre(vae.decoder.conv_out, pairs[:3])
    return vae


def colour_checkpoint(model_cache: Path, target: Path) -> Path:
    """The tiny checkpoint with :func:`colour_vae` and v-prediction. With
    epsilon prediction a random UNet's error is multiplied by up to
    1/sqrt(alpha_bar) (about 14) in the denoised estimate of the first steps,
    which then decide the colour; with v-prediction it is not."""
    shutil.copytree(tiny.ensure("stable-diffusion", model_cache), target)
    shutil.rmtree(target / "vae")
    colour_vae().save_pretrained(target / "vae", safe_serialization=True)
    config_path = target / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}, indent=2))
    return target


def test_the_colour_checkpoint_keeps_colours():
    vae = colour_vae()
    for colour in [(255, 0, 0), (0, 0, 255), (128, 128, 128), (240, 220, 30)]:
        pixels = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
        with torch.no_grad():
            latents = vae.encode(pixels.expand(1, 3, 64, 64)).latent_dist.sample()
            image = (vae.decode(latents).sample.clamp(-1, 1) + 1) * 127.5
        assert np.abs(image.mean((0, 2, 3)).numpy() - colour).max() < 25, colour


@pytest.fixture(scope="module")
def red_adapter(model_cache, tmp_path_factory) -> tuple[Path, Path]:
    """(base checkpoint, adapter) : a LoRA taught that "a red square" is pure red."""
    root = tmp_path_factory.mktemp("finetune-red")
    base = colour_checkpoint(model_cache, root / "colour-sd")
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    data = write_dataset(root / "data", [(f"red{i}", red, "a red square") for i in range(8)])
    options = dict(steps=200, learning_rate=1e-2, seed=0)
    written = train(settings(data, root / "loras" / "red", str(base), model_cache, **options))
    return base, written


def test_the_adapter_is_in_diffusers_lora_format(red_adapter):
    _, path = red_adapter
    assert path.name == "red.safetensors"
    with safe_open(str(path), "pt") as weights:
        keys = list(weights.keys())
    assert keys and all(key.startswith("unet.") for key in keys)
    assert all(key.endswith((".lora.down.weight", ".lora.up.weight")) for key in keys)
    targets = {key.split(".lora.")[0].rsplit(".", 1)[-1] for key in keys}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0


def redness(client: ImagoClient, seed: int, loras: dict[str, float]) -> float:
    """The distance of the mean colour of "a red square" (seed ``seed``, 20 steps)
    from pure red, in RGB units (0..441)."""
    result = client.generate_result(
        "a red square", diffusion=DiffusionOptions(steps=20, seed=seed, loras=loras)
    )
    image = Image.open(io.BytesIO(result.images[0].image.data)).convert("RGB")
    mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)
    return float(np.linalg.norm(mean - RED))


def test_a_served_adapter_paints_its_training_colour(red_adapter, model_cache, tmp_path):
    base, path = red_adapter
    server = start_server(
        model_cache, tmp_path, "--workers", "1",
        "--model", f"stable-diffusion={base}", "--lora-dir", str(path.parent),
    )  # fmt: skip
    try:
        with ImagoClient(server.target, timeout=120) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.generate_result(
                    "a red square", diffusion=DiffusionOptions(steps=2, loras={"blue": 1.0})
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert "red" in caught.value.details()  # the loaded names are listed
            seeds = (0, 1, 2)
            distances = [(redness(client, s, {}), redness(client, s, {"red": 1.0})) for s in seeds]
    finally:
        assert server.stop() == 0, server.log()
    print("mean colour distance to red (plain, adapter):", distances)
    for plain, adapted in distances:
        assert adapted < plain - 15, distances


# --- data preparation ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_parts(model_cache) -> Components:
    return load_components(TINY, model_cache)


def test_images_are_cropped_to_their_centre_square_and_resized(tmp_path, tiny_parts):
    wide = np.zeros((64, 192, 3), np.uint8)
    wide[:, :64], wide[:, 64:128], wide[:, 128:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(wide).convert("RGBA").save(tmp_path / "wide.png")
    pixels, ids = prepare([Example(tmp_path / "wide.png", "a green square")], tiny_parts, 32)
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == torch.uint8
    assert pixels[0, :, 4:-4, 4:-4].float().mean((1, 2)).tolist() == [0.0, 255.0, 0.0]
    assert ids.shape == (1, tiny_parts.tokenizer.model_max_length)


def test_an_unreadable_image_is_a_value_error_naming_it(tmp_path, tiny_parts):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        prepare([Example(tmp_path / "broken.png", "x")], tiny_parts, 64)


def test_the_resolution_must_suit_the_vae(tmp_path, tiny_parts):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="multiple of 8"):
        prepare([Example(tmp_path / "a.png", "x")], tiny_parts, 60)


def test_an_unknown_base_is_a_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="no-such-model"):
        load_components(str(tmp_path / "no-such-model"))


@pytest.mark.parametrize(
    ("out", "written"),
    [("a/ink", "a/ink.safetensors"), ("a/ink.safetensors", "a/ink.safetensors"),
     ("a/v1.2", "a/v1.2.safetensors")],
)  # fmt: skip
def test_the_adapter_file_gets_the_safetensors_suffix(out, written):
    assert adapter_path(Path(out)) == Path(written)


# --- the command line ----------------------------------------------------------------------


def finetune(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "imago.client.cli", "finetune", "imagegen", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_the_command_line_writes_the_adapter_and_its_checkpoints(tmp_path, model_cache):
    data = write_dataset(tmp_path / "data", patterns()[:4])
    out = tmp_path / "adapters" / "stripes"
    done = finetune(
        "--data", str(data), "--out", str(out), "--steps", "4", "--resolution", "64",
        "--checkpoint-every", "2", "--cache-dir", str(model_cache),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    written = tmp_path / "adapters" / "stripes.safetensors"
    assert done.stdout.strip().splitlines()[-1] == str(written)
    assert written.is_file()
    checkpoints = sorted(p.name for p in (tmp_path / "adapters" / "stripes.checkpoints").iterdir())
    assert checkpoints == ["step-0002.safetensors", "step-0004.safetensors"]


def test_the_command_line_names_an_image_without_text_and_exits_2(tmp_path, model_cache):
    data = write_dataset(tmp_path / "data", patterns()[:2])
    Image.new("RGB", (64, 64)).save(data / "uncaptioned.png")
    done = finetune(
        "--data", str(data), "--out", str(tmp_path / "x"), "--steps", "1",
        "--resolution", "64", "--cache-dir", str(model_cache),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "uncaptioned.png" in done.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_the_adapter_file_is_readable_by_every_user_as_the_umask_allows(red_adapter):
    _, path = red_adapter
    # safetensors writes 0600; a server running as another user must read it.
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
