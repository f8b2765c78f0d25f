"""Latent previews, predicted x0 and image encoding helpers."""

from __future__ import annotations

import inspect
import io
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from PIL import Image

from imago.workers.contract.preview_methods import DEFAULT_PREVIEW_METHOD, PREVIEW_METHOD_NAMES
from imago.workers.families.diffusion.previews import (
    LATENT_RGB_FACTORS,
    PREVIEW_METHODS,
    VAE,
    X0Capture,
    encode_image,
    latents_to_rgb,
    mime_type,
    predicted_x0,
    preview_method,
    preview_size,
    x0_from_prediction,
)

SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
)


def latent(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channel", [0, 1, 2, 3])
def test_latents_to_rgb_gives_the_projection_colour(channel: int) -> None:
    one_hot = torch.zeros(4, 3, 5)
    one_hot[channel] = 1.0
    image = latents_to_rgb(one_hot)
    assert (image.mode, image.size) == ("RGB", (5, 3))
    expected = tuple(round((f + 1) * 127.5) for f in LATENT_RGB_FACTORS[channel])
    assert set(zip(*[iter(image.tobytes())] * 3, strict=True)) == {expected}


def test_latents_to_rgb_maps_zero_to_mid_grey_and_clips() -> None:
    assert latents_to_rgb(torch.zeros(4, 2, 2)).getpixel((0, 0)) == (128, 128, 128)
    bright = torch.tensor([10.0, 10.0, 0.0, 0.0]).view(4, 1, 1)
    assert latents_to_rgb(bright).getpixel((0, 0)) == (255, 255, 255)


def test_latents_to_rgb_rejects_a_batch() -> None:
    with pytest.raises(ValueError, match=r"\[4, h, w\]"):
        latents_to_rgb(torch.zeros(1, 4, 2, 2))


def test_every_preview_method_the_api_names_has_a_registered_way_to_draw_it() -> None:
    assert tuple(PREVIEW_METHODS) == PREVIEW_METHOD_NAMES
    assert all(method.name == name for name, method in PREVIEW_METHODS.items())
    assert PREVIEW_METHODS[DEFAULT_PREVIEW_METHOD].available({})  # every model runs it


def test_latent_rgb_draws_the_projection_at_the_latents_size() -> None:
    drawn = PREVIEW_METHODS["latent_rgb"].render(latent(3), {})
    assert drawn.size == (5, 6)
    assert drawn.tobytes() == latents_to_rgb(latent(3)[0]).tobytes()


class FakeDecoder:
    """Decodes anything to a mid-grey 4 x 2 image, keeping what it was given."""

    dtype = torch.float32
    config = SimpleNamespace(scaling_factor=0.25)

    def __init__(self) -> None:
        self.given: list[torch.Tensor] = []

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        self.given.append(latents)
        return SimpleNamespace(sample=torch.zeros(1, 3, 2, 4))


@pytest.mark.parametrize(("name", "scale"), [("taesd", 1.0), ("full", 0.25)])
def test_decoding_methods_draw_with_their_own_decoder(name: str, scale: float) -> None:
    """TAESD takes latents at the UNet's scale; the VAE takes them unscaled."""
    method = PREVIEW_METHODS[name]
    mine, other = FakeDecoder(), FakeDecoder()
    decoders = {method.decoder: mine, "unrelated": other}
    drawn = method.render(latent(4), decoders)
    assert (drawn.mode, drawn.size, drawn.getpixel((0, 0))) == ("RGB", (4, 2), (128, 128, 128))
    (given,) = mine.given
    torch.testing.assert_close(given, latent(4) / scale)
    assert other.given == []


def test_a_method_whose_decoder_is_not_loaded_is_unavailable() -> None:
    taesd = PREVIEW_METHODS["taesd"]
    assert not taesd.available({VAE: FakeDecoder()})
    with pytest.raises(ValueError, match="no taesd preview decoder"):
        taesd.render(latent(), {VAE: FakeDecoder()})
    with pytest.raises(ValueError, match="unknown preview method 'sketch'"):
        preview_method("sketch")
    assert preview_method("full") is PREVIEW_METHODS["full"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_from_prediction_recovers_the_clean_sample(prediction_type: str) -> None:
    x0, noise, alpha = latent(1), latent(2), torch.tensor(0.3)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    prediction = {
        "epsilon": noise,
        "v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * x0,
        "sample": x0,
    }[prediction_type]
    recovered = x0_from_prediction(prediction, x_t, alpha, prediction_type)
    torch.testing.assert_close(recovered, x0, rtol=1e-4, atol=1e-4)


def test_predicted_x0_is_the_schedulers_own_where_it_has_one() -> None:
    capture = X0Capture(DDIMScheduler(**SD15_SCHEDULER, clip_sample=False))
    scheduler = capture.scheduler
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3]
    output = scheduler.step(latent(1), t, latent(2))
    assert output.pred_original_sample is not None
    assert torch.equal(capture.x0(), output.pred_original_sample)


def test_predicted_x0_follows_alphas_cumprod_where_the_scheduler_has_none() -> None:
    capture = X0Capture(PNDMScheduler(**SD15_SCHEDULER, skip_prk_steps=True))
    scheduler = capture.scheduler
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    eps, x_t = latent(1), latent(2)
    output = scheduler.step(eps, t, x_t)
    assert getattr(output, "pred_original_sample", None) is None
    alpha = scheduler.alphas_cumprod[int(t)]
    expected = (x_t - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    torch.testing.assert_close(capture.x0(), expected)
    torch.testing.assert_close(predicted_x0(scheduler, eps, t, x_t), expected)


def test_capture_has_nothing_before_the_first_step() -> None:
    assert X0Capture(PNDMScheduler(**SD15_SCHEDULER)).x0() is None


def test_capture_uses_a_private_scheduler_and_keeps_step_signature() -> None:
    template = DDIMScheduler(**SD15_SCHEDULER)
    capture = X0Capture(template)
    assert capture.scheduler is not template
    assert "step" not in vars(template)
    # Pipelines pass eta and generator only when step's signature names them.
    assert {"eta", "generator"} <= set(inspect.signature(capture.scheduler.step).parameters)


def test_capture_returns_a_tuple_when_asked() -> None:
    capture = X0Capture(DDIMScheduler(**SD15_SCHEDULER))
    capture.scheduler.set_timesteps(10)
    t = capture.scheduler.timesteps[0]
    as_tuple = capture.scheduler.step(latent(1), t, latent(2), return_dict=False)
    reference = DDIMScheduler(**SD15_SCHEDULER)
    reference.set_timesteps(10)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], reference.step(latent(1), t, latent(2)).prev_sample)


def test_preview_size_caps_the_longest_side_keeping_aspect() -> None:
    assert preview_size(200, 100, 50) == (50, 25)
    assert preview_size(100, 300, 30) == (10, 30)


def test_preview_size_is_the_output_size_when_it_fits_or_uncapped() -> None:
    assert preview_size(40, 20, 64) == (40, 20)
    assert preview_size(768, 512, 0) == (768, 512)


def test_png_is_lossless() -> None:
    image = Image.frombytes("RGB", (4, 2), bytes(range(24)))
    decoded = Image.open(io.BytesIO(encode_image(image, "png")))
    assert decoded.format == "PNG"
    assert decoded.tobytes() == image.tobytes()


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_each_format_encodes_as_itself(fmt: str, mime: str) -> None:
    data = encode_image(Image.new("RGBA", (16, 8), (10, 200, 30, 255)), fmt, quality=80)
    decoded = Image.open(io.BytesIO(data))
    assert (decoded.format, decoded.size) == (fmt, (16, 8))
    assert mime_type(fmt) == mime


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="GIF"):
        encode_image(Image.new("RGB", (2, 2)), "GIF")
