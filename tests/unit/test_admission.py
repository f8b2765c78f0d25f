"""Request costs, measured step times, and refusing what cannot fit."""

from __future__ import annotations

import time

import grpc
import pytest
from conftest import serve_once

from imago.server.admission import (
    CPU_MAX_PIXELS,
    GPU_MAX_PIXELS,
    Admission,
    ModelLimits,
    default_max_pixels,
)
from imago.server.config import ServeConfig, resolve_pixel_limits
from imago.server.costs import StepTimes, fit
from imago.server.errors import RequestError
from imago.workers.contract.jobs import (
    REFERENCE_PIXELS,
    CaptionJob,
    Cost,
    DiffusionParams,
    EmbedImagesJob,
    ImageToImageJob,
    MatchJob,
    TextSettings,
    TextToImageJob,
)
from imago.workers.contract.presets import preset


def image_job(size=512, images=1, steps=20, guidance=7.5, **more) -> TextToImageJob:
    kind = ImageToImageJob if "strength" in more else TextToImageJob
    params = DiffusionParams(width=size, height=size, steps=steps, guidance_scale=guidance)
    return kind("a fox", "", params, seed=0, num_images=images, **more)


def text_job(tokens=30, beams=1, sequences=1) -> CaptionJob:
    settings = TextSettings(tokens, 0, beams, False, 1.0, 1.0, 50, 1.0, sequences, 1.0, 0)
    return CaptionJob("", settings)


def measured(model: str, step_s_by_units: dict[float, float]) -> StepTimes:
    """Step times of ``model`` having run one-step batches of these units in these seconds."""
    times = StepTimes()
    for units, step_s in step_s_by_units.items():
        times.observe(model, [Cost(steps=1, step_units=units)], step_s)
    return times


# ------------------------------------------------------------------ costs


def test_an_image_step_costs_its_pixels_over_512_squared_twice_with_guidance():
    cost = image_job(size=1024, images=2, steps=30).cost()
    assert cost.step_units == 2 * (1024 * 1024 / REFERENCE_PIXELS) * 2
    assert cost.steps == 30 and cost.units == 30 * cost.step_units
    assert cost.pixels == 2 * 1024 * 1024


def test_an_image_without_guidance_runs_one_pass_a_step():
    assert image_job(guidance=1.0).cost().step_units == 1.0


def test_image_to_image_costs_only_the_steps_it_runs():
    assert image_job(steps=20, strength=0.5).cost().steps == 10


def test_text_costs_its_tokens_and_one_more_times_the_sequences_side_by_side():
    cost = text_job(tokens=30, beams=4, sequences=2).cost()
    assert (cost.steps, cost.step_units, cost.pixels) == (31, 4, 0)


def test_alignment_costs_its_inputs_and_the_pairs_it_scores():
    assert EmbedImagesJob(images=3).cost().units == 3
    assert MatchJob(images=2, texts=("a", "b", "c")).cost().units == 5
    assert MatchJob(images=2, texts=("a", "b", "c"), image_text_matching=True).cost().units == 11


# ------------------------------------------------------------------ step times


def test_step_time_is_unknown_before_a_model_finished_a_batch():
    assert StepTimes().of("sd") is None


def test_a_fit_recovers_overhead_and_cost_per_unit():
    speed = fit([1, 2, 4, 8], [0.01 + 0.1 * u for u in (1, 2, 4, 8)])
    assert speed.overhead_s == pytest.approx(0.01)
    assert speed.per_unit_s == pytest.approx(0.1)


def test_batches_of_one_size_put_all_of_the_time_in_the_overhead():
    speed = fit([0.03, 0.03, 0.04], [0.02, 0.5, 0.9])
    assert speed.per_unit_s == 0.0
    assert speed.overhead_s == 0.5


def test_one_slow_batch_does_not_tilt_the_fit():
    units = [1, 2, 4, 8, 1, 2, 4, 8]
    step_s = [0.01 + 0.1 * u for u in units]
    step_s[0] = 5.0  # a first call's warm-up
    speed = fit(units, step_s)
    assert speed.per_unit_s == pytest.approx(0.1, rel=0.05)
    assert speed.overhead_s < 0.1


def test_a_falling_slope_counts_as_none():
    assert fit([1, 4], [0.5, 0.2]).per_unit_s == 0.0


# ------------------------------------------------------------------ admission


def test_requests_over_the_pixel_bound_are_refused_naming_num_images():
    admission = Admission({"sd": ModelLimits(max_pixels=CPU_MAX_PIXELS)}, StepTimes())
    with pytest.raises(RequestError) as caught:
        admission.check("sd", image_job(size=2048, images=8, steps=150))
    error = caught.value
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "num_images")
    assert "33.55 megapixels" in error.message and "--max-pixels" in error.message


def test_a_single_image_over_the_pixel_bound_names_width():
    admission = Admission({"sd": ModelLimits(max_pixels=CPU_MAX_PIXELS)}, StepTimes())
    with pytest.raises(RequestError) as caught:
        admission.check("sd", image_job(size=2048))
    assert caught.value.field == "width"


def test_requests_within_the_pixel_bound_pass_before_any_measurement():
    admission = Admission({"sd": ModelLimits(max_pixels=CPU_MAX_PIXELS, watchdog_s=1)}, StepTimes())
    deadline = time.monotonic() + 0.001
    assert admission.check("sd", image_job(size=512, images=8), deadline).pixels == CPU_MAX_PIXELS


def test_a_step_longer_than_the_watchdog_is_refused_with_the_estimate():
    times = measured("sd", {1.0: 0.5, 4.0: 2.0})
    admission = Admission({"sd": ModelLimits(watchdog_s=10.0)}, times)
    with pytest.raises(RequestError) as caught:
        # 8 images of 1024 px with guidance: 64 units a step, about 32 s.
        admission.check("sd", image_job(size=1024, images=8))
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "about 32.0s" in caught.value.message and "10s" in caught.value.message


def test_a_request_that_cannot_finish_before_its_deadline_is_refused_with_the_estimate():
    admission = Admission({}, measured("sd", {1.0: 0.5, 4.0: 2.0}))
    # 150 steps of 2 units: about 150 s.
    with pytest.raises(RequestError) as caught:
        admission.check("sd", image_job(steps=150), deadline=time.monotonic() + 2.0)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "about 150.00s" in caught.value.message


def test_a_request_that_fits_its_deadline_is_admitted_with_its_cost():
    admission = Admission({}, measured("sd", {1.0: 0.5, 4.0: 2.0}))
    cost = admission.check("sd", image_job(steps=4), deadline=time.monotonic() + 60)
    assert cost.units == 8


def test_other_models_measurements_do_not_count():
    admission = Admission({}, measured("sd", {1.0: 50.0}))
    assert admission.check("other", image_job(steps=150), time.monotonic() + 0.5)


# ------------------------------------------------------------------ configuration


def test_the_pixel_bound_defaults_to_the_cpus_when_a_worker_is_on_a_cpu():
    assert default_max_pixels(["cpu"]) == CPU_MAX_PIXELS
    assert default_max_pixels(["cuda:0", "cuda:1"]) == GPU_MAX_PIXELS


def test_max_pixels_entries_apply_to_stable_diffusion_models_only():
    models = preset("tiny")
    assert resolve_pixel_limits(("sd-tiny=1000000",), models, default=5) == {"sd-tiny": 1_000_000}
    assert resolve_pixel_limits((), models, default=5) == {"sd-tiny": 5}
    with pytest.raises(ValueError, match="unknown model 'blip2-tiny'"):
        resolve_pixel_limits(("blip2-tiny=1000000",), models, default=5)
    with pytest.raises(ValueError, match="N >= 4096"):
        resolve_pixel_limits(("100",), models, default=5)


def test_model_weights_default_to_one_and_must_be_positive():
    assert ServeConfig(model_weights=("sd-tiny=0.5",)).resolve().weights == {
        "blip2-tiny": 1.0,
        "sd-tiny": 0.5,
        "blip2-itm-tiny": 1.0,
    }
    with pytest.raises(ValueError, match="W > 0"):
        ServeConfig(model_weights=("0",)).resolve()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--max-pixels", "blip2-tiny=1000000"], "--max-pixels 'blip2-tiny=1000000' names unknown"),
        (["--max-pixels", "lots"], "--max-pixels 'lots' is not [MODEL=]N"),
        (["--model-weight", "sd-tiny=-1"], "--model-weight 'sd-tiny=-1' is not [MODEL=]W"),
    ],
)
def test_imago_serve_exits_2_naming_a_bad_fairness_or_admission_option(argv, named):
    result = serve_once(*argv)
    assert result.returncode == 2
    assert named in result.stderr
