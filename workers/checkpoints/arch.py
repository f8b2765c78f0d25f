"""Full-size random-weight models with the published architectures.

``arch:<kind>`` sources name models whose every shape is that of a published
checkpoint (BLIP-2 OPT-2.7b, Stable Diffusion 1.5) and whose weights are
seeded random numbers: GPU throughput and memory can be measured with them on
machines that cannot download the real weights. Configurations are written
here in code; nothing is downloaded and nothing is written to disk.

The builders make each model directly on the device and in the dtype asked
for: parameters are allocated there and initialised there (no float32 copy on
the CPU first), so a GPU build takes seconds. On ``"meta"`` they allocate
nothing at all, which is how the parameter counts are checked.

Tokenizers cannot be downloaded either, so those of the tiny models (trained
locally on a small corpus, see :mod:`imago.workers.checkpoints.blip2` and
:mod:`imago.workers.checkpoints.diffusion`) stand in. Their vocabularies are far smaller
than the real ones (513 against OPT's 50265 tokens, 840 against CLIP's
49408), but every id they produce indexes the full-size embedding matrices,
which is all that random weights need. Ids the language model generates past
the tokenizer's vocabulary decode to nothing, so captions come out short or
empty while the token counts and timings are those of the real model.

The server's runners load checkpoints with ``from_pretrained`` only, so these
sources are not served: their models are handed to the runners' constructors
(``Blip2Runner(name, source, processor, model, device)``,
``StableDiffusionRunner(name, source, pipe)``) by code that builds them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from imago.workers.contract.families import arch_builders, import_object

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        Blip2ForConditionalGeneration,
        Blip2Processor,
        CLIPTextModel,
        CLIPTokenizer,
    )

#: Prefix of the sources this module builds.
PREFIX = "arch:"

# --- BLIP-2 OPT-2.7b (Salesforce/blip2-opt-2.7b and its -coco fine-tune) ---

#: Pixels per side of the images the vision tower takes.
BLIP2_IMAGE_SIZE = 224
#: Learnt queries the Q-Former turns into the language model's image prefix.
BLIP2_NUM_QUERY_TOKENS = 32
#: EVA ViT-g/14 without its last layer, as BLIP-2 uses it: 1408 wide, 39 layers.
BLIP2_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1408,
    "intermediate_size": 6144,
    "num_hidden_layers": 39,
    "num_attention_heads": 16,
    "image_size": BLIP2_IMAGE_SIZE,
    "patch_size": 14,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
}
#: BERT-base sized Q-Former, cross-attending to the vision tower every 2nd layer.
BLIP2_QFORMER_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "cross_attention_frequency": 2,
    "encoder_hidden_size": BLIP2_VISION_CONFIG["hidden_size"],
    "max_position_embeddings": 512,
    "vocab_size": 30522,
    "layer_norm_eps": 1e-12,
}
#: facebook/opt-2.7b. 50272 embedding rows, as in the checkpoints saved before
#: ``<image>`` tokens existed (the -coco one served by the default preset);
#: the re-saved Salesforce/blip2-opt-2.7b pads them to 50304, 81,920 weights more.
BLIP2_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "opt",
    "hidden_size": 2560,
    "word_embed_proj_dim": 2560,
    "ffn_dim": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "vocab_size": 50272,
    "activation_function": "relu",
    "do_layer_norm_before": True,
    "enable_bias": True,
    "tie_word_embeddings": True,
}

# --- Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5) ---

#: unet/config.json: 64x64 latents (512 px images), cross-attention to CLIP ViT-L/14.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
}
#: vae/config.json: three downsamplings (8x) into 4 latent channels.
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
#: text_encoder/config.json: the text tower of openai/clip-vit-large-patch14.
SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    # CLIP's ids; with eos 2 transformers pools at the highest id, which is the
    # end-of-text token in the stand-in tokenizer's vocabulary as in CLIP's.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
#: scheduler/scheduler_config.json (PNDM). The runner derives its other
#: schedulers (DDIM among them) from this with ``from_config``.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


# Offsets of the UNet's and VAE's seeds from the pipeline's, so that no two
# parts of one pipeline start from the same random stream.
_UNET_SEED_OFFSET = 1
_VAE_SEED_OFFSET = 2
_TAESD_SEED_OFFSET = 3


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float16 on CUDA and float32 elsewhere, as the runners load checkpoints."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


@contextmanager
def _building(device: str | torch.device, dtype: torch.dtype, seed: int) -> Iterator[None]:
    """Create tensors on ``device`` in ``dtype`` from an RNG seeded ``seed``.

    Modules built inside allocate and initialise their parameters where they
    will live. The caller's RNG state is restored afterwards (CPU and the CUDA
    device built on), so a build leaves other seeded code unchanged.
    """
    device = torch.device(device)
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=cuda), device:
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def parameter_count(module: torch.nn.Module) -> int:
    """Weights of ``module``; tied ones (OPT's embedding and head) count once."""
    return sum(p.numel() for p in module.parameters())


def blip2_processor() -> Blip2Processor:
    """BLIP-2's preprocessing at 224 px with CLIP statistics, 32 image tokens,
    and the tiny BLIP-2 tokenizer (OPT's special tokens at OPT's ids) plus
    ``<image>``."""
    from transformers import Blip2Processor, BlipImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from imago.workers.checkpoints import blip2 as tiny_blip2

    images = BlipImageProcessor(
        size={"height": BLIP2_IMAGE_SIZE, "width": BLIP2_IMAGE_SIZE},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    # The processor adds <image> to the tokenizer as a special token.
    return Blip2Processor(images, tiny_blip2._tokenizer(), num_query_tokens=BLIP2_NUM_QUERY_TOKENS)


def build_blip2(
    device: str | torch.device = "cuda", dtype: torch.dtype | None = None, seed: int = 0
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """BLIP-2 OPT-2.7b with random weights on ``device``, and its processor.

    ``dtype`` defaults to :func:`default_dtype`. As ``from_pretrained`` does
    in float16, the query tokens and the Q-Former stay in float32. The pair
    is prepared as ``Blip2Runner.load`` prepares a loaded one (eval mode,
    left padding, the generation config handed to the language model).
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration, GenerationConfig

    from imago.workers.checkpoints import blip2 as tiny_blip2

    dtype = dtype or default_dtype(device)
    processor = blip2_processor()
    tokenizer = processor.tokenizer
    # "\n" ends captions, as for the checkpoints (OPT's 50118, here its byte-level spelling).
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    ids = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = Blip2Config(
        vision_config=BLIP2_VISION_CONFIG,
        qformer_config=BLIP2_QFORMER_CONFIG,
        text_config={**BLIP2_TEXT_CONFIG, **ids, "eos_token_id": newline},
        num_query_tokens=BLIP2_NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(tiny_blip2.IMAGE_TOKEN),
    )
    with _building(device, dtype, seed):
        model = Blip2ForConditionalGeneration._from_config(config, dtype=dtype)
    _keep_in_float32(model, dtype)
    model.eval()
    model.generation_config = GenerationConfig(**ids, eos_token_id=newline)
    # generate() delegates to the OPT model, which reads its own generation config.
    model.language_model.generation_config = copy.deepcopy(model.generation_config)
    # Decoder-only OPT continues from the last position: pads go on the left.
    tokenizer.padding_side = "left"
    return model, processor


def _keep_in_float32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters ``from_pretrained`` keeps in float32 when loading in
    float16 (BLIP-2's query tokens and Q-Former), so that memory and speed are
    those of a loaded checkpoint."""
    if dtype != torch.float16:
        return
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, param in model.named_parameters():
        if any(key in name for key in keep):
            param.data = param.data.to(torch.float32)


def build_sd15_unet(
    device: str | torch.device = "cuda", dtype: torch.dtype | None = None, seed: int = 0
) -> UNet2DConditionModel:
    """SD 1.5's UNet (859.5 M weights) with random weights on ``device``."""
    from diffusers import UNet2DConditionModel

    with _building(device, dtype or default_dtype(device), seed + _UNET_SEED_OFFSET):
        return UNet2DConditionModel(**SD15_UNET_CONFIG).eval()


def build_sd15_vae(
    device: str | torch.device = "cuda", dtype: torch.dtype | None = None, seed: int = 0
) -> AutoencoderKL:
    """SD 1.5's VAE (83.65 M weights) with random weights on ``device``."""
    from diffusers import AutoencoderKL

    with _building(device, dtype or default_dtype(device), seed + _VAE_SEED_OFFSET):
        return AutoencoderKL(**SD15_VAE_CONFIG).eval()


def build_sd15_text_encoder(
    device: str | torch.device = "cuda", dtype: torch.dtype | None = None, seed: int = 0
) -> CLIPTextModel:
    """SD 1.5's CLIP ViT-L/14 text encoder (123.06 M weights), random, on ``device``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    dtype = dtype or default_dtype(device)
    with _building(device, dtype, seed):
        model = CLIPTextModel._from_config(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG), dtype=dtype)
    return model.eval()


def sd15_tokenizer() -> CLIPTokenizer:
    """The tiny Stable Diffusion CLIP tokenizer: CLIP's normaliser, byte-level
    BPE and special tokens, 77 positions, 840 tokens (all below 49408)."""
    from transformers import CLIPTokenizer

    from imago.workers.checkpoints import diffusion as tiny_sd

    vocab, merges = tiny_sd._train_tokenizer()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=tiny_sd.BOS,
        eos_token=tiny_sd.EOS,
        pad_token=tiny_sd.EOS,
        unk_token=tiny_sd.EOS,
        model_max_length=tiny_sd.MAX_PROMPT_TOKENS,
    )


def sd15_scheduler() -> PNDMScheduler:
    """SD 1.5's own scheduler: PNDM without Runge-Kutta steps."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(**SD15_SCHEDULER_CONFIG)


def build_sd15_pipeline(
    device: str | torch.device = "cuda", dtype: torch.dtype | None = None, seed: int = 0
) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5 with random weights on ``device``, without safety
    checker. Each part equals what its own builder gives for ``seed``."""
    from diffusers import StableDiffusionPipeline

    dtype = dtype or default_dtype(device)
    return StableDiffusionPipeline(
        vae=build_sd15_vae(device, dtype, seed),
        text_encoder=build_sd15_text_encoder(device, dtype, seed),
        tokenizer=sd15_tokenizer(),
        unet=build_sd15_unet(device, dtype, seed),
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_taesd(
    device: str | torch.device = "cuda", dtype: torch.dtype | None = None, seed: int = 0
) -> AutoencoderTiny:
    """TAESD, the tiny autoencoder imago previews with (diffusers'
    AutoencoderTiny defaults are its architecture), with random weights."""
    from diffusers import AutoencoderTiny

    with _building(device, dtype or default_dtype(device), seed + _TAESD_SEED_OFFSET):
        return AutoencoderTiny().eval()


def build_sd15_tokenizer(
    device: str | torch.device = "cuda", dtype: torch.dtype | None = None, seed: int = 0
) -> CLIPTokenizer:
    """:func:`sd15_tokenizer` as an ``arch:`` builder: it has no weights, so
    ``device``, ``dtype`` and ``seed`` change nothing."""
    return sd15_tokenizer()


def build_sd15_scheduler(
    device: str | torch.device = "cuda", dtype: torch.dtype | None = None, seed: int = 0
) -> PNDMScheduler:
    """:func:`sd15_scheduler` as an ``arch:`` builder: it has no weights, so
    ``device``, ``dtype`` and ``seed`` change nothing."""
    return sd15_scheduler()


def is_arch(source: str) -> bool:
    """Whether ``source`` names a model of this module."""
    return source.startswith(PREFIX)


def build(
    source: str,
    device: str | torch.device = "cuda",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Any:
    """Build the ``arch:<kind>`` source ``source`` on ``device``; ValueError
    listing the known kinds otherwise. Each family names its kinds and their
    builders (functions of device, dtype and seed) in its registry entry's
    ``arch_builders``. The same seed gives the same weights on the same kind
    of device."""
    kind = source.removeprefix(PREFIX)
    builders = arch_builders()
    if not is_arch(source) or kind not in builders:
        known = ", ".join(PREFIX + name for name in sorted(builders))
        raise ValueError(f"unknown architecture source {source!r}; known: {known}")
    return import_object(builders[kind])(device, dtype, seed)
