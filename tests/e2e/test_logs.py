"""Request ids (the ``x-request-id`` header, ResponseInfo, log lines) and the
text and JSON log formats."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import re
import time
from datetime import datetime

import grpc
import pytest
from conftest import png_bytes, start_server

from imago.v1 import caption_pb2, caption_pb2_grpc, common_pb2, imagegen_pb2, imagegen_pb2_grpc
from imago.workers.contract.logs import (
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    configure_logging,
    set_request_id,
)

HEADER = "x-request-id"
UUID_HEX = re.compile(r"[0-9a-f]{32}")


def caption_request(data: bytes | None = None) -> caption_pb2.CaptionRequest:
    return caption_pb2.CaptionRequest(image=common_pb2.Image(data=data or png_bytes()))


def generate_request(steps: int = 2) -> imagegen_pb2.GenerateRequest:
    return imagegen_pb2.GenerateRequest(
        prompt="a lighthouse", text_to_image=imagegen_pb2.TextToImage(), steps=steps
    )


def header(metadata) -> str | None:
    return dict(metadata or ()).get(HEADER)


# ------------------------------------------------------------ request ids


def test_a_caption_gets_its_request_id_as_initial_metadata_and_in_its_info(channel):
    stub = caption_pb2_grpc.CaptionServiceStub(channel)
    reply, call = stub.Caption.with_call(caption_request(), timeout=60)
    request_id = header(call.initial_metadata())
    assert UUID_HEX.fullmatch(request_id)
    assert reply.info.request_id == request_id


def test_an_invalid_request_still_gets_a_request_id(channel):
    stub = caption_pb2_grpc.CaptionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as failure:
        stub.Caption(caption_request(b"not an image"), timeout=60)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert UUID_HEX.fullmatch(header(failure.value.initial_metadata()))


def test_a_generate_stream_gets_its_request_id_before_its_first_event(channel):
    events = imagegen_pb2_grpc.ImageGenServiceStub(channel).Generate(generate_request(), timeout=60)
    request_id = header(events.initial_metadata())
    assert UUID_HEX.fullmatch(request_id)
    assert {event.request_id for event in events} == {request_id}


def test_a_sane_client_request_id_is_used_and_echoed(channel):
    stub = caption_pb2_grpc.CaptionServiceStub(channel)
    sent = "client-7.A_b"
    reply, call = stub.Caption.with_call(caption_request(), metadata=[(HEADER, sent)], timeout=60)
    assert header(call.initial_metadata()) == sent
    assert reply.info.request_id == sent


@pytest.mark.parametrize("sent", ["x" * 65, "has space", "a/b", "x;y=z"])
def test_an_insane_client_request_id_is_replaced(channel, sent):
    stub = caption_pb2_grpc.CaptionServiceStub(channel)
    reply, call = stub.Caption.with_call(caption_request(), metadata=[(HEADER, sent)], timeout=60)
    assert UUID_HEX.fullmatch(header(call.initial_metadata()))
    assert reply.info.request_id == header(call.initial_metadata())


def test_each_item_of_a_bulk_stream_gets_the_streams_id_and_its_index(channel):
    stub = caption_pb2_grpc.CaptionServiceStub(channel)
    items = [
        caption_pb2.CaptionStreamRequest(id=name, request=caption_request())
        for name in ("first", "second")
    ]
    replies = stub.CaptionStream(iter(items), metadata=[(HEADER, "bulk-1")], timeout=60)
    ids = {reply.id: reply.response.info.request_id for reply in replies}
    assert header(replies.initial_metadata()) == "bulk-1"
    assert ids == {"first": "bulk-1-0", "second": "bulk-1-1"}


def test_a_client_request_id_already_in_flight_gets_a_suffix(channel):
    stub = imagegen_pb2_grpc.ImageGenServiceStub(channel)
    sent = [(HEADER, "twice")]
    # A call's first event (Queued) comes once its ticket exists.
    first = stub.Generate(generate_request(steps=150), metadata=sent, timeout=60)
    try:
        assert next(first).request_id == "twice"
        second = stub.Generate(generate_request(steps=150), metadata=sent, timeout=60)
        try:
            assert re.fullmatch(r"twice-[0-9a-f]{8}", next(second).request_id)
            assert header(second.initial_metadata()) == "twice"
        finally:
            second.cancel()
    finally:
        first.cancel()


# ------------------------------------------------------------ JSON logs


@pytest.fixture(scope="module")
def json_server(server, model_cache, tmp_path_factory):
    """A server logging JSON at DEBUG. (After the shared ``server``, which
    builds the tiny checkpoints, so that this one's workers only load them.)"""
    logs = tmp_path_factory.mktemp("json-logs")
    running = start_server(
        model_cache, logs, "--workers", "1", "--log-format", "json", "--log-level", "debug"
    )
    yield running
    code = running.stop()
    assert code == 0, running.log()


def log_entries(log: str) -> list[dict]:
    """The JSON objects of a log, the workers' included; fails on any other line."""
    entries = []
    for line in log.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
    return entries


def test_json_log_lines_are_objects_with_time_level_logger_and_message(json_server):
    entries = log_entries(json_server.log())
    assert any(e["message"].startswith("listening on") for e in entries)
    # Worker processes log in the same format, each line naming its worker.
    assert any(e.get("process") == "worker-0" and "loaded" in e["message"] for e in entries)
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry)
        assert entry["time"].endswith("Z")
        datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
        assert entry["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def test_a_requests_log_lines_carry_its_id(json_server):
    with json_server.channel() as channel:
        stub = caption_pb2_grpc.CaptionServiceStub(channel)
        stub.Caption(caption_request(), metadata=[(HEADER, "logged-1")], timeout=60)
    deadline = time.monotonic() + 5
    while True:
        mine = [e for e in log_entries(json_server.log()) if e.get("request_id") == "logged-1"]
        finished = [e for e in mine if e["logger"] == "imago.rpc"]
        if finished or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(finished) == 1, mine
    pattern = r"imago\.v1\.CaptionService/Caption OK in \d+\.\d{3}s"
    assert re.fullmatch(pattern, finished[0]["message"])
    # Lines logged on the request's way through the frontend carry the id too.
    assert any(e["logger"] == "imago.scheduler" for e in mine)


# ------------------------------------------------------------ formatters


def emitted(formatter: logging.Formatter, emit, request_id: str | None = None) -> str:
    """What ``emit(logger)`` writes through the server's filter and ``formatter``,
    run with ``request_id`` as the context's request id."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger("imago.test")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        contextvars.copy_context().run(lambda: (set_request_id(request_id), emit(logger)))
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_text_lines_end_with_the_request_id_inside_a_request():
    line = emitted(TextFormatter(), lambda log: log.warning("queue %d", 3), request_id="abc")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d [\d:,]+ WARNING imago\.test: queue 3 \[abc\]\n", line)


def test_text_lines_have_no_request_id_outside_a_request():
    assert emitted(TextFormatter(), lambda log: log.warning("idle")).endswith("imago.test: idle\n")


def test_a_request_id_given_with_the_record_wins_over_the_context():
    output = emitted(
        JsonFormatter(), lambda log: log.warning("x", extra={"request_id": "given"}), "context"
    )
    assert json.loads(output)["request_id"] == "given"


def test_json_lines_carry_the_request_id_and_an_exceptions_traceback():
    def fail(log: logging.Logger) -> None:
        try:
            raise ValueError("broken\nacross lines")
        except ValueError:
            log.exception("it failed")

    output = emitted(JsonFormatter(), fail, request_id="r-1")
    assert output.count("\n") == 1
    entry = json.loads(output)
    assert entry["message"] == "it failed" and entry["request_id"] == "r-1"
    assert entry["level"] == "ERROR" and entry["logger"] == "imago.test"
    assert "ValueError: broken\nacross lines" in entry["exc_info"]


def test_json_lines_outside_a_request_have_no_request_id():
    entry = json.loads(emitted(JsonFormatter(), lambda log: log.warning("idle")))
    assert "request_id" not in entry and "exc_info" not in entry


def test_an_unknown_log_format_is_refused():
    with pytest.raises(ValueError, match="text, json"):
        configure_logging("info", "xml")
