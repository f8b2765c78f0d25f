"""Full-size random-weight architectures, built on the meta device: the shapes
of the published checkpoints without allocating their weights."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from imago.workers.checkpoints import arch, tiny

# Published weight counts, and how far a build may stray from them (a fraction).
BLIP2_OPT_2_7B = 3.745e9
SD15_UNET = 859.52e6
SD15_VAE = 83.65e6
SD15_TEXT_ENCODER = 123.06e6
TAESD = 2.445e6
TOLERANCE = 0.005


@pytest.fixture(scope="module")
def blip2():
    return arch.build_blip2("meta", torch.float16)


@pytest.fixture(scope="module")
def sd15():
    return arch.build_sd15_pipeline("meta", torch.float16)


def test_blip2_opt_2_7b_has_the_published_number_of_weights(blip2):
    model, _ = blip2
    assert arch.parameter_count(model) == pytest.approx(BLIP2_OPT_2_7B, rel=TOLERANCE)


def test_sd15_unet_has_the_published_number_of_weights(sd15):
    assert arch.parameter_count(sd15.unet) == pytest.approx(SD15_UNET, rel=TOLERANCE)


def test_sd15_vae_has_the_published_number_of_weights(sd15):
    assert arch.parameter_count(sd15.vae) == pytest.approx(SD15_VAE, rel=TOLERANCE)


def test_sd15_text_encoder_has_the_published_number_of_weights(sd15):
    count = arch.parameter_count(sd15.text_encoder)
    assert count == pytest.approx(SD15_TEXT_ENCODER, rel=TOLERANCE)


def test_taesd_has_the_published_number_of_weights():
    # madebyollin/taesd: 9.78 MB of float32 weights, half encoder, half decoder.
    taesd = arch.build("arch:taesd", "meta", torch.float16)
    assert arch.parameter_count(taesd) == pytest.approx(TAESD, rel=TOLERANCE)
    assert taesd.dtype == torch.float16


def test_building_on_the_meta_device_allocates_no_weights(blip2, sd15):
    model, _ = blip2
    modules = (model, sd15.unet, sd15.vae, sd15.text_encoder)
    assert {p.device.type for module in modules for p in module.parameters()} == {"meta"}


def test_blip2_in_float16_keeps_query_tokens_and_qformer_in_float32_as_loading_does(blip2):
    model, _ = blip2
    float32 = {name for name, p in model.named_parameters() if p.dtype == torch.float32}
    expected = {name for name, _ in model.named_parameters() if name.startswith("qformer.")}
    assert float32 == expected | {"query_tokens"}


def test_blip2_processor_places_one_image_token_per_query_inside_the_vocabulary(blip2):
    model, processor = blip2
    image = Image.new("RGB", (320, 240))
    ids = processor(images=image, text="Question: what is it? Answer:").input_ids[0]
    assert ids.count(model.config.image_token_index) == model.config.num_query_tokens
    assert max(ids) < model.config.text_config.vocab_size


def test_sd15_tokenizer_ids_fit_the_text_encoders_vocabulary_and_positions(sd15):
    ids = sd15.tokenizer("an astronaut riding a horse", padding="max_length").input_ids
    config = sd15.text_encoder.config
    assert (len(ids), max(ids) < config.vocab_size) == (config.max_position_embeddings, True)


def test_sd15_pipeline_has_no_safety_checker_and_decodes_latents_at_8x(sd15):
    assert (sd15.safety_checker, sd15.vae_scale_factor) == (None, 8)


def test_an_arch_source_builds_one_part_equal_in_shape_to_the_pipelines(sd15):
    unet = arch.build("arch:sd15-unet", "meta", torch.float16)
    assert arch.parameter_count(unet) == arch.parameter_count(sd15.unet)


def test_an_unknown_arch_source_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="known: arch:blip2-opt-2.7b"):
        arch.build("arch:sd21", "meta")


def test_the_checkpoint_resolver_refuses_arch_sources_rather_than_asking_the_hub():
    with pytest.raises(ValueError, match="built in memory"):
        tiny.resolve("arch:sd15")
