"""Option objects: what a request asks for, grouped as the ``imago.v1``
messages group it.

:func:`~imago.client.messages.generate_request` takes a
:class:`DiffusionOptions`, a :class:`PreviewOptions`, an
:class:`OutputOptions` and, to start from an image, an :class:`ImageToImage`
or an :class:`Inpaint`; ``caption`` and ``ask`` take a :class:`TextOptions`.
Each is frozen and its defaults are the server's own, so ``DiffusionOptions()``
asks for nothing in particular and one object can serve many requests::

    fast = DiffusionOptions(width=256, height=256, steps=8)
    for seed in range(4):
        client.generate_result("a fox", diffusion=replace(fast, seed=seed))

Values are checked where the request is built (unknown format or preview
method names raise :class:`ValueError` there) and, for ranges, by the server.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image as PILImage

    ImageInput = bytes | bytearray | memoryview | str | os.PathLike[str] | PILImage.Image
else:
    ImageInput = Any

__all__ = [
    "DiffusionOptions",
    "ImageInput",
    "ImageToImage",
    "Inpaint",
    "OutputOptions",
    "PreviewOptions",
    "TextOptions",
]

#: LoRA weights as a caller may give them: adapter names mapped to weights,
#: or (name, weight) pairs.
LoraWeights = Mapping[str, float] | Iterable[tuple[str, float]]


@dataclass(frozen=True, kw_only=True)
class DiffusionOptions:
    """How Stable Diffusion draws: the GenerateRequest fields of the model call.

    Sizes are in pixels, multiples of 8 up to the server's limit; 0 takes the
    model's native size (512 for Stable Diffusion 1.5). ``steps`` (denoising
    steps) is 1..150, 0 taking 30. ``guidance_scale`` (classifier-free
    guidance) is in [0, 30], None taking 7.5; <= 1 disables guidance.
    ``seed`` is the seed of the first image, image i using seed + i; None
    picks one at random, reported with each image. ``num_images`` is 1..8.
    ``scheduler`` names the denoising scheduler ("ddim", "pndm", "euler",
    "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras", "lms" or "unipc"); ""
    takes the model's own. ``loras`` maps names of LoRA adapters the server
    has loaded (``imago serve --lora-dir``) to weights in [-4, 4]; given as a
    mapping or as (name, weight) pairs, it is kept as pairs, one per name.
    """

    width: int = 0
    height: int = 0
    steps: int = 0
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    scheduler: str = ""
    loras: LoraWeights = ()

    def __post_init__(self) -> None:
        # One weight per adapter, the last one given winning, in the order
        # first named (what a dict of the same pairs holds), kept as a tuple so
        # that equal options compare and hash equal. Frozen: hence __setattr__.
        object.__setattr__(self, "loras", tuple(dict(self.loras).items()))


@dataclass(frozen=True, kw_only=True)
class PreviewOptions:
    """What the image looks like while it is drawn: GenerateRequest.previews.

    A preview every ``every_n_steps`` denoising steps (0: none), encoded as
    ``format`` ("png", "jpeg"/"jpg" or "webp", or an ``ImageFormat`` value),
    its longest side at most ``max_size`` pixels (0: up to 512). ``method``
    is "latent_rgb" (a fixed projection of the latents: next to free),
    "taesd" (a tiny decoder, if the model set has one) or "full" (the
    model's VAE: exact, and as costly as the final decode), or a
    ``PreviewMethod`` value. Previews show image 0 only unless ``all_images``.
    """

    every_n_steps: int = 0
    format: str | int = "jpeg"
    max_size: int = 0
    method: str | int = "latent_rgb"
    all_images: bool = False


@dataclass(frozen=True, kw_only=True)
class OutputOptions:
    """How the result images are encoded: GenerateRequest's output fields.

    ``format`` is "png", "jpeg"/"jpg" or "webp" (or an ``ImageFormat``
    value). ``quality`` (1..100, 0: 95) applies to JPEG and WebP; PNG is
    lossless. PNG results carry their generation parameters as a text chunk
    named "parameters" unless ``embed_parameters`` is False.
    """

    format: str | int = "png"
    quality: int = 0
    embed_parameters: bool = True


@dataclass(frozen=True)
class ImageToImage:
    """Redraw ``init_image`` under the prompt: the ``image_to_image`` task.

    Images are encoded bytes, a path to an image file or a PIL image.
    ``strength`` in (0, 1] is how much to change it (0: the server's 0.8);
    the steps run are steps x strength, and the output takes the init
    image's size unless the diffusion options give a width and height. A
    ``style_image`` restyles it through the server's IP-Adapter at
    ``style_scale`` in (0, 2] (0: 1).
    """

    init_image: ImageInput
    strength: float = 0.0
    style_image: ImageInput | None = None
    style_scale: float = 0.0


@dataclass(frozen=True)
class Inpaint:
    """Repaint part of ``image``: the ``inpaint`` task.

    The white pixels of ``mask`` are repainted, the black ones kept; both
    are encoded bytes, a path to an image file or a PIL image. ``strength``
    in (0, 1] is how much to change the masked area (0: 1).
    """

    image: ImageInput
    mask: ImageInput
    strength: float = 0.0


@dataclass(frozen=True, kw_only=True)
class TextOptions:
    """How captions and answers are generated: the GenerationSettings of
    Caption and Ask. None leaves a field unset, taking the model's default.

    ``max_new_tokens`` (1..the server's limit, 256 by default) and
    ``min_new_tokens`` (0..max_new_tokens) bound the new tokens.
    ``num_beams`` is the beam search width, 1..16 (1: none). With
    ``do_sample`` tokens are sampled, at softmax ``temperature`` in (0, 10],
    from the nucleus of mass ``top_p`` in (0, 1] and the ``top_k`` most
    likely tokens (0..1000, 0: all). ``repetition_penalty`` is in (0, 10]
    (1.0: none). ``num_return_sequences`` (1..16, at most num_beams under
    beam search) is how many outputs come back. ``length_penalty`` in
    [-10, 10] is the exponent on length in beam scores (> 0 favours longer
    output). ``seed`` makes sampled output reproducible; None picks one at
    random, reported in the response.
    """

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    num_beams: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    num_return_sequences: int | None = None
    length_penalty: float | None = None
    seed: int | None = None
