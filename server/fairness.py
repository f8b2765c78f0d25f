"""Fair sharing of the workers: between models, and between clients of one model.

Both levels use start-time fair queuing (Goyal, Vin and Cheng, 1996): every
party keeps a *finish tag*, the virtual time by which what it was given so
far would be paid for at its fair share; the party with the lowest tag goes
next, and a party that was idle re-enters at the current virtual time, so
that idling banks no credit.

- :class:`FairQueue` orders one model's waiting tickets. The parties are
  *flows*: unary calls belong to the client connection they came on (the
  peer address), and the items of a bulk stream to a flow of the stream's
  own, so a stream competes with its own client's single calls too. A
  ticket's start tag is the later of the queue's virtual time and its flow's
  finish tag; its flow's tag then grows by the ticket's work units. Tickets
  leave in start-tag order (arrival order among equal tags), so one client's
  2,000-item stream queues behind itself while a single call from another
  connection starts with the next batch.
- :class:`ModelShares` picks the model whose batch a free worker runs next
  when it holds several. A batch is charged its estimated seconds divided by
  the model's weight (``--model-weight``, 1 by default), corrected to the
  measured seconds once the batch is done. A model whose queue fills while
  another is backlogged therefore waits for at most the batch running now,
  never for the other's backlog, and in a long overload each model gets
  worker time in proportion to its weight.

Pure logic; the :class:`~imago.server.scheduler.Scheduler` drives it.
"""

from __future__ import annotations

import bisect
import contextvars
import itertools
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_flow: contextvars.ContextVar[str] = contextvars.ContextVar("imago_flow", default="")


def current_flow() -> str:
    """The flow of the request served in this context ("" outside one)."""
    return _flow.get()


def set_flow(flow: str) -> None:
    """Make ``flow`` the flow of requests made in this context from now on."""
    _flow.set(flow)


#: Flows remembered per queued item before those with nothing queued are dropped.
FLOWS_PER_ITEM = 4


class FairQueue(Generic[T]):
    """Items in start-tag order over flows, as the module describes."""

    def __init__(self) -> None:
        # (start tag, arrival number, item), sorted; the number breaks ties.
        self._entries: list[tuple[float, int, T]] = []
        self._arrivals = itertools.count()
        self._finish: dict[str, float] = {}
        # The flow of each queued item, by the item's id.
        self._flows: dict[int, str] = {}
        self._virtual = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[T]:
        return (item for _, _, item in self._entries)

    def __contains__(self, item: object) -> bool:
        return any(entry[2] == item for entry in self._entries)

    def head(self) -> T:
        """The item that goes next; IndexError when empty."""
        return self._entries[0][2]

    def push(self, item: T, flow: str, units: float) -> float:
        """Queue ``item`` of ``flow`` costing ``units``; return its start tag."""
        start = max(self._virtual, self._finish.get(flow, 0.0))
        self._finish[flow] = start + units
        self._flows[id(item)] = flow
        bisect.insort(self._entries, (start, next(self._arrivals), item), key=_tag)
        return start

    def remove(self, item: T) -> bool:
        """Take ``item`` out without serving it; False when it is not queued."""
        for index, entry in enumerate(self._entries):
            if entry[2] == item:
                del self._entries[index]
                self._flows.pop(id(entry[2]), None)
                return True
        return False

    def take(self, items: list[T]) -> None:
        """``items`` (queued) leave to be served: virtual time moves to the
        latest of their start tags, and flows that are paid up are forgotten."""
        served = [entry for entry in self._entries if entry[2] in items]
        self._entries = [entry for entry in self._entries if entry[2] not in items]
        for _, _, item in served:
            self._flows.pop(id(item), None)
        if served:
            self._virtual = max(self._virtual, max(start for start, _, _ in served))
        # A flow whose tag is behind virtual time would re-enter at virtual
        # time anyway, and with nothing queued nobody is owed anything.
        self._finish = {flow: tag for flow, tag in self._finish.items() if tag > self._virtual}
        if not self._entries:
            self._finish.clear()
        elif len(self._finish) > FLOWS_PER_ITEM * len(self._entries):
            # Many flows that came and went while the backlog stayed: those
            # with nothing queued lose what they were ahead by, so that the
            # table stays bounded by the backlog.
            queued = set(self._flows.values())
            self._finish = {flow: tag for flow, tag in self._finish.items() if flow in queued}


def _tag(entry: tuple[float, int, object]) -> tuple[float, int]:
    return entry[0], entry[1]


class ModelShares:
    """Which model's batch goes next, as the module describes."""

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        """``weights`` by model name; models it does not name weigh 1."""
        self._weights = dict(weights or {})
        self._finish: dict[str, float] = {}
        self._virtual = 0.0

    def weight(self, model: str) -> float:
        return self._weights.get(model, 1.0)

    def backlogged(self, model: str) -> None:
        """``model``'s queue was empty and has a request now."""
        self._finish[model] = max(self._finish.get(model, 0.0), self._virtual)

    def tag(self, model: str) -> float:
        """Virtual start time of ``model``'s next batch; lowest goes first."""
        return max(self._finish.get(model, 0.0), self._virtual)

    def charge(self, model: str, seconds: float) -> None:
        """A batch of ``model`` estimated at ``seconds`` was handed to a worker."""
        start = self.tag(model)
        self._virtual = start
        self._finish[model] = start + seconds / self.weight(model)

    def correct(self, model: str, seconds: float) -> None:
        """A batch of ``model`` took ``seconds`` more than it was charged (less
        when negative)."""
        if model in self._finish:
            self._finish[model] += seconds / self.weight(model)
