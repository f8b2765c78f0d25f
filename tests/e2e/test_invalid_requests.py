"""Bad input gets INVALID_ARGUMENT naming the field, through the real server."""

from __future__ import annotations

import grpc
import pytest
from conftest import field_violations, png_bytes
from google.protobuf.message import Message

from imago.v1 import (
    caption_pb2,
    caption_pb2_grpc,
    common_pb2,
    imagegen_pb2,
    imagegen_pb2_grpc,
    vqa_pb2,
    vqa_pb2_grpc,
)

GOOD = common_pb2.Image(data=png_bytes())
Gen = common_pb2.GenerationSettings


def assert_invalid(call, request, field: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        reply = call(request, timeout=60)
        if not isinstance(reply, Message):  # a server stream: read it to the error
            list(reply)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in error.details()
    assert field_violations(error) == [field]


CAPTION_CASES = {
    "image.data": caption_pb2.CaptionRequest(),
    "image.data (garbage)": caption_pb2.CaptionRequest(
        image=common_pb2.Image(data=b"\x89PNG\r\n garbage")
    ),
    "image.mime_type": caption_pb2.CaptionRequest(
        image=common_pb2.Image(data=png_bytes(), mime_type="image/gif")
    ),
    # A sound header with a cut-off body: found out when the worker decodes it.
    "image.data (truncated)": caption_pb2.CaptionRequest(
        image=common_pb2.Image(data=png_bytes(size=(300, 300))[:200])
    ),
    "generation.max_new_tokens": caption_pb2.CaptionRequest(
        image=GOOD, generation=Gen(max_new_tokens=0)
    ),
    "generation.num_beams": caption_pb2.CaptionRequest(image=GOOD, generation=Gen(num_beams=64)),
    "generation.temperature": caption_pb2.CaptionRequest(
        image=GOOD, generation=Gen(do_sample=True, temperature=-1)
    ),
    "generation.top_p": caption_pb2.CaptionRequest(image=GOOD, generation=Gen(top_p=2)),
    "generation.top_k": caption_pb2.CaptionRequest(image=GOOD, generation=Gen(top_k=100_000)),
    "generation.repetition_penalty": caption_pb2.CaptionRequest(
        image=GOOD, generation=Gen(repetition_penalty=0)
    ),
    "generation.min_new_tokens": caption_pb2.CaptionRequest(
        image=GOOD, generation=Gen(max_new_tokens=4, min_new_tokens=10)
    ),
    "generation.num_return_sequences": caption_pb2.CaptionRequest(
        image=GOOD, generation=Gen(num_beams=2, num_return_sequences=4)
    ),
    "prefix": caption_pb2.CaptionRequest(image=GOOD, prefix="x" * 5000),
    # Within the server's limit, but past the tiny model's 128 positions.
    "generation.max_new_tokens (model limit)": caption_pb2.CaptionRequest(
        image=GOOD, generation=Gen(max_new_tokens=200)
    ),
}


@pytest.mark.parametrize("field", CAPTION_CASES)
def test_invalid_caption_field_is_named(channel, field):
    stub = caption_pb2_grpc.CaptionServiceStub(channel)
    assert_invalid(stub.Caption, CAPTION_CASES[field], field.split(" ")[0])


ASK_CASES = {
    "question": vqa_pb2.AskRequest(image=GOOD, question=""),
    "image.data": vqa_pb2.AskRequest(image=common_pb2.Image(data=b"GIF89a..."), question="why?"),
    "generation.length_penalty": vqa_pb2.AskRequest(
        image=GOOD, question="why?", generation=Gen(length_penalty=float("nan"))
    ),
}


@pytest.mark.parametrize("field", ASK_CASES)
def test_invalid_ask_field_is_named(channel, field):
    stub = vqa_pb2_grpc.VqaServiceStub(channel)
    assert_invalid(stub.Ask, ASK_CASES[field], field)


def generate_request(**fields) -> imagegen_pb2.GenerateRequest:
    fields.setdefault("prompt", "a fox")
    fields.setdefault("text_to_image", imagegen_pb2.TextToImage())
    return imagegen_pb2.GenerateRequest(**fields)


GENERATE_CASES = {
    "prompt": generate_request(prompt=""),
    "width": generate_request(width=100),
    "height": generate_request(height=8192),
    "steps": generate_request(steps=1000),
    "guidance_scale": generate_request(guidance_scale=float("inf")),
    "num_images": generate_request(num_images=50),
    "output_format": generate_request(output_format=17),
    "previews.every_n_steps": generate_request(
        steps=4, previews=imagegen_pb2.PreviewOptions(every_n_steps=5)
    ),
    "previews.format": generate_request(previews=imagegen_pb2.PreviewOptions(format=-3)),
    "task": imagegen_pb2.GenerateRequest(prompt="a fox"),
}


@pytest.mark.parametrize("field", GENERATE_CASES)
def test_invalid_generate_field_is_named(channel, field):
    stub = imagegen_pb2_grpc.ImageGenServiceStub(channel)
    assert_invalid(stub.Generate, GENERATE_CASES[field], field)


def test_bulk_stream_item_errors_name_the_field(channel):
    stub = vqa_pb2_grpc.VqaServiceStub(channel)
    item = vqa_pb2.AskStreamRequest(id="q", request=vqa_pb2.AskRequest(image=GOOD, question=" "))
    (reply,) = stub.AskStream(iter([item]), timeout=60)
    assert (reply.id, reply.error.field) == ("q", "question")
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_server_still_answers_after_bad_requests(channel):
    stub = caption_pb2_grpc.CaptionServiceStub(channel)
    assert stub.Caption(caption_pb2.CaptionRequest(image=GOOD), timeout=60).captions


# A truncated varint: no message parses from it.
NOT_A_MESSAGE = b"\xff\xff\xff"


def test_bytes_that_are_not_the_request_message_are_invalid_argument(channel):
    caption = channel.unary_unary("/imago.v1.CaptionService/Caption")
    with pytest.raises(grpc.RpcError) as caught:
        caption(NOT_A_MESSAGE, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid" in caught.value.details()


def test_an_item_that_is_not_a_message_ends_a_bulk_stream_as_invalid_argument(channel):
    stream = channel.stream_stream("/imago.v1.CaptionService/CaptionStream")
    with pytest.raises(grpc.RpcError) as caught:
        list(stream(iter([NOT_A_MESSAGE]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
