"""Fine-tuning BLIP-2 (``imago finetune caption``): what learns, what stays
frozen, the labels, and the adapter served by a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import start_server
from PIL import Image
from safetensors import safe_open

from imago.client.api import ImagoClient
from imago.workers.training import caption as fc
from imago.workers.training.common import Example, TrainSettings, load_examples, pick_device

CAPTION = "a red square"
QUESTION = "what colour is the square?"
ANSWER = "red"
# Enough for the tiny model to say the caption exactly, in about 10 s on 2 CPU cores.
STEPS = 40
LEARNING_RATE = 2e-2


def write_images(directory: Path, count: int = 6, seed: int = 0) -> list[str]:
    """``count`` noisy images with a red square somewhere, as PNG files."""
    rng = np.random.default_rng(seed)
    names = []
    for index in range(count):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        x, y = rng.integers(0, 16, 2)
        pixels[y : y + 16, x : x + 16] = (220, 20, 20)
        names.append(f"square{index}.png")
        Image.fromarray(pixels).save(directory / names[-1])
    return names


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory) -> Path:
    """Six images, each with the sidecar caption CAPTION."""
    directory = tmp_path_factory.mktemp("caption-data")
    for name in write_images(directory):
        (directory / name).with_suffix(".txt").write_text(CAPTION)
    return directory


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory) -> Path:
    """The images, each asked QUESTION with the answer ANSWER, in metadata.jsonl."""
    directory = tmp_path_factory.mktemp("vqa-data")
    lines = [
        json.dumps({"file_name": name, "text": ANSWER, "question": QUESTION})
        for name in write_images(directory)
    ]
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def settings(data: Path, out: Path, model_cache: Path, **changes) -> TrainSettings:
    values = dict(
        data=data, out=out, base="tiny:blip2", steps=STEPS, batch_size=2,
        learning_rate=LEARNING_RATE, cache_dir=model_cache,
    )  # fmt: skip
    return TrainSettings(**{**values, **changes})


@pytest.fixture(scope="module")
def adapters(caption_data, vqa_data, model_cache, tmp_path_factory):
    """An adapter directory with "square" (captions), "colour" (VQA) and
    "queries" (Q-Former only), and the losses each run reported."""
    directory = tmp_path_factory.mktemp("trained")
    runs = {
        "square": (caption_data, "both", {}),
        "colour": (vqa_data, "both", {}),
        "queries": (caption_data, "qformer", {"steps": 20}),
    }
    losses: dict[str, list[float]] = {}
    for name, (data, parts, changes) in runs.items():
        losses[name] = []
        written = fc.train(
            settings(data, directory / name, model_cache, **changes),
            parts=parts,
            on_step=lambda step, loss, name=name: losses[name].append(loss),
        )
        assert written == directory / name
    return directory, losses


@pytest.fixture(scope="module")
def trained_server(adapters, model_cache, tmp_path_factory):
    directory, _ = adapters
    logs = tmp_path_factory.mktemp("finetune-logs")
    running = start_server(
        model_cache, logs, "--workers", "1", "--caption-adapter-dir", str(directory)
    )
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def client(trained_server):
    with ImagoClient(trained_server.target, timeout=120) as imago:
        yield imago


def tensor_names(folder: Path) -> list[str]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as weights:
        return list(weights.keys())


@pytest.mark.parametrize("name", ["square", "colour", "queries"])
def test_the_loss_falls(adapters, name):
    _, losses = adapters
    first, last = losses[name][0], np.mean(losses[name][-5:])
    assert last < 0.85 * first, (first, last)
    if name != "queries":  # the Q-Former alone moves the tiny model less
        assert last < 0.5 * np.mean(losses[name][:5]), losses[name]


def test_the_adapter_holds_what_each_part_trains(adapters):
    directory, _ = adapters
    both, queries = tensor_names(directory / "square"), tensor_names(directory / "queries")
    # peft saves the trained copies of modules_to_save under the modules' own names.
    parts = {n.split(".")[2] for n in both if "lora_" not in n}
    assert any("lora_A" in n for n in both) and parts == {"qformer", "language_projection"}
    assert not any("lora_" in n for n in queries)
    assert {n.split(".")[2] for n in queries} == {"qformer", "language_projection"}
    # The LoRA adapts the language model's attention and nothing else.
    assert all(n.split(".")[2] == "language_model" for n in both if "lora_" in n)
    assert not any("vision_model" in n for n in both + queries)


def test_lora_alone_trains_only_the_language_model(caption_data, model_cache, tmp_path):
    out = fc.train(settings(caption_data, tmp_path / "lm", model_cache, steps=2), parts="lora")
    names = tensor_names(out)
    assert names and all("lora_" in n and ".language_model." in n for n in names)


def test_frozen_weights_stay_bit_identical(caption_data, model_cache, tmp_path):
    processor, model = fc.load_base("tiny:blip2", model_cache)
    peft_model = fc.trainable_model(model, "both", rank=4)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    frozen = before.keys() - trained
    assert any(".vision_model." in n for n in frozen)
    assert any(".language_model." in n and "base_layer" in n for n in frozen)
    assert not any(".vision_model." in n or "base_layer" in n for n in trained)
    train_settings = settings(caption_data, tmp_path / "out", model_cache, steps=3)
    examples = load_examples(caption_data)
    fc.fit(peft_model, processor, examples, train_settings, pick_device("cpu"), None)
    after = dict(peft_model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trained if "lora_A" in n)
    assert any(not torch.equal(before[n], after[n]) for n in trained if "qformer" in n)


def test_labels_are_ignored_on_padding_images_and_prompt():
    input_ids = torch.tensor([[9, 9, 5, 6, 7, 8, 1, 1], [9, 9, 5, 6, 7, 8, 4, 3]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    labels = fc.build_labels(input_ids, attention_mask, [3, 5], image_token_id=9)
    assert labels.tolist() == [
        [-100, -100, -100, 6, 7, 8, -100, -100],
        [-100, -100, -100, -100, -100, 8, 4, 3],
    ]


def test_encoded_examples_label_the_answer_and_the_end_token(vqa_data, caption_data, model_cache):
    processor, model = fc.load_base("tiny:blip2", model_cache)
    question, caption = load_examples(vqa_data)[0], load_examples(caption_data)[0]
    batch = fc.encode([question, caption], processor, model)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tokenizer = processor.tokenizer
    eos = model.generation_config.eos_token_id
    image = model.config.image_token_index
    queries = model.config.num_query_tokens
    prompt = len(tokenizer(f"Question: {QUESTION} Answer:").input_ids)
    for row, start in enumerate([queries + prompt, queries + 1]):  # 1: the caption's BOS
        assert (ids[row, :queries] == image).all()
        length = int(mask[row].sum())
        expected = torch.full_like(ids[row], -100)
        expected[start:length] = ids[row, start:length]
        assert torch.equal(labels[row], expected)
        assert ids[row, length - 1] == eos
        target = tokenizer.decode(ids[row, start : length - 1])
        assert target == (f" {ANSWER}" if row == 0 else CAPTION)
    assert mask[0].sum() != mask[1].sum(), "one row must be padded"


def test_a_trained_caption_adapter_says_the_caption(client, caption_data):
    for image in sorted(caption_data.glob("*.png")):
        data = image.read_bytes()
        assert client.caption(data, adapter="square").captions[0].text == CAPTION
        assert client.caption(data).captions[0].text != CAPTION


def test_a_trained_vqa_adapter_gives_the_answer(client, vqa_data):
    for image in sorted(vqa_data.glob("*.png")):
        data = image.read_bytes()
        assert client.ask(data, QUESTION, adapter="colour").answers[0].text == ANSWER
        assert client.ask(data, QUESTION).answers[0].text != ANSWER


def test_a_qformer_adapter_changes_the_caption(client, caption_data):
    data = sorted(caption_data.glob("*.png"))[0].read_bytes()
    assert client.caption(data, adapter="queries").captions[0] != client.caption(data).captions[0]


def test_checkpoints_are_written_beside_the_adapter(caption_data, model_cache, tmp_path):
    out = tmp_path / "ckpt"
    fc.train(settings(caption_data, out, model_cache, steps=4, checkpoint_every=2), parts="lora")
    assert sorted(p.name for p in (tmp_path / "ckpt.checkpoints").iterdir()) == [
        "step-2",
        "step-4",
    ]
    for folder in (out, tmp_path / "ckpt.checkpoints" / "step-2"):
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()
    # Nothing half-written is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.checkpoints"]


@pytest.mark.parametrize(
    "out, change, message",
    [
        ("x", {"mixed_precision": "fp16", "device": "cpu"}, "CUDA"),
        ("adapter.safetensors", {}, "folder"),
    ],
)
def test_bad_settings_are_value_errors(caption_data, model_cache, tmp_path, out, change, message):
    train_settings = settings(caption_data, tmp_path / out, model_cache, **change)
    with pytest.raises(ValueError, match=message):
        fc.train(train_settings)


def test_an_unreadable_image_is_named(caption_data, model_cache, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"not a png")
    (data / "broken.txt").write_text(CAPTION)
    with pytest.raises(ValueError, match="broken.png"):
        fc.train(settings(data, tmp_path / "x", model_cache, steps=1))


def test_parts_must_be_known():
    example = Example(Path("x.png"), "a caption")
    assert fc.prompt_and_target(example) == ("", "a caption")
    with pytest.raises(ValueError, match="parts"):
        fc.train(TrainSettings(data=Path("."), out=Path("x"), base="tiny:blip2"), parts="all")


def test_the_command_line_trains_an_adapter(caption_data, model_cache, tmp_path):
    out = tmp_path / "cli-adapter"
    command = [
        sys.executable, "-m", "imago.client.cli", "finetune", "caption",
        "--data", str(caption_data), "--out", str(out), "--steps", "3",
        "--cache-dir", str(model_cache), "--train", "lora",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()


def test_adapter_files_are_readable_by_every_user_as_the_umask_allows(adapters):
    directory, _ = adapters
    files = [path for path in (directory / "square").rglob("*") if path.is_file()]
    assert files
    # Under the usual umask 022: a server running as another user reads them.
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(path.stat().st_mode & 0o777) for path in files} == {oct(0o666 & ~umask)}
    assert (directory / "square").stat().st_mode & 0o777 == 0o777 & ~umask
