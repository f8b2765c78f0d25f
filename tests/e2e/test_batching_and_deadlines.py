"""Batching, queue bounds, deadlines and cancellation through a real server.

The session server has one worker holding both models, so a long generation
keeps it busy while other requests queue up behind it; releasing the worker
then shows what the scheduler makes of the queue.
"""

from __future__ import annotations

import asyncio
import io
import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import grpc
import numpy as np
import pytest
from conftest import png_bytes, start_server
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from imago.client import DiffusionOptions, PreviewOptions
from imago.client.api import AsyncImagoClient, ImagoClient
from imago.v1 import caption_pb2, caption_pb2_grpc, common_pb2

COLOURS = [(200, 30, 60), (20, 40, 220), (240, 240, 20), (10, 10, 10), (30, 200, 90)]
QUESTION = "what colour is it?"


def hold_worker(target: str, size: int = 256) -> Callable[[], None]:
    """Start a long generation (150 steps of ``size`` pixels square) and return
    once it runs; the returned function cancels it, which frees the worker
    within one denoising step."""
    client = ImagoClient(target, timeout=300)
    stream = client.generate(
        "hold the worker", diffusion=DiffusionOptions(steps=150, width=size, height=size)
    )
    for event in stream:
        if event.HasField("started"):
            break

    def release() -> None:
        stream.close()
        client.close()

    return release


def pixels(image: common_pb2.Image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"), dtype=np.int16)


def event_kinds(events) -> list[str]:
    return [event.WhichOneof("event") for event in events]


# ------------------------------------------------------------------ batching


def test_captions_and_questions_from_different_clients_share_one_batch(server):
    images = [png_bytes(color=colour) for colour in COLOURS]
    with ImagoClient(server.target, timeout=120) as client:
        alone = [client.caption(image) for image in images]
        alone_answer = client.ask(images[0], QUESTION)
    assert {reply.info.batch_size for reply in alone} == {1}

    async def together():
        clients = [AsyncImagoClient(server.target, timeout=120) for _ in range(len(images) + 1)]
        release = hold_worker(server.target)
        calls = [client.caption(image) for client, image in zip(clients, images, strict=False)]
        calls.append(clients[-1].ask(images[0], QUESTION))
        tasks = [asyncio.ensure_future(call) for call in calls]
        await asyncio.sleep(1.0)  # every request is now queued behind the generation
        release()
        replies = await asyncio.gather(*tasks)
        for client in clients:
            await client.close()
        return replies

    *captions, answer = asyncio.run(together())
    assert {reply.info.batch_size for reply in [*captions, answer]} == {len(images) + 1}
    assert len({reply.info.worker for reply in [*captions, answer]}) == 1
    # Batching never changes what a request gets.
    assert [c.captions[0].text for c in captions] == [a.captions[0].text for a in alone]
    assert answer.answers[0].text == alone_answer.answers[0].text


def test_items_of_a_bulk_stream_are_batched_together(server):
    stub = caption_pb2_grpc.CaptionServiceStub(server.channel())
    requests = [
        caption_pb2.CaptionStreamRequest(
            id=str(i),
            request=caption_pb2.CaptionRequest(image=common_pb2.Image(data=png_bytes(color=c))),
        )
        for i, c in enumerate(COLOURS)
    ]
    release = hold_worker(server.target)
    replies = stub.CaptionStream(iter(requests), timeout=120)
    time.sleep(1.0)  # the stream's items are queued behind the generation
    release()
    sizes = {reply.id: reply.response.info.batch_size for reply in replies}
    assert sizes == {str(i): len(COLOURS) for i in range(len(COLOURS))}


def noisy_png(seed: int) -> bytes:
    """A ~30 KB PNG: noise does not compress, so few fit in transport buffers."""
    noise = np.random.default_rng(seed).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    return png_bytes_of(noise)


def png_bytes_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def caption_items(count: int, pulled: list[int]):
    """``count`` stream items, noting in ``pulled`` each one gRPC takes."""
    images = [noisy_png(seed) for seed in range(8)]
    settings = common_pb2.GenerationSettings(max_new_tokens=3)
    for i in range(count):
        pulled.append(i)
        request = caption_pb2.CaptionRequest(
            image=common_pb2.Image(data=images[i % 8]), generation=settings
        )
        yield caption_pb2.CaptionStreamRequest(id=str(i), request=request)


def test_a_bulk_stream_stops_being_read_while_its_window_is_full(server):
    stub = caption_pb2_grpc.CaptionServiceStub(server.channel())
    # Held for far longer than the test waits (the tiny model's 512-pixel steps).
    release = hold_worker(server.target, size=512)
    pulled: list[int] = []
    try:
        replies = stub.CaptionStream(caption_items(3000, pulled), timeout=300)
        time.sleep(2.0)
        early = len(pulled)
        time.sleep(1.5)
        late = len(pulled)
    finally:
        release()
    # Nothing finishes while the worker is held, so the server takes its
    # window of 64 items and HTTP/2 flow control then holds the client back
    # (the transport buffers a few MB in between). A server reading without
    # bound would have taken all 3,000.
    assert late == early
    assert 64 <= late < 3000
    ids = {reply.id for reply in replies if reply.HasField("response")}
    assert ids == {str(i) for i in range(3000)}


def test_a_long_bulk_stream_keeps_the_worker_busy_with_full_batches(server):
    stub = caption_pb2_grpc.CaptionServiceStub(server.channel())
    replies = list(stub.CaptionStream(caption_items(1000, []), timeout=300))
    sizes = [reply.response.info.batch_size for reply in replies]
    assert len(sizes) == 1000 and min(sizes) >= 1
    # Items are answered one by one only if the stream is not pipelined.
    assert sum(sizes) / len(sizes) >= 16


def test_compatible_generations_share_a_batch_and_keep_their_own_streams(server):
    jobs = [
        {"prompt": "a red fox", "seed": 11, "num_images": 1},
        {"prompt": "a blue whale in deep water", "seed": 42, "num_images": 2},
    ]
    shape = DiffusionOptions(steps=3, width=64, height=64)
    every_step = PreviewOptions(every_n_steps=1)

    def options(job: dict) -> dict:
        diffusion = replace(shape, seed=job["seed"], num_images=job["num_images"])
        return {"diffusion": diffusion, "previews": every_step}

    with ImagoClient(server.target, timeout=120) as client:
        alone = [client.generate_result(job["prompt"], **options(job)) for job in jobs]
    assert {result.info.batch_size for result in alone} == {1}

    async def one(job: dict) -> list:
        async with AsyncImagoClient(server.target, timeout=120) as client:
            return [event async for event in client.generate(job["prompt"], **options(job))]

    async def together():
        release = hold_worker(server.target)
        tasks = [asyncio.ensure_future(one(job)) for job in jobs]
        await asyncio.sleep(1.0)
        release()
        return await asyncio.gather(*tasks)

    streams = asyncio.run(together())
    for events, reference, job in zip(streams, alone, jobs, strict=True):
        kinds = [k for k in event_kinds(events) if k != "queued"]
        assert kinds == ["started"] + ["progress", "preview"] * 3 + ["result"]
        result = events[-1].result
        assert result.info.batch_size == 2
        assert [image.seed for image in result.images] == [
            job["seed"] + i for i in range(job["num_images"])
        ]
        for got, want in zip(result.images, reference.images, strict=True):
            difference = np.abs(pixels(got.image) - pixels(want.image)).max()
            assert difference <= 1, f"batched image differs by {difference}/255"
    # Each stream previews its own image, not its neighbour's.
    first_previews = [
        next(e.preview.image.data for e in s if e.HasField("preview")) for s in streams
    ]
    assert first_previews[0] != first_previews[1]


# ------------------------------------------------------------- positions, bounds


def test_queued_events_follow_the_position_as_the_queue_moves(server):
    release = hold_worker(server.target)
    with ImagoClient(server.target, timeout=120) as client:
        # Different sizes cannot share a batch, so they leave the queue one by one.
        first = client.generate("first", diffusion=DiffusionOptions(steps=2, width=64, height=64))
        second = client.generate("second", diffusion=DiffusionOptions(steps=2, width=72, height=72))
        assert next(first).queued.position == 0
        assert next(second).queued.position == 1
        release()
        list(first)
        later = list(second)
    positions = [e.queued.position for e in later if e.HasField("queued")]
    assert positions == [0]
    assert event_kinds(later)[-1] == "result"


def test_a_full_queue_turns_a_request_away_at_once_with_retry_info(model_cache, tmp_path):
    server = start_server(model_cache, tmp_path, "--workers", "1", "--max-queue", "1")
    try:
        release = hold_worker(server.target)
        with ImagoClient(server.target, timeout=120) as client:
            waiting = client.generate(
                "waits its turn", diffusion=DiffusionOptions(steps=2, width=64, height=64)
            )
            assert next(waiting).queued.position == 0
            with pytest.raises(grpc.RpcError) as caught:
                list(
                    client.generate(
                        "one too many", diffusion=DiffusionOptions(steps=2, width=72, height=72)
                    )
                )
            release()
            # Nothing else was disturbed: the waiting request completes.
            assert event_kinds(waiting)[-1] == "result"
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = rpc_status.from_call(caught.value).details
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details)
    finally:
        assert server.stop() == 0


def test_work_spreads_over_every_worker_holding_the_model(model_cache, tmp_path):
    server = start_server(model_cache, tmp_path, "--workers", "2")
    try:
        with ImagoClient(server.target, timeout=120) as client:
            # SERVING comes with the first loaded worker; wait for the second.
            seen: set[str] = set()
            for _ in range(300):
                seen.add(client.caption(png_bytes()).info.worker)
                if len(seen) == 2:
                    break
                time.sleep(0.1)
            one_by_one = [client.caption(png_bytes()).info.worker for _ in range(4)]

        async def generate(prompt: str, timeline: list) -> None:
            async with AsyncImagoClient(server.target, timeout=120) as client:
                async for event in client.generate(
                    prompt, diffusion=DiffusionOptions(steps=10, width=128, height=128)
                ):
                    timeline.append((prompt, event.WhichOneof("event"), event))

        async def side_by_side() -> list:
            timeline: list = []
            await asyncio.gather(generate("a", timeline), generate("b", timeline))
            return timeline

        timeline = asyncio.run(side_by_side())
    finally:
        assert server.stop() == 0
    # The longest-idle worker takes the next request.
    first, second = one_by_one[:2]
    assert {first, second} == {"worker-0", "worker-1"}
    assert one_by_one == [first, second, first, second]
    kinds = [(prompt, kind) for prompt, kind, _ in timeline]
    first_result = next(i for i, (_, kind) in enumerate(kinds) if kind == "result")
    assert {("a", "started"), ("b", "started")} <= set(kinds[:first_result])
    results = [e.result.info for _, kind, e in timeline if kind == "result"]
    assert {info.worker for info in results} == {"worker-0", "worker-1"}, results


# ------------------------------------------------------------------ deadlines


def test_a_deadline_passing_in_the_queue_frees_the_place(server):
    release = hold_worker(server.target)
    try:
        with (
            ImagoClient(server.target, timeout=1.0) as impatient,
            ImagoClient(server.target, timeout=120) as patient,
        ):
            doomed = impatient.generate(
                "never runs", diffusion=DiffusionOptions(steps=2, width=64, height=64)
            )
            assert next(doomed).queued.position == 0
            behind = patient.generate(
                "behind it", diffusion=DiffusionOptions(steps=2, width=72, height=72)
            )
            assert next(behind).queued.position == 1
            with pytest.raises(grpc.RpcError) as caught:
                list(doomed)
            # The expired request left the queue while the worker was still busy.
            assert next(behind).queued.position == 0
    finally:
        release()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_deadline_passing_mid_generation_stops_it_and_frees_the_worker(server):
    size = DiffusionOptions(width=512, height=512)
    with ImagoClient(server.target, timeout=300) as client:
        timing = []
        client.generate_result("timing", diffusion=replace(size, steps=3), on_event=timing.append)
    steps = [e.progress.elapsed_seconds for e in timing if e.HasField("progress")]
    step_s = (steps[-1] - steps[0]) / 2
    # The server refuses at once a run it estimates longer than its deadline;
    # ask it for its estimate of this one.
    with ImagoClient(server.target, timeout=0.05) as probe:
        with pytest.raises(grpc.RpcError) as refused:
            probe.generate_result("too long", diffusion=replace(size, steps=150))
    estimate = re.search(r"would take about ([0-9.]+)s", refused.value.details() or "")
    assert estimate, refused.value.details()
    # Long enough for the whole run, so it is queued; but it waits behind a
    # longer run until only some ten steps' time is left.
    deadline = float(estimate.group(1)) + 2.0
    release = hold_worker(server.target, size=768)
    threading.Timer(deadline - (1.5 + 10 * step_s), release).start()
    with ImagoClient(server.target, timeout=deadline) as hurried:
        progress = []
        with pytest.raises(grpc.RpcError) as caught:
            for event in hurried.generate("too long", diffusion=replace(size, steps=150)):
                if event.HasField("progress"):
                    progress.append(event.progress)
    expired_at = time.monotonic()
    with ImagoClient(server.target, timeout=120) as client:
        follow_up = client.generate_result(
            "next", diffusion=DiffusionOptions(steps=2, width=64, height=64)
        )
    waited = time.monotonic() - expired_at
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert progress and progress[-1].step < 150
    per_step = progress[-1].elapsed_seconds / progress[-1].step
    # Had the expired run gone on, the follow-up would have waited for its
    # remaining steps; it waited for a few at most.
    remaining = (150 - progress[-1].step) * per_step
    assert waited < remaining / 4, f"follow-up waited {waited:.2f}s of {remaining:.2f}s"
    assert follow_up.images


# ------------------------------------------------------------------ cancellation


def test_a_client_that_cancels_while_queued_leaves_the_batch_to_the_others(server):
    images = [png_bytes(color=colour) for colour in COLOURS[:3]]
    with ImagoClient(server.target, timeout=120) as client:
        alone = [client.caption(image).captions[0].text for image in images[1:]]

    async def scenario():
        clients = [AsyncImagoClient(server.target, timeout=120) for _ in images]
        release = hold_worker(server.target)
        tasks = [
            asyncio.ensure_future(client.caption(image))
            for client, image in zip(clients, images, strict=True)
        ]
        await asyncio.sleep(1.0)  # all three are queued behind the generation
        tasks[0].cancel()
        await asyncio.sleep(0.2)
        release()
        replies = await asyncio.gather(*tasks[1:])
        for client in clients:
            await client.close()
        return tasks[0], replies

    cancelled, replies = asyncio.run(scenario())
    assert cancelled.cancelled()
    assert [r.captions[0].text for r in replies] == alone
    assert {r.info.batch_size for r in replies} == {2}
