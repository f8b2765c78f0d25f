"""Bulk streams: concurrency, in-band errors, and bounded buffering."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from imago.server.dispatch import bulk
from imago.server.errors import invalid


@dataclass
class Item:
    id: str
    request: int


@dataclass
class Out:
    id: str
    response: int | None = None
    error: object | None = None


def test_results_come_back_with_their_ids_errors_in_band():
    async def handle(value: int) -> int:
        if value < 0:
            raise invalid("value", "must not be negative")
        await asyncio.sleep(0.01 * (3 - value))  # later items finish first
        return value * 10

    async def items():
        for value in (0, 1, -1, 2):
            yield Item(str(value), value)

    async def scenario():
        return [out async for out in bulk(items(), handle, Out, window=8)]

    outs = {o.id: o for o in asyncio.run(scenario())}
    assert {k: o.response for k, o in outs.items() if o.error is None} == {"0": 0, "1": 10, "2": 20}
    assert outs["-1"].error.field == "value"
    assert outs["-1"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_an_unexpected_failure_becomes_an_internal_item_error():
    async def handle(value: int) -> int:
        raise KeyError("bug")

    async def items():
        yield Item("a", 1)

    async def scenario():
        return [out async for out in bulk(items(), handle, Out, window=2)]

    (out,) = asyncio.run(scenario())
    assert out.error.code == grpc.StatusCode.INTERNAL.value[0]


def test_a_client_that_stops_reading_results_stops_being_read():
    pulled = []

    async def handle(value: int) -> int:
        return value

    async def items():
        for value in range(1000):
            pulled.append(value)
            yield Item(str(value), value)

    async def scenario():
        stream = bulk(items(), handle, Out, window=4)
        first = await stream.__anext__()
        await asyncio.sleep(0.1)  # plenty of time to read everything, were it allowed
        await stream.aclose()
        return first

    asyncio.run(scenario())
    assert len(pulled) <= 4 + 1
