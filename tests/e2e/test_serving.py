"""Every RPC end to end, through a real server process and real channels."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import png_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from imago.v1 import (
    caption_pb2,
    caption_pb2_grpc,
    common_pb2,
    imagegen_pb2,
    imagegen_pb2_grpc,
    vqa_pb2,
    vqa_pb2_grpc,
)

SERVICES = (
    "imago.v1.CaptionService",
    "imago.v1.VqaService",
    "imago.v1.ImageGenService",
    "imago.v1.AlignService",
)


def image(data: bytes | None = None) -> common_pb2.Image:
    return common_pb2.Image(data=data or png_bytes())


def generate(channel, **fields) -> list[imagegen_pb2.GenerateResponse]:
    fields.setdefault("prompt", "a red fox in the snow")
    fields.setdefault("text_to_image", imagegen_pb2.TextToImage())
    fields.setdefault("steps", 4)
    stub = imagegen_pb2_grpc.ImageGenServiceStub(channel)
    return list(stub.Generate(imagegen_pb2.GenerateRequest(**fields), timeout=120))


def kinds(events) -> list[str]:
    return [event.WhichOneof("event") for event in events]


@pytest.mark.parametrize("service", ["", *SERVICES])
def test_health_reports_serving(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_every_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert set(SERVICES) | {"grpc.health.v1.Health"} <= names


def test_reflection_v1_describes_every_service_to_buf_curl(server):
    # Current grpcurl and buf curl ask for grpc.reflection.v1 first; listing
    # methods makes buf fetch each service's file descriptor through it.
    buf = shutil.which("buf") or str(Path(sys.executable).with_name("buf"))
    listed = subprocess.run(
        [buf, "curl", "--list-methods", "--reflect-protocol", "grpc-v1", "--protocol", "grpc",
         "--http2-prior-knowledge", f"http://{server.target}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    methods = set(listed.stdout.split())
    assert {
        "imago.v1.CaptionService/Caption",
        "imago.v1.VqaService/Ask",
        "imago.v1.ImageGenService/Generate",
        "imago.v1.AlignService/Match",
        "grpc.health.v1.Health/Check",
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    } <= methods


def test_caption_returns_text_model_and_timings(channel):
    stub = caption_pb2_grpc.CaptionServiceStub(channel)
    reply = stub.Caption(caption_pb2.CaptionRequest(image=image()), timeout=60)
    assert len(reply.captions) == 1
    assert reply.captions[0].text.strip()
    assert reply.info.model == "blip2-tiny"
    assert reply.info.request_id and reply.info.worker
    assert reply.info.inference_seconds > 0
    assert not reply.HasField("seed")


def test_caption_with_a_prefix_starts_with_it(channel):
    stub = caption_pb2_grpc.CaptionServiceStub(channel)
    request = caption_pb2.CaptionRequest(image=image(), prefix="a photo of")
    reply = stub.Caption(request, timeout=60)
    assert reply.captions[0].text.startswith("a photo of")


def test_beam_search_returns_several_scored_captions(channel):
    stub = caption_pb2_grpc.CaptionServiceStub(channel)
    settings = common_pb2.GenerationSettings(num_beams=3, num_return_sequences=3)
    reply = stub.Caption(caption_pb2.CaptionRequest(image=image(), generation=settings), timeout=60)
    assert len(reply.captions) == 3
    assert all(c.HasField("score") for c in reply.captions)


def test_sampled_caption_reports_its_seed_and_repeats_with_it(channel):
    stub = caption_pb2_grpc.CaptionServiceStub(channel)
    settings = common_pb2.GenerationSettings(do_sample=True, top_k=0, temperature=1.5)
    first = stub.Caption(caption_pb2.CaptionRequest(image=image(), generation=settings), timeout=60)
    assert first.HasField("seed")
    settings.seed = first.seed
    again = stub.Caption(caption_pb2.CaptionRequest(image=image(), generation=settings), timeout=60)
    assert again.captions[0].text == first.captions[0].text


def test_ask_answers_a_question(channel):
    stub = vqa_pb2_grpc.VqaServiceStub(channel)
    reply = stub.Ask(vqa_pb2.AskRequest(image=image(), question="what colour is it?"), timeout=60)
    assert len(reply.answers) == 1
    assert reply.info.model == "blip2-tiny"


def test_caption_stream_echoes_ids_and_reports_item_errors_in_band(channel):
    stub = caption_pb2_grpc.CaptionServiceStub(channel)
    requests = [
        caption_pb2.CaptionStreamRequest(
            id=f"img-{i}", request=caption_pb2.CaptionRequest(image=image())
        )
        for i in range(5)
    ]
    bad = caption_pb2.CaptionRequest(image=common_pb2.Image(data=b"junk"))
    requests.append(caption_pb2.CaptionStreamRequest(id="broken", request=bad))
    replies = {r.id: r for r in stub.CaptionStream(iter(requests), timeout=120)}
    assert set(replies) == {f"img-{i}" for i in range(5)} | {"broken"}
    assert all(replies[f"img-{i}"].response.captions for i in range(5))
    error = replies["broken"].error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error.field == "image.data"


def test_ask_stream_echoes_ids(channel):
    stub = vqa_pb2_grpc.VqaServiceStub(channel)
    requests = [
        vqa_pb2.AskStreamRequest(
            id=str(i), request=vqa_pb2.AskRequest(image=image(), question="why?")
        )
        for i in range(3)
    ]
    replies = list(stub.AskStream(iter(requests), timeout=120))
    assert sorted(r.id for r in replies) == ["0", "1", "2"]
    assert all(r.WhichOneof("outcome") == "response" for r in replies)


def test_generate_streams_started_progress_for_every_step_then_result(channel):
    events = generate(channel, steps=5)
    order = kinds(events)
    assert order[0] == "queued"
    assert order[order.index("started") :] == ["started"] + ["progress"] * 5 + ["result"]
    steps = [e.progress.step for e in events if e.HasField("progress")]
    assert steps == [1, 2, 3, 4, 5]
    assert {e.progress.total_steps for e in events if e.HasField("progress")} == {5}
    assert len({e.request_id for e in events}) == 1


def test_generate_result_is_an_image_of_the_native_size_with_its_seed(channel):
    result = generate(channel, seed=1234)[-1].result
    assert len(result.images) == 1
    generated = result.images[0]
    assert generated.seed == 1234
    assert generated.image.mime_type == "image/png"
    decoded = Image.open(io.BytesIO(generated.image.data))
    assert decoded.size == (64, 64) == (generated.image.width, generated.image.height)
    assert result.info.model == "sd-tiny"


def test_generate_without_seed_reports_the_random_one_and_it_reproduces(channel):
    first = generate(channel)[-1].result.images[0]
    again = generate(channel, seed=first.seed)[-1].result.images[0]
    assert again.image.data == first.image.data


def test_several_images_get_consecutive_seeds_and_differ(channel):
    images = generate(channel, seed=40, num_images=3)[-1].result.images
    assert [i.seed for i in images] == [40, 41, 42]
    assert len({i.image.data for i in images}) == 3


def test_size_and_output_format_are_honoured(channel):
    fmt = common_pb2.IMAGE_FORMAT_JPEG
    generated = generate(channel, width=96, height=72, output_format=fmt)[-1].result.images[0]
    decoded = Image.open(io.BytesIO(generated.image.data))
    assert (decoded.format, decoded.size) == ("JPEG", (96, 72))


def test_previews_come_every_n_steps(channel):
    options = imagegen_pb2.PreviewOptions(every_n_steps=2, format=common_pb2.IMAGE_FORMAT_PNG)
    events = generate(channel, steps=6, previews=options)
    previews = [e.preview for e in events if e.HasField("preview")]
    assert [p.step for p in previews] == [2, 4, 6]
    first = Image.open(io.BytesIO(previews[0].image.data))
    assert first.format == "PNG" and first.size == (64, 64)


def test_no_previews_unless_asked(channel):
    assert "preview" not in kinds(generate(channel, steps=3))


def test_photo_larger_than_grpcs_4mib_default_is_accepted(channel):
    noise = Image.frombytes("RGB", (1400, 1400), os.urandom(1400 * 1400 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    assert buffer.tell() > 5 * 1024 * 1024
    stub = caption_pb2_grpc.CaptionServiceStub(channel)
    request = caption_pb2.CaptionRequest(image=common_pb2.Image(data=buffer.getvalue()))
    assert stub.Caption(request, timeout=120).captions
