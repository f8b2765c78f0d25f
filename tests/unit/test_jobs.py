"""What each kind of job says about itself: batch keys, weights, texts, steps."""

from __future__ import annotations

import msgspec
import pytest

from imago.workers.contract.jobs import (
    CaptionJob,
    DiffusionParams,
    EmbedImagesJob,
    EmbedTextsJob,
    ImageToImageJob,
    InpaintJob,
    Job,
    MatchJob,
    OutputSpec,
    PreviewSpec,
    TextSettings,
    TextToImageJob,
    VqaJob,
)
from imago.workers.contract.protocol import WorkItem, encode

GREEDY = TextSettings(30, 0, 1, False, 1.0, 1.0, 50, 1.0, 1, 1.0, seed=1)
SAMPLED = msgspec.structs.replace(GREEDY, do_sample=True)
PARAMS = DiffusionParams(width=64, height=64, steps=20, guidance_scale=7.5)


def image_job(kind, params: DiffusionParams, fields: dict):
    fields = {"prompt": "a fox", "negative_prompt": "", "seed": 0, "num_images": 1, **fields}
    return kind(params=params, **fields)


def text_to_image(params: DiffusionParams = PARAMS, **fields) -> TextToImageJob:
    return image_job(TextToImageJob, params, fields)


def image_to_image(params: DiffusionParams = PARAMS, **fields) -> ImageToImageJob:
    return image_job(ImageToImageJob, params, fields)


def inpaint(params: DiffusionParams = PARAMS, **fields) -> InpaintJob:
    return image_job(InpaintJob, params, fields)


# ------------------------------------------------------------------ text jobs


def test_greedy_captions_and_questions_with_equal_settings_share_a_key_whatever_the_seed():
    caption = CaptionJob("a photo of", GREEDY)
    question = VqaJob("why?", msgspec.structs.replace(GREEDY, seed=99))
    assert caption.batch_key() is not None
    assert caption.batch_key() == question.batch_key()


def test_text_jobs_with_other_generation_settings_do_not_share_a_key():
    beams = msgspec.structs.replace(GREEDY, num_beams=3)
    assert CaptionJob("", GREEDY).batch_key() != CaptionJob("", beams).batch_key()


def test_text_jobs_with_other_adapters_do_not_share_a_key():
    assert CaptionJob("", GREEDY).batch_key() != CaptionJob("", GREEDY, adapter="ink").batch_key()


@pytest.mark.parametrize("job", [CaptionJob("", SAMPLED), VqaJob("why?", SAMPLED)])
def test_sampled_text_runs_alone(job):
    assert job.batch_key() is None


@pytest.mark.parametrize("job", [CaptionJob("", GREEDY), VqaJob("why?", SAMPLED)])
def test_a_text_job_weighs_one(job):
    assert job.weight() == 1


def test_a_caption_carries_its_prefix():
    assert CaptionJob("a photo of", GREEDY).texts == ("a photo of",)


def test_a_question_carries_its_question():
    assert VqaJob("why?", GREEDY).texts == ("why?",)


# ----------------------------------------------------------------- image jobs


def test_image_jobs_differing_in_prompts_seeds_counts_and_formats_share_a_key():
    plain = text_to_image()
    other = text_to_image(
        prompt="a boat",
        negative_prompt="blurry",
        seed=7,
        num_images=3,
        output=OutputSpec(format="WEBP", quality=80, embed_parameters=False),
        preview=PreviewSpec(every=2, format="PNG", max_size=128, all_images=True),
    )
    assert plain.batch_key() == other.batch_key()


@pytest.mark.parametrize(
    "change",
    [
        {"width": 128},
        {"height": 32},
        {"steps": 10},
        {"guidance_scale": 1.0},
        {"scheduler": "euler"},
        {"loras": (("ink", 1.0),)},
    ],
)
def test_image_jobs_differing_in_a_diffusion_setting_do_not_share_a_key(change):
    changed = msgspec.structs.replace(PARAMS, **change)
    assert text_to_image().batch_key() != text_to_image(changed).batch_key()


def test_image_tasks_do_not_share_a_key_with_each_other():
    keys = [text_to_image().batch_key(), image_to_image(strength=1.0).batch_key()]
    keys.append(inpaint(strength=1.0).batch_key())
    assert len(set(keys)) == 3


@pytest.mark.parametrize("task", [image_to_image, inpaint])
def test_image_to_image_jobs_share_a_key_only_with_equal_strength(task):
    assert task(strength=0.5).batch_key() == task(strength=0.5, seed=3).batch_key()
    assert task(strength=0.5).batch_key() != task(strength=0.6).batch_key()


def test_restyling_by_a_style_image_runs_alone():
    assert image_to_image(style_scale=0.7).batch_key() is None


@pytest.mark.parametrize("task", [text_to_image, image_to_image, inpaint])
def test_an_image_job_weighs_its_images(task):
    assert task(num_images=3).weight() == 3


@pytest.mark.parametrize("task", [text_to_image, image_to_image, inpaint])
def test_an_image_job_carries_its_prompt_and_negative_prompt(task):
    assert task(prompt="a fox", negative_prompt="blurry").texts == ("a fox", "blurry")


def test_text_to_image_runs_every_step():
    assert text_to_image().steps_run == 20


@pytest.mark.parametrize("task", [image_to_image, inpaint])
def test_image_to_image_runs_steps_times_strength(task):
    assert task(strength=0.55).steps_run == 11


def test_an_image_jobs_cost_counts_its_output_images():
    assert text_to_image(num_images=4).cost().output_images == 4


# ------------------------------------------------------------- alignment jobs


ALIGN_JOBS = [EmbedImagesJob(images=2), EmbedTextsJob(texts=("a",)), MatchJob(1, ("a", "b"))]


def test_alignment_jobs_all_share_one_key():
    assert len({job.batch_key() for job in ALIGN_JOBS}) == 1


@pytest.mark.parametrize(("job", "weight"), list(zip(ALIGN_JOBS, [2, 1, 3], strict=True)))
def test_an_alignment_job_weighs_its_images_and_texts(job, weight):
    assert job.weight() == weight


@pytest.mark.parametrize(
    ("job", "texts"), list(zip(ALIGN_JOBS, [(), ("a",), ("a", "b")], strict=True))
)
def test_an_alignment_job_carries_the_texts_it_embeds_or_scores(job, texts):
    assert job.texts == texts


@pytest.mark.parametrize(("job", "images"), list(zip(ALIGN_JOBS, [2, 0, 1], strict=True)))
def test_an_alignment_job_counts_the_image_frames_it_brings(job, images):
    assert job.images == images


# --------------------------------------------------------------------- the wire


@pytest.mark.parametrize(
    "job",
    [
        CaptionJob("", GREEDY),
        VqaJob("why?", GREEDY),
        text_to_image(preview=PreviewSpec(every=1, method="taesd")),
        image_to_image(strength=0.5, style_scale=0.3),
        inpaint(strength=1.0),
        *ALIGN_JOBS,
    ],
    ids=lambda job: type(job).__name__,
)
def test_every_kind_of_job_crosses_to_the_worker_unchanged(job: Job):
    item = msgspec.msgpack.decode(encode(WorkItem("r1", job)), type=WorkItem)
    assert type(item.job) is type(job)
    assert item.job == job
