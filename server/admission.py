"""Turning away at once the requests a worker could not serve in time.

Before a request is queued, :class:`Admission` compares its cost (see
:mod:`imago.server.costs`) with what its model may take:

- ``--max-pixels [MODEL=]N`` bounds a Stable Diffusion request's pixels
  (width x height x images): more is INVALID_ARGUMENT naming ``num_images``
  (``width`` for a single image). The same bound caps the pixels of a batch.
  Without the option the bound suits the device: :data:`CPU_MAX_PIXELS` on
  CPU workers, whose one step at a few megapixels takes minutes, and
  :data:`GPU_MAX_PIXELS` on GPUs.
- Once the model has finished a batch, so that its speed is measured: a
  request whose single step would keep the worker silent for longer than the
  model's watchdog (``--watchdog-s``) is RESOURCE_EXHAUSTED, and one whose
  whole run is estimated to take longer than is left before its deadline is
  DEADLINE_EXCEEDED. Both messages say the estimate. Estimates come from the
  model's measured step times (:class:`~imago.server.costs.StepTimes`) and
  leave out the time spent queued, so a request is refused only when even
  running alone at once it could not make it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from imago.server.costs import StepTimes
from imago.server.errors import RequestError
from imago.workers.contract.jobs import Cost, Job

#: Pixels (width x height x images) a request or batch may have on a CPU
#: worker unless --max-pixels says otherwise: 8 images of 512 x 512.
CPU_MAX_PIXELS = 8 * 512 * 512
#: The same on a GPU worker: 4 images of 2048 x 2048, or 16 of 1024 x 1024.
GPU_MAX_PIXELS = 4 * 2048 * 2048


def default_max_pixels(devices: list[str]) -> int:
    """The pixel bound for workers on ``devices``: the CPU's when any is a CPU."""
    return CPU_MAX_PIXELS if any(d == "cpu" for d in devices) else GPU_MAX_PIXELS


@dataclass(frozen=True)
class ModelLimits:
    """What one model may be asked: ``max_pixels`` (None: no bound; image
    models only) and the watchdog's ``watchdog_s`` seconds of silence."""

    max_pixels: int | None = None
    watchdog_s: float | None = None


class Admission:
    """Checks requests against their model's limits and measured speed."""

    def __init__(self, limits: dict[str, ModelLimits], step_times: StepTimes) -> None:
        self._limits = dict(limits)
        self.step_times = step_times

    def limits(self, model: str) -> ModelLimits:
        return self._limits.get(model, ModelLimits())

    def check(self, model: str, job: Job, deadline: float | None = None) -> Cost:
        """The cost of ``job`` on ``model``, or RequestError when it must be
        turned away; ``deadline`` is a ``time.monotonic()`` instant."""
        cost = job.cost()
        limits = self.limits(model)
        if limits.max_pixels is not None and cost.pixels > limits.max_pixels:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{cost.summary.rsplit(',', 1)[0]} make {cost.pixels / 1e6:.2f} megapixels; "
                f"{model} takes at most {limits.max_pixels / 1e6:.2f} megapixels a request "
                "here (--max-pixels)",
                "num_images" if cost.output_images > 1 else "width",
            )
        speed = self.step_times.of(model)
        if speed is None:
            return cost
        step_s = speed.step_seconds(cost.step_units)
        if limits.watchdog_s is not None and step_s > limits.watchdog_s:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"one step of {cost.summary} would take about {step_s:.1f}s on {model}, "
                f"longer than a worker may go silent ({limits.watchdog_s:g}s, --watchdog-s)",
            )
        if deadline is not None:
            left = deadline - time.monotonic()
            estimate = speed.seconds(cost)
            if estimate > left:
                raise RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{cost.summary} would take about {estimate:.2f}s on {model}, "
                    f"more than the {max(left, 0):.2f}s left before the deadline",
                )
        return cost
