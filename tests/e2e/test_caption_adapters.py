"""BLIP-2 adapters: loaded from --caption-adapter-dir, chosen per caption or
question, kept apart in batches, reloaded on SIGHUP."""

from __future__ import annotations

import io
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from conftest import field_violations, png_bytes, start_server
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import DUMMY_TARGET_MODULES
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from imago.client import TextOptions
from imago.client.api import ImagoClient
from imago.client.cli import build_parser
from imago.client.cli.serve import serve_config
from imago.v1 import caption_pb2
from imago.workers.checkpoints import tiny
from imago.workers.contract.adapters import adapter_folders
from imago.workers.contract.jobs import CaptionJob, TextSettings, VqaJob
from imago.workers.contract.presets import preset, with_overrides
from imago.workers.contract.protocol import Failed, TextResult
from imago.workers.families.blip2.runner import Blip2Runner
from imago.workers.runtime.runner import Event, Request

IMAGES = [
    png_bytes(size=(50, 42), color=(30, 90, 200)),
    png_bytes(size=(40, 40), color=(200, 30, 60)),
    png_bytes(size=(64, 32), color=(20, 160, 40)),
]
QUESTION = "what is on the table?"
LM_ATTENTION = r"language_model\..*\.(q_proj|k_proj|v_proj|out_proj)"


def make_adapter(directory: Path, name: str, seed: int, model_cache: Path, kind: str) -> Path:
    """Write a random adapter for the tiny BLIP-2 as ``directory/name/``:
    "lora", a LoRA on the language model's attention (B not zero, so it
    changes outputs), or "qformer", perturbed copies of the Q-Former and
    language projection."""
    model = Blip2ForConditionalGeneration.from_pretrained(tiny.ensure("blip2", model_cache))
    torch.manual_seed(seed)
    if kind == "lora":
        config = LoraConfig(r=4, lora_alpha=4, target_modules=LM_ATTENTION, init_lora_weights=False)
    else:
        modules = ["qformer", "language_projection"]
        config = LoraConfig(target_modules=DUMMY_TARGET_MODULES, modules_to_save=modules)
    peft_model = get_peft_model(model, config)
    if kind != "lora":
        with torch.no_grad():
            for parameter_name, parameter in peft_model.named_parameters():
                if "modules_to_save" in parameter_name:
                    parameter.add_(torch.randn_like(parameter) * 0.5)
    peft_model.save_pretrained(str(directory / name))
    return directory / name


@pytest.fixture(scope="module")
def adapter_dir(model_cache, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("caption-adapters")
    make_adapter(directory, "ink", 1, model_cache, "lora")
    make_adapter(directory, "v1.2_query", 2, model_cache, "qformer")
    # Not adapters: a file, a folder without adapter_config.json, a bad name.
    (directory / "notes.txt").write_text("not an adapter")
    (directory / "ink.checkpoints").mkdir()
    make_adapter(directory, "bad name", 3, model_cache, "lora")
    return directory


@pytest.fixture(scope="module")
def adapter_server(model_cache, adapter_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("caption-adapter-logs")
    running = start_server(
        model_cache, logs, "--workers", "1", "--caption-adapter-dir", str(adapter_dir),
        "--max-batch-delay-ms", "50",
    )  # fmt: skip
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def client(adapter_server):
    with ImagoClient(adapter_server.target, timeout=120) as imago:
        yield imago


@pytest.fixture(scope="module")
def plain_client(server):
    """A client of the shared tiny server, which has no adapters."""
    with ImagoClient(server.target, timeout=120) as imago:
        yield imago


def texts(reply) -> list[tuple[str, float]]:
    items = reply.captions if hasattr(reply, "captions") else reply.answers
    return [(item.text, item.score) for item in items]


class Sink:
    """Collects a runner's results as (text, score) lists by request id."""

    def __init__(self) -> None:
        self.results: dict[str, list[tuple[str, float]]] = {}
        self.failures: dict[str, tuple[str, str]] = {}

    def emit(self, event: Event, frames: Sequence[bytes] = ()) -> None:
        if isinstance(event, TextResult):
            self.results[event.request_id] = [(text.text, text.score) for text in event.texts]
        elif isinstance(event, Failed):
            self.failures[event.request_id] = (event.code, event.field)

    def is_cancelled(self, request_id: str) -> bool:
        return False


def run_batch(
    runner: Blip2Runner, jobs: list, images: list[bytes] | None = None
) -> list[list[tuple[str, float]]]:
    """Run ``jobs`` as one batch, each with its image of ``images`` (default:
    those of IMAGES in turn)."""
    sink = Sink()
    images = images or [IMAGES[i % len(IMAGES)] for i in range(len(jobs))]
    pairs = enumerate(zip(jobs, images, strict=True))
    batch = [Request(f"r{i}", job, [image]) for i, (job, image) in pairs]
    runner.run(batch, sink)
    assert not sink.failures, sink.failures
    return [sink.results[f"r{i}"] for i in range(len(jobs))]


def text_settings(**changes) -> TextSettings:
    values = dict(
        max_new_tokens=10, min_new_tokens=0, num_beams=1, do_sample=False, temperature=1.0,
        top_p=1.0, top_k=50, repetition_penalty=1.0, num_return_sequences=1,
        length_penalty=1.0, seed=0,
    )  # fmt: skip
    return TextSettings(**{**values, **changes})


@pytest.fixture(scope="module")
def runners(model_cache, adapter_dir):
    """A runner without adapters and one with the adapter directory's."""
    source = str(tiny.ensure("blip2", model_cache))
    plain = Blip2Runner.load("blip2", source, "cpu")
    return plain, Blip2Runner.load("blip2", source, "cpu", adapters=str(adapter_dir))


@pytest.mark.parametrize(
    "settings",
    [text_settings(), text_settings(num_beams=3, num_return_sequences=2)],
    ids=["greedy", "beam"],
)
def test_batches_without_an_adapter_are_bit_identical_to_no_adapters_loaded(runners, settings):
    plain, adapted = runners
    jobs = [CaptionJob("", settings), VqaJob(QUESTION, settings), CaptionJob("a cat", settings)]
    expected = run_batch(plain, jobs)
    assert run_batch(adapted, jobs) == expected
    for adapter in ("ink", "v1.2_query"):
        run_batch(adapted, [CaptionJob("", settings, adapter=adapter)])
        assert run_batch(adapted, jobs) == expected


def test_a_batch_with_several_adapters_runs_each_with_its_own(runners):
    _, adapted = runners
    jobs = [CaptionJob("", text_settings(), adapter=a) for a in ("", "ink", "v1.2_query")] * 2
    images = [image for image in IMAGES[:2] for _ in range(3)]
    together = run_batch(adapted, jobs, images)
    pairs = zip(jobs, images, strict=True)
    alone = [run_batch(adapted, [job], [image])[0] for job, image in pairs]
    # Texts, not scores: padding in a batch moves scores in the last float bits.
    assert [[t for t, _ in r] for r in together] == [[t for t, _ in r] for r in alone]
    assert len({r[0][0] for r in alone[:3]}) == 3, "the adapters should give different captions"


def test_emptying_the_directory_gives_the_base_model_back(model_cache, adapter_dir, tmp_path):
    directory = tmp_path / "adapters"
    shutil.copytree(adapter_dir / "v1.2_query", directory / "v1.2_query")
    source = str(tiny.ensure("blip2", model_cache))
    plain = Blip2Runner.load("blip2", source, "cpu")
    runner = Blip2Runner.load("blip2", source, "cpu", adapters=str(directory))
    # With the adapter active, peft's own unload() would keep its Q-Former copy.
    run_batch(runner, [CaptionJob("", text_settings(), adapter="v1.2_query")])
    shutil.rmtree(directory / "v1.2_query")
    runner.reload()
    assert runner.info().adapters == []
    expected, state = plain.model.state_dict(), runner.model.state_dict()
    assert expected.keys() == state.keys()
    assert all(torch.equal(expected[key], state[key]) for key in expected)
    assert type(runner.model.qformer) is type(plain.model.qformer)
    jobs = [CaptionJob("", text_settings(num_beams=3)), VqaJob(QUESTION, text_settings())]
    assert run_batch(runner, jobs) == run_batch(plain, jobs)


def test_adapter_folders_are_named_folders_with_a_peft_config(adapter_dir):
    assert list(adapter_folders(adapter_dir)) == ["ink", "v1.2_query"]


def test_the_adapter_directory_is_an_extra_of_the_blip2_model():
    args = build_parser().parse_args(["serve", "--caption-adapter-dir", "/srv/adapters"])
    (blip2,) = [spec for spec in serve_config(args).resolve().models if spec.family == "blip2"]
    assert blip2.extras == (("adapters", "/srv/adapters"),)
    (cleared,) = [s for s in with_overrides((blip2,), ("adapters=",)) if s.family == "blip2"]
    assert cleared.extras == ()
    with pytest.raises(ValueError, match="no BLIP-2 model"):
        with_overrides(tuple(s for s in preset("tiny") if s.family != "blip2"), ("adapters=/a",))


@pytest.mark.parametrize("adapter", ["ink", "v1.2_query"])
def test_an_adapter_changes_the_caption(client, adapter):
    for image in IMAGES:
        assert texts(client.caption(image, adapter=adapter)) != texts(client.caption(image))


@pytest.mark.parametrize(
    "settings",
    [{"max_new_tokens": 12}, {"max_new_tokens": 10, "num_beams": 3, "num_return_sequences": 2}],
    ids=["greedy", "beam"],
)
def test_without_an_adapter_results_equal_a_server_without_adapters(client, plain_client, settings):
    generation = TextOptions(**settings)
    for image in IMAGES:
        # Scores too: any change in the model's arithmetic would show in them.
        assert texts(client.caption(image, generation=generation)) == texts(
            plain_client.caption(image, generation=generation)
        )
        assert texts(client.ask(image, QUESTION, generation=generation)) == texts(
            plain_client.ask(image, QUESTION, generation=generation)
        )
    # Also after requests with an adapter have run.
    client.caption(IMAGES[0], adapter="ink", generation=generation)
    assert texts(client.caption(IMAGES[0], generation=generation)) == texts(
        plain_client.caption(IMAGES[0], generation=generation)
    )


@pytest.mark.parametrize("adapter", ["ink", "v1.2_query"])
def test_a_served_adapter_equals_peft_called_directly(client, adapter_dir, model_cache, adapter):
    path = tiny.ensure("blip2", model_cache)
    processor = Blip2Processor.from_pretrained(path)
    model = Blip2ForConditionalGeneration.from_pretrained(path).eval()
    PeftModel.from_pretrained(model, str(adapter_dir / adapter), adapter_name="direct")
    image = Image.open(io.BytesIO(IMAGES[1])).convert("RGB")
    inputs = processor(images=image, text="", return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=12)
    continuation = output[:, inputs["input_ids"].shape[1] :]
    direct = processor.tokenizer.batch_decode(continuation, skip_special_tokens=True)[0].strip()
    served = (
        client.caption(IMAGES[1], adapter=adapter, generation=TextOptions(max_new_tokens=12))
        .captions[0]
        .text
    )
    assert served == direct


def test_questions_are_answered_with_an_adapter(client):
    plain = client.ask(IMAGES[0], QUESTION, generation=TextOptions(max_new_tokens=8))
    adapted = client.ask(
        IMAGES[0], QUESTION, adapter="ink", generation=TextOptions(max_new_tokens=8)
    )
    assert adapted.answers[0].text and texts(adapted) != texts(plain)


def test_an_unknown_adapter_is_not_found_naming_it_and_the_loaded_ones(client):
    for call in (lambda: client.caption(IMAGES[0], adapter="chalk"),
                 lambda: client.ask(IMAGES[0], QUESTION, adapter="chalk")):  # fmt: skip
        with pytest.raises(grpc.RpcError) as caught:
            call()
        error = caught.value
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "'chalk'" in error.details()
        assert "ink" in error.details() and "v1.2_query" in error.details()
        assert field_violations(error) == ["adapter"]


@pytest.mark.parametrize("name", ["../ink", "bad name", ".hidden", "x" * 65])
def test_a_malformed_adapter_name_is_invalid(client, name):
    with pytest.raises(grpc.RpcError) as caught:
        client.caption(IMAGES[0], adapter=name)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == ["adapter"]


def test_bulk_stream_items_name_the_adapter_field(client):
    def requests():
        for key, adapter in (("good", "ink"), ("unknown", "chalk"), ("bad", "a/b")):
            request = caption_pb2.CaptionRequest(adapter=adapter)
            request.image.data = IMAGES[0]
            yield caption_pb2.CaptionStreamRequest(id=key, request=request)

    replies = {reply.id: reply for reply in client.caption_stream(requests())}
    assert replies["good"].response.captions[0].text
    assert (replies["unknown"].error.code, replies["unknown"].error.field) == (5, "adapter")
    assert (replies["bad"].error.code, replies["bad"].error.field) == (3, "adapter")


def test_requests_with_different_adapters_at_once_get_their_own(client):
    """Sent together, requests batch only with others of the same adapter, and
    every one gets what it gets alone."""
    jobs = [(image, adapter) for adapter in ("", "ink", "v1.2_query") for image in IMAGES] * 3
    alone = {job: texts(client.caption(job[0], adapter=job[1])) for job in set(jobs)}
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: client.caption(job[0], adapter=job[1]), jobs))
    for job, reply in zip(jobs, replies, strict=True):
        # Texts, not scores: padding in a batch moves scores in the last float bits.
        assert [text for text, _ in texts(reply)] == [text for text, _ in alone[job]], job
        # 9 requests of each adapter: a batch holding more mixed adapters.
        assert reply.info.batch_size <= 9
    assert max(reply.info.batch_size for reply in replies) > 1, "nothing was batched"


def test_sighup_reloads_the_adapter_directory(model_cache, tmp_path):
    directory = tmp_path / "adapters"
    directory.mkdir()
    make_adapter(directory, "ink", 1, model_cache, "lora")
    server = start_server(
        model_cache, tmp_path, "--workers", "1", "--caption-adapter-dir", str(directory)
    )
    try:
        with ImagoClient(server.target, timeout=120) as client:
            inked = texts(client.caption(IMAGES[0], adapter="ink"))
            make_adapter(directory, "chalk", 4, model_cache, "qformer")
            # A broken folder is reported and skipped; the others still load.
            (directory / "broken").mkdir()
            (directory / "broken" / "adapter_config.json").write_text("{}")
            make_adapter(directory, "ink", 5, model_cache, "lora")  # changed in place
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while True:
                try:
                    chalked = client.caption(IMAGES[0], adapter="chalk")
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
                    assert time.monotonic() < deadline, "chalk never loaded"
                    time.sleep(0.2)
            assert texts(chalked) != texts(client.caption(IMAGES[0]))
            assert texts(client.caption(IMAGES[0], adapter="ink")) != inked
            with pytest.raises(grpc.RpcError) as caught:
                client.caption(IMAGES[0], adapter="broken")
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            # Removing the folders unloads them; the base model is untouched.
            base = texts(client.caption(IMAGES[0]))
            for name in ("ink", "chalk", "broken"):
                shutil.rmtree(directory / name)
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.caption(IMAGES[0], adapter="ink")
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND
                    assert "(loaded: none)" in err.details()
                    break
                assert time.monotonic() < deadline, "ink never unloaded"
                time.sleep(0.2)
            assert texts(client.caption(IMAGES[0])) == base
    finally:
        assert server.stop() == 0, server.log()
    log = server.log()
    assert "reloaded adapters" in log and "could not reload adapters" in log and "broken" in log


def test_the_command_line_captions_and_asks_with_an_adapter(adapter_server, client, tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(IMAGES[2])
    base = [sys.executable, "-m", "imago.client.cli", "--target", adapter_server.target]
    caption = subprocess.run(
        [*base, "caption", str(image), "--adapter", "ink"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert caption.returncode == 0, caption.stderr
    expected = client.caption(IMAGES[2], adapter="ink").captions[0].text
    assert caption.stdout.strip() == f"{image}\t{expected}"
    ask = subprocess.run(
        [*base, "ask", str(image), QUESTION, "--adapter", "v1.2_query"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ask.returncode == 0, ask.stderr
    expected = client.ask(IMAGES[2], QUESTION, adapter="v1.2_query").answers[0].text
    assert ask.stdout.strip() == expected
    missing = subprocess.run(
        [*base, "caption", str(image), "--adapter", "chalk"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    assert "adapter:" in missing.stderr


# ------------------------------------------------------------------ the Node.js client


def test_the_node_client_captions_and_asks_with_an_adapter(adapter_server, client, tmp_path):
    from test_node_client import node_cli

    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    caption = node_cli(adapter_server.target, "caption", str(image), "--adapter", "ink")
    assert caption.returncode == 0, caption.stderr
    assert caption.stdout.strip() == client.caption(png_bytes(), adapter="ink").captions[0].text
    answer = node_cli(adapter_server.target, "ask", str(image), QUESTION, "--adapter", "ink")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == client.ask(png_bytes(), QUESTION, adapter="ink").answers[0].text


def test_the_node_client_names_an_unknown_adapter(adapter_server, tmp_path):
    from test_node_client import node_cli

    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    result = node_cli(adapter_server.target, "caption", str(image), "--adapter", "nope")
    assert result.returncode == 1
    assert result.stderr.startswith("error: NOT_FOUND: ") and "\n  adapter: " in result.stderr
