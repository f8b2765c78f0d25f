"""Fuzzing every RPC through a real server with malformed, extreme and
adversarial fields and images.

Each case is one call with a deadline. Its outcome must be OK with a
well-formed response, or a status the API documents for bad input
(INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND, RESOURCE_EXHAUSTED), and
a rejection must name, in a google.rpc.BadRequest field violation, a field
path that exists in the request. INTERNAL, UNKNOWN, UNAVAILABLE and
DEADLINE_EXCEEDED (a hang) fail the case. Afterwards the server must still be
alive and healthy, with no traceback from the frontend in its log.

The server is this module's own, with small limits (4 MiB messages), so that
nothing done here can disturb other tests.

Runs are reproducible: examples are derived from each test's name
(``derandomize``) and no example database is kept. For a longer hunt, raise
the number of examples per RPC and draw fresh ones::

    IMAGO_FUZZ_EXAMPLES=300 IMAGO_FUZZ_RANDOM=1 python -m pytest -q tests/e2e/test_fuzz.py -s

(IMAGO_FUZZ_VERBOSE=1 also prints slow cases and the fields rejections named.)
The number of cases tried is printed at the end of the module, also without -s.
"""

from __future__ import annotations

import io
import math
import os
import re
import sys
import time
from collections import Counter

import grpc
import pytest
from conftest import start_server
from fuzz_strategies import (
    Case,
    FuzzImage,
    ask_requests,
    ask_streams,
    caption_requests,
    caption_streams,
    embed_images_requests,
    embed_texts_requests,
    generate_requests,
    jpeg_scan_bomb,
    match_requests,
    png_bomb,
)
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from imago.v1 import (
    align_pb2,
    align_pb2_grpc,
    caption_pb2,
    caption_pb2_grpc,
    common_pb2,
    imagegen_pb2,
    imagegen_pb2_grpc,
    vqa_pb2,
    vqa_pb2_grpc,
)

#: Examples per RPC; each example is one call (a stream counts its items too).
EXAMPLES = int(os.environ.get("IMAGO_FUZZ_EXAMPLES", "60"))
#: Fresh random examples instead of the reproducible ones.
RANDOM = os.environ.get("IMAGO_FUZZ_RANDOM", "") not in ("", "0")
#: Also print each case slower than a second, and which fields rejections named.
VERBOSE = os.environ.get("IMAGO_FUZZ_VERBOSE", "") not in ("", "0")
#: Deadline of every call: a case still running after it has hung.
CALL_TIMEOUT_S = 30.0

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    # Cases are slow by unit-test standards (a real server answers each one)
    # and images are large draws; neither is a problem here.
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)

OK = grpc.StatusCode.OK
#: Statuses bad input may get; any other fails the case.
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    # Messages over --max-message-mb either way, a full queue.
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
#: Statuses that are about a request field, and so must name it.
NAMES_A_FIELD = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
}
CODES = {code.value[0]: code for code in grpc.StatusCode}

# The server's preview size when none is asked for.
DEFAULT_PREVIEW_SIZE = 512
FORMATS = {0: "PNG", 1: "PNG", 2: "JPEG", 3: "WEBP"}


class Tally:
    """Cases tried and their outcomes, over the whole module."""

    def __init__(self) -> None:
        # Per RPC: unary calls, Generate calls and bulk stream items.
        self.cases: Counter[str] = Counter()
        self.streams = 0
        self.outcomes: Counter[str] = Counter()
        # (RPC, status, first field named, indexes elided): what was covered.
        self.fields: Counter[tuple[str, str, str]] = Counter()
        self.started = time.monotonic()

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        rpcs = ", ".join(f"{name} {n}" for name, n in sorted(self.cases.items()))
        outcomes = ", ".join(f"{name} {n}" for name, n in self.outcomes.most_common())
        return (
            f"fuzz: {self.total} cases tried in {seconds:.0f}s ({EXAMPLES} examples per test"
            f"{', random' if RANDOM else ''}, {self.streams} bulk streams); "
            f"by RPC: {rpcs}; outcomes: {outcomes}"
        )


TALLY = Tally()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fuzz_lora_dir(model_cache, tmp_path_factory):
    """One loaded adapter, "ink", so that LoRA weights are checked, not only names."""
    from test_loras import make_lora

    directory = tmp_path_factory.mktemp("fuzz-loras")
    make_lora(directory, "ink", 3, model_cache)
    return directory


@pytest.fixture(scope="module")
def fuzz_server(model_cache, fuzz_lora_dir, tmp_path_factory, request):
    """This module's own tiny-preset server, with small limits; prints the
    tally when the module is done."""
    logs = tmp_path_factory.mktemp("fuzz-logs")
    running = start_server(
        model_cache, logs, "--workers", "1", "--max-message-mb", "4",
        "--lora-dir", str(fuzz_lora_dir), "--max-batch-delay-ms", "5",
        # Long bulk streams fill it: a full queue is part of what is fuzzed.
        "--max-queue", "16",
        # One compute thread: the tiny models gain nothing from more, and
        # spinning thread pools slow to a crawl on a busy machine.
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    TALLY.started = time.monotonic()
    yield running
    _announce(request, TALLY.summary())
    if VERBOSE:
        covered = sorted(TALLY.fields.items())
        _announce(request, "\n".join(f"{n:5d} {w}: {c} {f}" for (w, c, f), n in covered))
    code = running.stop()
    assert code == 0, running.log()


def _announce(request, line: str) -> None:
    """Print ``line`` to the terminal even while pytest captures output."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        print(f"\n{line}")


@pytest.fixture(scope="module")
def channel(fuzz_server):
    # Receive what the server may send, so that its own limit is what is tested.
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(fuzz_server.target, options=options) as chan:
        yield chan


# ----------------------------------------------------------------- checks


def _status(error: grpc.RpcError):
    """The google.rpc.Status of ``error``, None without details."""
    try:
        return rpc_status.from_call(error)
    except ValueError:
        # The client's own deadline ended the call as the server's status
        # (with another message) arrived: the details are not this call's.
        return None


def violations(error: grpc.RpcError) -> list[str]:
    """Fields named by the google.rpc.BadRequest details of ``error``."""
    status = _status(error)
    if status is None:
        return []
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [violation.field for violation in bad_request.field_violations]
    return fields


def retry_delay(error: grpc.RpcError) -> float | None:
    """Seconds of the google.rpc.RetryInfo detail of ``error``, if it has one."""
    status = _status(error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


_PART = re.compile(r"([a-z_][a-z0-9_]*)(?:\[(\d+)\])?")


def check_path(request: Message, path: str) -> None:
    """``path`` ("images[3].data", "generation.top_p", "task") leads through
    fields (or, last, a oneof) that exist in ``request``, indexes included."""
    current: Message | None = request
    parts = path.split(".")
    for position, part in enumerate(parts):
        match = _PART.fullmatch(part)
        assert match, f"field path {path!r} is malformed at {part!r}"
        name, index = match.group(1), match.group(2)
        descriptor = current.DESCRIPTOR
        last = position == len(parts) - 1
        if last and index is None and name in descriptor.oneofs_by_name:
            return
        assert name in descriptor.fields_by_name, (
            f"field path {path!r}: {descriptor.full_name} has no field {name!r}"
        )
        field = descriptor.fields_by_name[name]
        value = getattr(current, name)
        if index is not None:
            assert field.is_repeated, f"field path {path!r}: {name} is not repeated"
            assert int(index) < len(value), f"field path {path!r}: {name} has {len(value)} items"
            value = value[int(index)]
        elif field.is_repeated and not last:
            raise AssertionError(f"field path {path!r}: {name} needs an index")
        if not last:
            assert field.type == field.TYPE_MESSAGE, f"field path {path!r}: {name} is scalar"
            current = value


def check_rejection(
    code: grpc.StatusCode,
    message: str,
    fields: list[str],
    case: Case,
    what: str,
    also: frozenset[grpc.StatusCode] = frozenset(),
) -> None:
    """A status other than OK for ``case``: allowed (or in ``also``), and
    naming a real field when it is about one."""
    TALLY.outcomes[code.name] += 1
    TALLY.fields[(what, code.name, re.sub(r"\[\d+\]", "[]", fields[0]) if fields else "")] += 1
    assert code in ALLOWED | also, f"{what} answered {code.name}: {message}"
    if case.expect is not None:
        assert fields == [case.expect], (
            f"{what}: expected {case.expect}, got {code.name}: {message}"
        )
    if code in NAMES_A_FIELD:
        assert fields, f"{what}: {code.name} names no field: {message}"
    for path in fields:
        check_path(case.request, path)
        assert path in message, f"{what}: the message does not mention {path!r}: {message}"
        if code != grpc.StatusCode.INVALID_ARGUMENT:
            continue  # e.g. a style image where no IP-Adapter is loaded
        for image_path, image in case.images.items():
            if image.valid and (path == image_path or path.startswith(image_path + ".")):
                raise AssertionError(f"{what}: valid {image!r} rejected: {message}")


def check_item_error(
    error: common_pb2.ItemError,
    case: Case,
    what: str,
    also: frozenset[grpc.StatusCode] = frozenset(),
) -> None:
    code = CODES.get(error.code)
    assert code is not None, f"{what}: item error with unknown code {error.code}"
    fields = [error.field] if error.field else []
    check_rejection(code, error.message, fields, case, what, also)


def check_info(info: common_pb2.ResponseInfo) -> None:
    assert info.request_id and info.model and info.batch_size >= 1
    assert info.queue_seconds >= 0 and info.inference_seconds >= 0


def check_texts(texts, seed_present: bool, seed: int, request: Message) -> None:
    """Captions or answers of a text request that succeeded."""
    generation = request.generation
    wanted = generation.num_return_sequences if generation.HasField("num_return_sequences") else 1
    assert len(texts) == wanted >= 1
    if generation.do_sample:
        assert seed_present
        if generation.HasField("seed"):
            assert seed == generation.seed
    else:
        assert not seed_present
    prefix = getattr(request, "prefix", "").strip()
    for text in texts:
        assert text.text.startswith(prefix), (text.text, prefix)


def check_caption(reply: caption_pb2.CaptionResponse, case: Case) -> None:
    check_texts(reply.captions, reply.HasField("seed"), reply.seed, case.request)
    check_info(reply.info)


def check_answer(reply: vqa_pb2.AskResponse, case: Case) -> None:
    check_texts(reply.answers, reply.HasField("seed"), reply.seed, case.request)
    check_info(reply.info)


def decoded(image: common_pb2.Image) -> Image.Image:
    with Image.open(io.BytesIO(image.data)) as opened:
        opened.load()
        return opened


def check_generation(events: list[imagegen_pb2.GenerateResponse], case: Case) -> None:
    """The events of a Generate call that ended OK, in the documented order."""
    request = case.request
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds and kinds[-1] == "result" and kinds.count("result") == 1, kinds
    assert kinds.count("started") == 1, kinds
    started = kinds.index("started")
    assert set(kinds[:started]) <= {"queued"} and "queued" in kinds[:started], kinds
    assert "queued" not in kinds[started:], kinds
    assert len({event.request_id for event in events}) == 1 and events[0].request_id
    total = events[started].started.total_steps
    steps = [event.progress.step for event in events if event.HasField("progress")]
    assert steps == list(range(1, total + 1)), (steps, total)
    every = request.previews.every_n_steps
    limit = request.previews.max_size or DEFAULT_PREVIEW_SIZE
    for event in events:
        if event.HasField("preview"):
            preview = event.preview
            assert every and preview.step % every == 0, (preview.step, every)
            picture = decoded(preview.image)
            assert picture.size == (preview.image.width, preview.image.height)
            assert max(picture.size) <= limit
    result = events[-1].result
    check_info(result.info)
    assert len(result.images) == (request.num_images or 1)
    fmt = FORMATS[request.output_format]
    for index, generated in enumerate(result.images):
        picture = decoded(generated.image)
        assert picture.format == fmt, (picture.format, fmt)
        assert picture.size == (generated.image.width, generated.image.height)
        if request.width:
            assert picture.width == request.width
        if request.height:
            assert picture.height == request.height
        if request.HasField("seed"):
            assert generated.seed == request.seed + index


def check_vectors(vectors, dimensions: int) -> None:
    for vector in vectors:
        assert len(vector.values) == dimensions > 0
        norm = math.sqrt(sum(v * v for v in vector.values))
        assert abs(norm - 1) < 1e-3, norm


def check_matrix(matrix: align_pb2.Matrix, rows: int, columns: int, low: float, high: float):
    assert (matrix.rows, matrix.columns) == (rows, columns)
    assert len(matrix.values) == rows * columns
    assert all(low - 1e-4 <= v <= high + 1e-4 for v in matrix.values), list(matrix.values)


def check_image_embeddings(reply: align_pb2.EmbedImagesResponse, case: Case) -> None:
    assert len(reply.embeddings) == len(case.request.images)
    for embedding in reply.embeddings:
        assert embedding.queries
        check_vectors(embedding.queries, reply.dimensions)
    check_info(reply.info)


def check_text_embeddings(reply: align_pb2.EmbedTextsResponse, case: Case) -> None:
    assert len(reply.embeddings) == len(case.request.texts)
    check_vectors(reply.embeddings, reply.dimensions)
    check_info(reply.info)


def check_match(reply: align_pb2.MatchResponse, case: Case) -> None:
    rows, columns = len(case.request.images), len(case.request.texts)
    check_matrix(reply.similarities, rows, columns, -1.0, 1.0)
    if case.request.image_text_matching:
        check_matrix(reply.match_probabilities, rows, columns, 0.0, 1.0)
    else:
        assert not reply.HasField("match_probabilities")
    check_info(reply.info)


# ------------------------------------------------------------------- calls

#: RPC name -> (stub class, whether it streams its response, response check).
RPCS = {
    "Caption": (caption_pb2_grpc.CaptionServiceStub, False, check_caption),
    "Ask": (vqa_pb2_grpc.VqaServiceStub, False, check_answer),
    "Generate": (imagegen_pb2_grpc.ImageGenServiceStub, True, check_generation),
    "EmbedImages": (align_pb2_grpc.AlignServiceStub, False, check_image_embeddings),
    "EmbedTexts": (align_pb2_grpc.AlignServiceStub, False, check_text_embeddings),
    "Match": (align_pb2_grpc.AlignServiceStub, False, check_match),
}


def start(channel: grpc.Channel, rpc: str, case: Case, timeout: float = CALL_TIMEOUT_S):
    """Start ``rpc`` with ``case``; returns what waits for its response (a
    Generate call's events as a list)."""
    stub_class, streams, _ = RPCS[rpc]
    method = getattr(stub_class(channel), rpc)
    if streams:
        events = method(case.request, timeout=timeout)  # under way already
        return lambda: list(events)
    return method.future(case.request, timeout=timeout).result


def finish(
    what: str,
    case: Case,
    wait,
    check,
    also: frozenset[grpc.StatusCode] = frozenset(),
) -> None:
    """Wait for a call started by :func:`start` and check its outcome:
    ``check(response, case)`` when it succeeded, else the status (which may
    also be one of ``also``)."""
    TALLY.cases[what] += 1
    began = time.monotonic()
    try:
        response = wait()
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        check_rejection(code, details, violations(error), case, what, also)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in details:
            assert retry_delay(error) is not None, f"{what}: a full queue without RetryInfo"
        return
    finally:
        seconds = time.monotonic() - began
        if VERBOSE and seconds > 1.0:
            print(f"\nslow: {seconds:.1f}s {what} {case!r}", file=sys.__stderr__)
    TALLY.outcomes[OK.name] += 1
    assert case.expect in (None, "OK"), f"{what}: expected {case.expect} to be rejected"
    check(response, case)


def run(channel: grpc.Channel, rpc: str, case: Case) -> None:
    """One case: call ``rpc`` with it and check the outcome."""
    finish(rpc, case, start(channel, rpc, case), RPCS[rpc][2])


def _image(data: bytes) -> FuzzImage:
    """A well-formed image used in an explicit example."""
    return FuzzImage(data, "", True, "example")


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def _caption(
    expect: str,
    prefix: str = "",
    image: bytes | None = None,
    valid: bool = True,
    **generation,
) -> Case:
    """A caption request with a small PNG, or ``image`` (a well-formed one
    unless not ``valid``), with the outcome to ``expect`` (see Case)."""
    request = caption_pb2.CaptionRequest(
        image=common_pb2.Image(data=image or _png((32, 24))),
        prefix=prefix,
        generation=common_pb2.GenerationSettings(**generation),
    )
    made = FuzzImage(request.image.data, "", valid, "example")
    return Case(request, {"image": made}, expect)


def _ask(expect: str, question: str, **generation) -> Case:
    request = vqa_pb2.AskRequest(
        image=common_pb2.Image(data=_png((32, 24))),
        question=question,
        generation=common_pb2.GenerationSettings(**generation),
    )
    return Case(request, {"image": _image(request.image.data)}, expect)


def _mpo() -> bytes:
    """A JPEG holding two pictures, as cameras and phones write them."""
    buffer = io.BytesIO()
    first, second = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (40, 30), "blue")
    first.save(buffer, "MPO", save_all=True, append_images=[second])
    return buffer.getvalue()


def _generate(expect: str, task: str, image: bytes | None = None, **fields) -> Case:
    request = imagegen_pb2.GenerateRequest(prompt="a fox", **fields)
    found = {}
    if task == "image_to_image":
        request.image_to_image.init_image.data = image
        found["image_to_image.init_image"] = _image(image)
    elif task == "inpaint":
        request.inpaint.image.data = image
        request.inpaint.mask.data = image
        found["inpaint.image"] = found["inpaint.mask"] = _image(image)
    else:
        request.text_to_image.SetInParent()
    return Case(request, found, expect)


# ------------------------------------------------------------------- RPCs


@FUZZ
@given(case=caption_requests())
# The prompt may not smuggle in the image placeholder token.
@example(case=_caption("prefix", "a <image> of", max_new_tokens=2))
# Temperatures and repetition penalties this small overflow the logits.
@example(case=_caption("OK", max_new_tokens=3, do_sample=True, temperature=1e-45))
@example(case=_caption("OK", max_new_tokens=3, do_sample=True, repetition_penalty=1e-45))
@example(case=_caption("OK", max_new_tokens=3, num_beams=2, repetition_penalty=1e-45))
# A prefix longer than the model's positions is the prefix's fault.
@example(case=_caption("prefix", "word " * 700, max_new_tokens=1))
# 36 megapixels in 36 KB: under the pixel limit, so the worker decodes it all.
@example(case=_caption("OK", image=png_bomb(6000, 6000), max_new_tokens=1))
# 27,000 empty scans over 36 megapixels, in 870 KB: a minute of decoding.
@example(case=_caption("image.data", image=jpeg_scan_bomb(6000, 6000, 3000), valid=False))
# PIL calls a JPEG with several pictures MPO: still a JPEG.
@example(case=_caption("OK", image=_mpo(), max_new_tokens=1))
def test_caption(channel, case):
    run(channel, "Caption", case)


@FUZZ
@given(case=ask_requests())
@example(case=_ask("question", "<image>", max_new_tokens=2))
@example(case=_ask("question", "why? " * 800, max_new_tokens=1))
def test_ask(channel, case):
    run(channel, "Ask", case)


#: Bulk stream RPC -> (stub class, stream request type, check of each response).
STREAMS = {
    "CaptionStream": (
        caption_pb2_grpc.CaptionServiceStub,
        caption_pb2.CaptionStreamRequest,
        check_caption,
    ),
    "AskStream": (vqa_pb2_grpc.VqaServiceStub, vqa_pb2.AskStreamRequest, check_answer),
}


def start_stream(channel: grpc.Channel, rpc: str, items: list, timeout: float = CALL_TIMEOUT_S):
    """Start bulk stream ``rpc`` sending ``items`` ((stream request, case) pairs)."""
    method = getattr(STREAMS[rpc][0](channel), rpc)
    return method(iter([message for message, _ in items]), timeout=timeout)


def finish_stream(
    rpc: str, items: list, call, also: frozenset[grpc.StatusCode] = frozenset()
) -> None:
    """Read a stream started by :func:`start_stream` to its end: every item
    gets exactly one answer under its id (fewer when the stream ended with a
    status), each as its unary twin's would be."""
    _, stream_type, check = STREAMS[rpc]
    TALLY.streams += 1
    TALLY.cases[rpc + " items"] += len(items)
    replies, ended = [], None
    try:
        for reply in call:
            replies.append(reply)
    except grpc.RpcError as error:
        ended = error
        # The stream as a whole: only its own limits (or ``also``) may end it.
        details = error.details() or ""
        check_rejection(error.code(), details, violations(error), Case(stream_type()), rpc, also)
    sent = Counter(message.id for message, _ in items)
    answered = Counter(reply.id for reply in replies)
    if ended is None:
        assert answered == sent, (answered, sent)
    else:
        assert not answered - sent, (answered, sent)
    cases: dict[str, list[Case]] = {}
    for message, case in items:
        cases.setdefault(message.id, []).append(case)
    for reply in replies:
        candidates = cases[reply.id]
        if reply.WhichOneof("outcome") == "error":
            error, what = reply.error, rpc + " item"
            _check_any(candidates, lambda c, e=error, w=what: check_item_error(e, c, w, also))
        else:
            assert reply.WhichOneof("outcome") == "response", reply
            TALLY.outcomes[OK.name] += 1
            _check_any(candidates, lambda c, r=reply.response: check(r, c))


def run_stream(channel: grpc.Channel, rpc: str, items: list) -> None:
    """One bulk stream: send ``items`` and check every answer."""
    finish_stream(rpc, items, start_stream(channel, rpc, items))


def _check_any(candidates: list[Case], check) -> None:
    """``check`` holds for one of ``candidates`` (items that share an id)."""
    failures = []
    for case in candidates:
        try:
            check(case)
            return
        except AssertionError as failure:
            failures.append(failure)
    raise failures[0]


@FUZZ
@given(items=caption_streams())
def test_caption_stream(channel, items):
    run_stream(channel, "CaptionStream", items)


@FUZZ
@given(items=ask_streams())
def test_ask_stream(channel, items):
    run_stream(channel, "AskStream", items)


@FUZZ
@given(case=generate_requests("text_to_image"))
def test_generate_text_to_image(channel, case):
    run(channel, "Generate", case)


@FUZZ
@given(case=generate_requests("image_to_image"))
# An init image over the output size limit, with width and height unset: the
# output would take its size.
@example(case=_generate("width", "image_to_image", _png((2400, 64), "L"), steps=1))
@example(case=_generate("height", "inpaint", _png((64, 2400), "L"), steps=1))
def test_generate_image_to_image(channel, case):
    run(channel, "Generate", case)


@FUZZ
@given(case=generate_requests("inpaint"))
def test_generate_inpaint(channel, case):
    run(channel, "Generate", case)


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
@given(case=generate_requests())
def test_generate_any_task(channel, case):
    run(channel, "Generate", case)


@FUZZ
@given(case=embed_images_requests())
# One image past the message limit.
@example(case=Case(align_pb2.EmbedImagesRequest(images=[common_pb2.Image(data=bytes(5 << 20))])))
def test_embed_images(channel, case):
    run(channel, "EmbedImages", case)


@FUZZ
@given(case=embed_texts_requests())
def test_embed_texts(channel, case):
    run(channel, "EmbedTexts", case)


@FUZZ
@given(case=match_requests())
def test_match(channel, case):
    run(channel, "Match", case)


def any_requests() -> st.SearchStrategy[tuple[str, Case]]:
    """A request of any unary or server-streaming RPC, with its name."""
    return st.one_of(
        caption_requests().map(lambda case: ("Caption", case)),
        ask_requests().map(lambda case: ("Ask", case)),
        generate_requests("text_to_image").map(lambda case: ("Generate", case)),
        generate_requests("image_to_image").map(lambda case: ("Generate", case)),
        embed_images_requests().map(lambda case: ("EmbedImages", case)),
        embed_texts_requests().map(lambda case: ("EmbedTexts", case)),
        match_requests().map(lambda case: ("Match", case)),
    )


@settings(FUZZ, max_examples=max(1, EXAMPLES // 4))
@given(cases=st.lists(any_requests(), min_size=2, max_size=8))
def test_concurrent_mix(channel, cases):
    """Good and bad requests in flight together share batches: one request's
    fault must stay its own."""
    pending = [(rpc, case, start(channel, rpc, case)) for rpc, case in cases]
    for rpc, case, wait in pending:
        finish(rpc + " (concurrent)", case, wait, RPCS[rpc][2])


#: What a call whose deadline passes may get besides the usual.
EXPIRED = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED})


def any_streams() -> st.SearchStrategy[tuple[str, list]]:
    """The items of a bulk stream of either kind, with the RPC's name."""
    return st.one_of(
        caption_streams().map(lambda items: ("CaptionStream", items)),
        ask_streams().map(lambda items: ("AskStream", items)),
    )


@settings(FUZZ, max_examples=max(1, EXAMPLES // 4))
@given(
    cases=st.lists(st.tuples(any_requests(), st.floats(0.001, 0.5)), min_size=1, max_size=6),
    streams=st.lists(st.tuples(any_streams(), st.floats(0.001, 0.5)), max_size=2),
)
def test_deadlines_that_pass_mid_request(channel, cases, streams):
    """Calls whose deadline passes while they queue or run end with
    DEADLINE_EXCEEDED, and leave nothing behind: a plain request right after
    is served at once."""
    pending = [(rpc, case, start(channel, rpc, case, timeout)) for (rpc, case), timeout in cases]
    flowing = [
        (rpc, items, start_stream(channel, rpc, items, timeout))
        for (rpc, items), timeout in streams
    ]
    for rpc, case, wait in pending:
        finish(rpc + " (deadline)", case, wait, RPCS[rpc][2], also=EXPIRED)
    for rpc, items, call in flowing:
        finish_stream(rpc, items, call, also=EXPIRED)
    run(channel, "Caption", _caption("OK", max_new_tokens=1))


# ------------------------------------------------------------ wire format


@st.composite
def merged_wire(draw) -> bytes:
    """Well-formed CaptionRequest bytes no client library would write: two
    requests concatenated (the parser merges them), unknown fields of every
    wire type, fields repeated."""
    parts = [draw(caption_requests()).request.SerializeToString()]
    for _ in range(draw(st.integers(0, 3))):
        # Numbers CaptionRequest does not use (1-4 are its fields).
        number = draw(st.sampled_from([5, 15, 99, 2**29 - 1]))
        kind = draw(st.sampled_from(["varint", "fixed64", "bytes", "fixed32"]))
        if kind == "varint":
            body = _varint(draw(st.integers(0, 2**64 - 1)))
        elif kind == "bytes":
            blob = draw(st.binary(max_size=64))
            body = _varint(len(blob)) + blob
        else:
            body = draw(st.binary(min_size=8, max_size=8))[: 8 if kind == "fixed64" else 4]
        wire_type = {"varint": 0, "fixed64": 1, "bytes": 2, "fixed32": 5}[kind]
        parts.append(_varint(number << 3 | wire_type) + body)
    if draw(st.booleans()):
        parts.append(draw(caption_requests()).request.SerializeToString())
    return b"".join(draw(st.permutations(parts)))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def mutated_wire(draw) -> bytes:
    """A serialized CaptionRequest with a few bytes changed, cut or added."""
    data = bytearray(draw(caption_requests()).request.SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(data)))
        if action == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _raw_caption(channel: grpc.Channel):
    return channel.unary_unary("/imago.v1.CaptionService/Caption")


@FUZZ
@given(data=merged_wire())
def test_caption_from_unusual_wire_bytes(channel, data):
    """Bytes that parse follow the same rules as any request, whatever fields
    and unknown fields they hold."""
    case = Case(caption_pb2.CaptionRequest.FromString(data))
    call = _raw_caption(channel).future(data, timeout=CALL_TIMEOUT_S)

    def parsed() -> caption_pb2.CaptionResponse:
        return caption_pb2.CaptionResponse.FromString(call.result())

    finish("Caption (wire)", case, parsed, check_caption)


# ------------------------------------------------------------------ after


def test_server_survived_the_fuzzing(fuzz_server, channel):
    """Still running, SERVING every service, and no frontend traceback."""
    assert fuzz_server.process.poll() is None, fuzz_server.log()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "imago.v1.CaptionService", "imago.v1.ImageGenService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    log = fuzz_server.log()
    # Workers log the tracebacks of requests they fail as INTERNAL, which the
    # cases above already refuse; anything else is a crash somewhere.
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000) :][:8000]
    if TALLY.total:  # the fuzz tests ran (not only this one): each tried its examples
        assert TALLY.total >= EXAMPLES, TALLY.summary()


@settings(FUZZ, max_examples=max(1, EXAMPLES // 4))
@given(data=mutated_wire())
def test_undecodable_wire_bytes_are_invalid_argument(channel, data):
    try:
        caption_pb2.CaptionRequest.FromString(data)
        return  # still a request: see test_caption_from_unusual_wire_bytes
    except DecodeError:
        pass
    TALLY.cases["Caption (undecodable)"] += 1
    with pytest.raises(grpc.RpcError) as caught:
        _raw_caption(channel)(data, timeout=CALL_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
