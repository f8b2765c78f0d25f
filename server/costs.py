"""What a request costs a worker, and how long a model takes for it.

A job runs in *steps* (denoising steps, or new tokens), each of which does
some *step units* of work for it: each kind of job counts its own (its
``cost()``, a :class:`~imago.workers.contract.jobs.Cost`, which says how).
A job's *units* (steps x step units) are what it weighs in the fair order
of its model's queue.

:class:`StepTimes` learns each model's seconds per step as an affine
function of the step units in it, ``a + b x units``, from the last
:data:`StepTimes.WINDOW` batches the model finished. A batch's seconds per
step are measured between its first and last progress report where it sends
them (Stable Diffusion), which leaves out encoding prompts, decoding and
encoding images and the first step's warm-up; otherwise they are its seconds
over its steps. ``a`` holds what a step costs whatever its size (kernel
launches, Python), ``b`` what each unit adds. The fit is robust (the median
of the slopes between batches of clearly different sizes, and the median
intercept), both are kept at zero or above, and while no two batches differed
enough in size, all of the time is put in ``a``: that can under-estimate
larger requests, never refuse one that would have fitted. Torch-free.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from imago.workers.contract.jobs import Cost


@dataclass(frozen=True)
class StepTime:
    """Seconds per step: ``overhead_s`` + ``per_unit_s`` x step units."""

    overhead_s: float
    per_unit_s: float

    def step_seconds(self, step_units: float) -> float:
        return self.overhead_s + self.per_unit_s * step_units

    def seconds(self, cost: Cost) -> float:
        """Estimated seconds for ``cost`` run alone."""
        return cost.steps * self.step_seconds(cost.step_units)


class StepTimes:
    """Each model's :class:`StepTime`, fitted to the batches it finished."""

    #: Batches remembered per model.
    WINDOW = 32

    def __init__(self) -> None:
        self._seen: dict[str, deque[tuple[float, float]]] = {}

    def observe(self, model: str, costs: list[Cost], step_seconds: float) -> None:
        """One step of a batch of requests costing ``costs`` took
        ``step_seconds`` on ``model``."""
        units = sum(cost.step_units for cost in costs)
        if units > 0 and step_seconds > 0:
            seen = self._seen.setdefault(model, deque(maxlen=self.WINDOW))
            seen.append((units, step_seconds))

    def of(self, model: str) -> StepTime | None:
        """``model``'s step time; None before it finished a batch."""
        seen = self._seen.get(model)
        if not seen:
            return None
        return fit([units for units, _ in seen], [step_s for _, step_s in seen])


#: Batches whose step units differ by less than this factor give no slope.
SLOPE_SPREAD = 1.5


def fit(units: list[float], step_s: list[float]) -> StepTime:
    """A robust fit of ``step_s ≈ a + b x units`` with ``a, b >= 0``: ``b`` is
    the median slope between points whose units differ by a factor of at
    least :data:`SLOPE_SPREAD` (0 without such a pair), ``a`` the median of
    ``step_s - b x units``."""
    points = sorted(zip(units, step_s, strict=True))
    slopes = [
        (s2 - s1) / (u2 - u1)
        for i, (u1, s1) in enumerate(points)
        for u2, s2 in points[i + 1 :]
        if u2 >= u1 * SLOPE_SPREAD
    ]
    slope = max(0.0, statistics.median(slopes)) if slopes else 0.0
    overhead = statistics.median(s - slope * u for u, s in points)
    return StepTime(max(0.0, overhead), slope)
