"""Denoising previews: the methods that draw them, and image encoding.

A preview shows the predicted denoised latent (x0) of a step, not the noisy
latent the scheduler carries: the noisy one is mostly noise until the last
steps. :data:`PREVIEW_METHODS` holds every method by the name requests use
(:mod:`imago.workers.contract.preview_methods`), each with the decoder it
needs: latent_rgb turns the latent into colours with a fixed 4x3 linear
projection, which costs nothing next to a VAE decode but comes out at the
latent's size (1/8 of the output on each side for Stable Diffusion); taesd
decodes with a tiny autoencoder loaded next to the checkpoint; full decodes
with the checkpoint's own VAE. Every preview is then scaled to the output's
shape (:func:`preview_size`), whatever size its method drew it at.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from imago.workers.contract.families import TAESD
from imago.workers.contract.preview_methods import DEFAULT_PREVIEW_METHOD

#: SD 1.5 latent channel -> (R, G, B) contribution; rows are channels 0..3.
LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (0.3444, 0.1385, 0.0670),
    (0.1247, 0.4027, 0.1494),
    (-0.3192, 0.2513, 0.2103),
    (-0.1307, -0.1874, -0.7445),
)

#: MIME type of each supported PIL format name.
MIME_TYPES: dict[str, str] = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def latents_to_rgb(latents: torch.Tensor) -> Image.Image:
    """Approximate colours of one latent ``[4, h, w]`` (as the UNet sees it,
    i.e. already multiplied by the VAE scaling factor) as an ``w x h`` RGB
    image. Projected values of about [-1, 1] map to 0..255; beyond that they
    are clipped."""
    if latents.ndim != 3 or latents.shape[0] != len(LATENT_RGB_FACTORS):
        raise ValueError(f"expected a latent of shape [4, h, w], got {list(latents.shape)}")
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents.float(), factors)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(pixels.cpu().numpy())


def decoded_to_rgb(decoded: torch.Tensor) -> Image.Image:
    """The first image of an autoencoder's output ``[batch, 3, h, w]``
    (values about [-1, 1], clipped there) as a ``w x h`` RGB image."""
    pixels = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


#: Role of the checkpoint's own VAE among a model's preview decoders; the
#: other roles are the extra sources that load one (families.TAESD).
VAE = "vae"


def _draw_latent_rgb(latents: torch.Tensor, decoder: None) -> Image.Image:
    return latents_to_rgb(latents[0])


def _draw_taesd(latents: torch.Tensor, taesd: Any) -> Image.Image:
    # TAESD takes latents at the UNet's scale (its scaling factor is 1).
    return decoded_to_rgb(taesd.decode(latents.to(taesd.dtype)).sample)


def _draw_full(latents: torch.Tensor, vae: Any) -> Image.Image:
    return decoded_to_rgb(vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample)


@dataclass(frozen=True)
class PreviewMethod:
    """One way of drawing a preview from a step's predicted x0."""

    #: The name requests use (see imago.workers.contract.preview_methods).
    name: str
    #: Role of the decoder it draws with among a model's preview decoders
    #: (:data:`VAE`, or the extra source that loads one, e.g. families.TAESD);
    #: "" for a method that needs none.
    decoder: str
    #: ``draw(latents, decoder)``: latents ``[1, 4, h, w]`` at the UNet's
    #: scale, and the decoder of role :attr:`decoder` (None when it needs
    #: none) -> an RGB picture of any size.
    draw: Callable[[torch.Tensor, Any], Image.Image]

    def available(self, decoders: Mapping[str, Any]) -> bool:
        """Whether a model whose preview decoders are ``decoders`` (by role)
        can draw previews this way."""
        return not self.decoder or self.decoder in decoders

    def render(self, latents: torch.Tensor, decoders: Mapping[str, Any]) -> Image.Image:
        """A picture of predicted denoised ``latents`` ``[1, 4, h, w]`` (UNet
        scale) with the decoder it needs from ``decoders``; ValueError when
        they lack it."""
        if not self.available(decoders):
            raise ValueError(f"no {self.name} preview decoder")
        return self.draw(latents, decoders[self.decoder] if self.decoder else None)


#: Every preview method by name. A new one is a value of the API's
#: PreviewMethod enum, an entry here and, when it decodes with weights of its
#: own, their loading into the runner's preview decoders.
PREVIEW_METHODS: dict[str, PreviewMethod] = {
    method.name: method
    for method in (
        PreviewMethod(DEFAULT_PREVIEW_METHOD, "", _draw_latent_rgb),
        PreviewMethod("taesd", TAESD, _draw_taesd),
        PreviewMethod("full", VAE, _draw_full),
    )
}


def preview_method(name: str) -> PreviewMethod:
    """The preview method called ``name``; ValueError for an unknown one."""
    try:
        return PREVIEW_METHODS[name]
    except KeyError:
        known = ", ".join(PREVIEW_METHODS)
        raise ValueError(f"unknown preview method {name!r}; use {known}") from None


def x0_from_prediction(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: float | torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The denoised sample implied by a model prediction at a step whose
    cumulative signal fraction is ``alpha_prod_t`` (0 < alpha_prod_t <= 1),
    for ``sample`` in variance-preserving form. Computed in float32."""
    alpha = torch.as_tensor(alpha_prod_t, dtype=torch.float32, device=sample.device)
    x_t, out = sample.float(), model_output.float()
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha).sqrt() * out) / alpha.sqrt()
    if prediction_type == "v_prediction":
        return alpha.sqrt() * x_t - (1 - alpha).sqrt() * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def predicted_x0(
    scheduler: Any,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    step_output: Any = None,
) -> torch.Tensor:
    """The predicted denoised latent of one ``scheduler.step(model_output,
    timestep, sample)`` call. The scheduler's own ``pred_original_sample`` is
    used when its step output has one (it includes any clipping or
    thresholding the scheduler applies); otherwise x0 is computed from
    ``alphas_cumprod[timestep]`` and the configured prediction type, which is
    right for schedulers that step variance-preserving samples (PNDM, DPM-Solver,
    UniPC, DEIS)."""
    found = getattr(step_output, "pred_original_sample", None)
    if found is not None:
        return found
    alpha_prod_t = scheduler.alphas_cumprod[int(timestep)]
    return x0_from_prediction(model_output, sample, alpha_prod_t, scheduler.config.prediction_type)


class X0Capture:
    """A private copy of a scheduler whose ``step`` remembers its last call,
    so that the predicted x0 of the latest step can be read at any time.

    Each request gets its own copy because schedulers keep per-run state
    (timesteps, step index, PNDM's history of model outputs): a shared one
    would let requests interfere. Wrapping the copy's ``step`` rather than the
    class's leaves every other user of the pipeline untouched, and the
    original step still does all the work, so results equal plain diffusers.
    """

    def __init__(self, template: Any) -> None:
        self.scheduler = type(template).from_config(template.config)
        self._last: tuple[torch.Tensor, Any, torch.Tensor, Any] | None = None
        original = self.scheduler.step

        # functools.wraps keeps step's signature visible: pipelines inspect it
        # to decide whether to pass ``eta`` and ``generator``.
        @functools.wraps(original)
        def step(
            model_output: torch.Tensor,
            timestep: Any,
            sample: torch.Tensor,
            *args: Any,
            return_dict: bool = True,
            **kwargs: Any,
        ) -> Any:
            output = original(model_output, timestep, sample, *args, return_dict=True, **kwargs)
            self._last = (model_output, timestep, sample, output)
            return output if return_dict else output.to_tuple()

        self.scheduler.step = step

    def x0(self) -> torch.Tensor | None:
        """Predicted x0 of the latest step, ``[batch, channels, h, w]``; None
        before the first step. Computed on demand, so unread steps cost nothing."""
        if self._last is None:
            return None
        model_output, timestep, sample, output = self._last
        return predicted_x0(self.scheduler, model_output, timestep, sample, output)


def preview_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size of a preview for a ``width`` x ``height`` output: the output's own
    size, scaled down to ``max_side`` on its longest side when larger."""
    longest = max(width, height)
    if max_side <= 0 or longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def mime_type(fmt: str) -> str:
    """MIME type of PIL format name ``fmt`` (PNG, JPEG or WEBP, any case)."""
    try:
        return MIME_TYPES[fmt.upper()]
    except KeyError:
        raise ValueError(f"unsupported image format {fmt!r}; use PNG, JPEG or WEBP") from None


def encode_image(
    image: Image.Image, fmt: str, quality: int = 95, text: dict[str, str] | None = None
) -> bytes:
    """``image`` encoded as PNG (lossless; ``quality`` ignored; ``text`` written
    as tEXt/iTXt chunks), JPEG or WEBP (lossy, ``quality`` 1..100)."""
    fmt = fmt.upper()
    mime_type(fmt)  # rejects unsupported formats with a clear message
    buffer = io.BytesIO()
    if fmt == "PNG":
        info = None
        if text:
            info = PngImagePlugin.PngInfo()
            for key, value in text.items():
                info.add_itxt(key, value)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        # JPEG has no alpha channel; WEBP would keep one nobody asked for.
        image.convert("RGB").save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()
