"""Served results equal what the libraries give when called directly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import png_bytes
from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from imago.client import DiffusionOptions, ImagoClient, TextOptions
from imago.workers.checkpoints import tiny

IMAGE = png_bytes(size=(50, 42), color=(30, 90, 200))


@pytest.fixture(scope="module")
def client(server):
    with ImagoClient(server.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def blip2(model_cache):
    path = tiny.ensure("blip2", model_cache)
    processor = Blip2Processor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return processor, Blip2ForConditionalGeneration.from_pretrained(path).eval()


def direct_continuations(blip2, prompt: str, seed: int | None = None, **settings) -> list[str]:
    """What ``generate`` adds after ``prompt``, decoded as it is."""
    processor, model = blip2
    image = Image.open(io.BytesIO(IMAGE)).convert("RGB")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(**inputs, **settings)
    continuation = output[:, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.batch_decode(continuation, skip_special_tokens=True)


def direct_texts(blip2, prompt: str, seed: int | None = None, **settings) -> list[str]:
    return [t.strip() for t in direct_continuations(blip2, prompt, seed, **settings)]


@pytest.mark.parametrize(
    "settings",
    [
        {"max_new_tokens": 12},
        {"max_new_tokens": 10, "num_beams": 3, "num_return_sequences": 2},
        {"max_new_tokens": 8, "repetition_penalty": 1.5, "min_new_tokens": 8},
    ],
    ids=["greedy", "beam", "repetition-penalty"],
)
def test_served_caption_equals_direct_generate(client, blip2, settings):
    served = [c.text for c in client.caption(IMAGE, generation=TextOptions(**settings)).captions]
    assert served == direct_texts(blip2, "", **settings)


@pytest.mark.parametrize(
    "settings",
    [
        {"max_new_tokens": 10, "do_sample": True, "top_k": 0, "temperature": 1.3},
        {
            "max_new_tokens": 10,
            "do_sample": True,
            "top_p": 0.8,
            "top_k": 20,
            "temperature": 0.9,
            "num_return_sequences": 3,
        },
    ],
    ids=["temperature", "nucleus-several"],
)
def test_served_sampled_caption_equals_direct_generate_with_the_same_seed(client, blip2, settings):
    served = [
        c.text
        for c in client.caption(IMAGE, generation=TextOptions(seed=2024, **settings)).captions
    ]
    assert served == direct_texts(blip2, "", seed=2024, **settings)


def test_served_beam_scores_equal_direct_sequence_scores(client, blip2):
    settings = {"max_new_tokens": 10, "num_beams": 4, "length_penalty": -1.5}
    served = client.caption(
        IMAGE, generation=TextOptions(num_return_sequences=3, **settings)
    ).captions
    processor, model = blip2
    inputs = processor(images=Image.open(io.BytesIO(IMAGE)).convert("RGB"), return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(
            **inputs, **settings, num_return_sequences=3, return_dict_in_generate=True,
            output_scores=True,
        )  # fmt: skip
    assert [c.text for c in served] == direct_texts(blip2, "", num_return_sequences=3, **settings)
    np.testing.assert_allclose([c.score for c in served], output.sequences_scores, atol=1e-5)


def test_served_prefixed_caption_continues_the_prefix_as_direct_generate_does(client, blip2):
    served = (
        client.caption(IMAGE, prefix="a photo of", generation=TextOptions(max_new_tokens=8))
        .captions[0]
        .text
    )
    continuation = direct_continuations(blip2, "a photo of", max_new_tokens=8)[0]
    assert continuation.strip()
    assert served == ("a photo of" + continuation).strip()


def test_served_answer_equals_direct_generate_on_the_vqa_prompt(client, blip2):
    served = (
        client.ask(IMAGE, "what colour is the sky?", generation=TextOptions(max_new_tokens=9))
        .answers[0]
        .text
    )
    direct = direct_texts(blip2, "Question: what colour is the sky? Answer:", max_new_tokens=9)
    assert [served] == direct


def test_served_images_equal_direct_diffusers_within_one_level(client, model_cache):
    pipe = StableDiffusionPipeline.from_pretrained(tiny.ensure("stable-diffusion", model_cache))
    pipe.set_progress_bar_config(disable=True)
    prompt, negative = "a lighthouse on a cliff at dusk", "blurry"
    result = client.generate_result(
        prompt,
        negative_prompt=negative,
        diffusion=DiffusionOptions(
            seed=11, num_images=2, steps=6, guidance_scale=6.0, width=64, height=96
        ),
    )
    generators = [torch.Generator("cpu").manual_seed(s) for s in (11, 12)]
    direct = pipe(
        prompt, negative_prompt=negative, num_inference_steps=6, guidance_scale=6.0, width=64,
        height=96, num_images_per_prompt=2, generator=generators,
    ).images  # fmt: skip
    for served, expected in zip(result.images, direct, strict=True):
        pixels = np.asarray(Image.open(io.BytesIO(served.image.data)), dtype=np.int16)
        difference = np.abs(pixels - np.asarray(expected, dtype=np.int16))
        assert difference.max() <= 1
