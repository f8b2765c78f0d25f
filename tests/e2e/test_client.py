"""The Python clients against a real server: blocking and asyncio, and what
a client that walks away leaves behind."""

from __future__ import annotations

import asyncio

import pytest
from conftest import png_bytes

from imago.client import AsyncImagoClient, DiffusionOptions, ImagoClient, TextOptions


def test_async_client_captions_asks_and_streams_a_generation(server):
    async def scenario():
        async with AsyncImagoClient(server.target, timeout=120) as client:
            caption, answer = await asyncio.gather(
                client.caption(png_bytes(), generation=TextOptions(num_beams=2)),
                client.ask(png_bytes(), "what is this?"),
            )
            events = [
                e
                async for e in client.generate("a fox", diffusion=DiffusionOptions(steps=3, seed=5))
            ]
            health = await client.health("imago.v1.CaptionService")
        return caption, answer, events, health

    caption, answer, events, health = asyncio.run(scenario())
    assert caption.captions[0].text and answer.answers[0].text
    assert [e.WhichOneof("event") for e in events][-1] == "result"
    assert events[-1].result.images[0].seed == 5
    assert health == "SERVING"


def test_sync_client_rejects_an_unknown_generation_keyword(server):
    with ImagoClient(server.target) as client, pytest.raises(TypeError, match="beams"):
        client.caption(png_bytes(), beams=3)


def test_cancelled_generation_stops_and_frees_the_worker(server):
    with ImagoClient(server.target, timeout=300) as client:
        stream = client.generate(
            "a long walk", diffusion=DiffusionOptions(steps=150, width=256, height=256)
        )
        step_seconds = []
        for event in stream:
            if event.HasField("progress"):
                step_seconds.append(event.progress.elapsed_seconds)
                if len(step_seconds) == 3:
                    break
        stream.close()  # leaving the stream cancels the call
        per_step = (step_seconds[-1] - step_seconds[0]) / 2
        follow_up = client.generate_result("a short walk", diffusion=DiffusionOptions(steps=2))
    # Had the cancelled run gone on, the follow-up would have queued behind its
    # remaining ~147 steps; it waited for the step in progress (a few at most
    # on a busy machine).
    assert follow_up.info.queue_seconds < 5 * per_step
