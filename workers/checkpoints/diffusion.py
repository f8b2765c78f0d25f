"""A tiny random-weight Stable Diffusion checkpoint, built locally in seconds.

It has the shape of Stable Diffusion 1.5 where the serving code cares: a UNet
with cross-attention, a VAE that downsamples by 8 into 4 latent channels, a
CLIP text encoder with 77 positions and a CLIP BPE tokenizer, and SD 1.5's PNDM
scheduler configuration. Every width is tiny, so a 64x64 image in 10 steps
takes a fraction of a second on a CPU. Weights are seeded, so two builds write
identical files.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from pathlib import Path

import torch
from tokenizers import Tokenizer

SEED = 0
#: Positions of the text encoder, as in CLIP ViT-L/14 (SD 1.5's text encoder).
MAX_PROMPT_TOKENS = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# Merges learnt on top of the 512 byte symbols; enough for whole common words.
_NUM_MERGES = 500

_CORPUS = (
    "a photo of a cat sitting on a red chair",
    "a painting of a mountain lake at sunset, oil on canvas",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of fruit on a wooden table, still life",
    "portrait of an old man with a beard, dramatic lighting",
    "a futuristic city skyline at night with neon lights",
    "a watercolor drawing of a small house in a green forest",
    "a dog running on the beach in the morning light",
    "a close up photo of a flower with water drops, macro",
    "a castle on a hill under a cloudy sky, fantasy landscape",
    "a cup of coffee and a book next to a window on a rainy day",
    "a bird flying over the ocean, high quality, detailed",
    "a blue car parked in front of a white building",
    "an illustration of a robot reading a newspaper",
    "snowy mountains and a frozen river, cinematic, 4k",
    "a girl with a yellow umbrella walking in the city street",
    "blurry, low quality, bad anatomy, watermark, text, ugly",
    "the quick brown fox jumps over the lazy dog",
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _word_counts(backend: Tokenizer) -> dict[tuple[str, ...], int]:
    """Corpus words as CLIP splits them (``backend``'s normaliser and
    pre-tokeniser), each as byte symbols with ``</w>`` on the last one."""
    counts: Counter[str] = Counter()
    for text in _CORPUS:
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(
            backend.normalizer.normalize_str(text)
        ):
            counts[piece] += 1
    return {(*word[:-1], word[-1] + "</w>"): n for word, n in sorted(counts.items())}


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _learn_merges(words: dict[tuple[str, ...], int], limit: int) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first. Ties go to the smallest
    pair, so every build learns the same merges (the ``tokenizers`` trainer
    breaks ties in hash order, which differs from run to run)."""
    merges: list[tuple[str, str]] = []
    while len(merges) < limit:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in words.items():
            for pair in pairwise(symbols):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = {_merge(symbols, best): n for symbols, n in words.items()}
    return merges


def _train_tokenizer() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn BPE merges on the built-in corpus and lay out the vocabulary as
    CLIP does: 256 byte symbols, the same with ``</w>``, one entry per merge,
    then the two special tokens."""
    from transformers import CLIPTokenizer

    # An empty CLIPTokenizer lends its normaliser and pre-tokeniser, so the
    # merges are learnt on exactly the pieces they will later be applied to.
    words = _word_counts(CLIPTokenizer(bos_token=BOS, eos_token=EOS).backend_tokenizer)
    merges = _learn_merges(words, _NUM_MERGES)

    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build(path: Path) -> None:
    """Write a complete tiny Stable Diffusion checkpoint to ``path``, loadable
    with ``StableDiffusionPipeline.from_pretrained(path)``."""
    from diffusers import StableDiffusionPipeline

    components = _components(unet_in_channels=4, unet_seed=SEED + 1)
    StableDiffusionPipeline(**components).save_pretrained(path, safe_serialization=True)


def build_inpaint(path: Path) -> None:
    """Write a tiny dedicated inpainting checkpoint to ``path``, loadable with
    ``StableDiffusionInpaintPipeline.from_pretrained(path)``: the same text
    encoder, VAE and scheduler as :func:`build`, and a UNet that takes 9
    channels (noisy latents, mask, masked-image latents) as SD 1.5
    inpainting's does."""
    from diffusers import StableDiffusionInpaintPipeline

    components = _components(unet_in_channels=9, unet_seed=SEED + 3)
    StableDiffusionInpaintPipeline(**components).save_pretrained(path, safe_serialization=True)


def build_taesd(path: Path) -> None:
    """Write a tiny TAESD (``AutoencoderTiny``) to ``path``, loadable with
    ``AutoencoderTiny.from_pretrained(path)``: it decodes the tiny model's
    4-channel latents at the VAE's 8x scale, as madebyollin/taesd does SD's."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(SEED + 4)
    taesd = AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )
    taesd.save_pretrained(path, safe_serialization=True)


def build_ip_adapter(path: Path) -> None:
    """Write a tiny IP-Adapter for the tiny model to ``path``: a CLIP image
    encoder in ``image_encoder/`` and ``ip-adapter.safetensors`` holding the
    image projection (4 tokens) and the key/value projections of every
    cross-attention layer, laid out as h94/IP-Adapter's SD 1.5 files are."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(SEED + 5)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=4,
            projection_dim=32,
        )  # fmt: skip
    )
    encoder.save_pretrained(path / "image_encoder", safe_serialization=True)
    unet = _components(unet_in_channels=4, unet_seed=SEED + 1)["unet"]
    cross, widths = unet.config.cross_attention_dim, unet.config.block_out_channels
    weights, key = {}, 1
    # diffusers numbers the cross-attention layers 1, 3, 5, ... in processor order.
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else -1
        width = list(reversed(widths))[block] if name.startswith("up_blocks") else widths[block]
        for projection in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{key}.{projection}.weight"] = torch.randn(width, cross) * 0.2
        key += 2
    tokens = 4
    weights["image_proj.proj.weight"] = torch.randn(cross * tokens, 32) * 0.2
    weights["image_proj.proj.bias"] = torch.zeros(cross * tokens)
    weights["image_proj.norm.weight"] = torch.ones(cross)
    weights["image_proj.norm.bias"] = torch.zeros(cross)
    save_file(weights, path / "ip-adapter.safetensors")


def _components(unet_in_channels: int, unet_seed: int) -> dict:
    """Seeded pipeline components; only the UNet depends on the arguments."""
    # Imported here so that listing the tiny builders stays cheap.
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = _train_tokenizer()
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=MAX_PROMPT_TOKENS,
    )

    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            projection_dim=32,
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        )
    )

    torch.manual_seed(unet_seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=unet_in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # Cross-attention only at the lower resolution: attention cost grows with
        # the square of the latent area, and 512 px requests must stay cheap.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    )

    torch.manual_seed(SEED + 2)
    # Four blocks give three downsamplings: vae_scale_factor 8, as in SD 1.5.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )

    # SD 1.5's scheduler_config.json.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )

    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }
