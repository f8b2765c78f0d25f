"""A tiny random-weight BLIP-2 (OPT language model) built in seconds.

The checkpoint has the layout of the real Salesforce BLIP-2 OPT checkpoints:
a GPT-2 style byte-level BPE tokenizer with OPT's special tokens, a BLIP image
processor with CLIP statistics, ``"\\n"`` as the end-of-sequence token of
generation (as for the COCO fine-tuned checkpoints) and a few spare embedding
rows past the tokenizer's vocabulary. :func:`build` writes the current form,
with ``<image>`` tokens; :func:`build_legacy` writes the same weights in the
form saved before image tokens existed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    GenerationConfig,
    GPT2Tokenizer,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SEED = 1234
IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 4
MAX_POSITIONS = 128
IMAGE_TOKEN = "<image>"
# OPT's special tokens, in OPT's id order.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
# Random weights spread this wide make the output depend on image and prompt.
INIT_STD = 0.2
#: The vision tower and Q-Former of the tiny BLIP-2 models.
VISION_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "patch_size": 8,
    "initializer_range": INIT_STD,
}
QFORMER_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "encoder_hidden_size": 32,
    "initializer_range": INIT_STD,
}

CORPUS = """\
a photo of a dog running on the grass
a cat sleeping on a red couch
two cats laying on a couch with remote controls
a man riding a horse on the beach
a woman holding an umbrella in the rain
a bowl of fruit on a wooden table
a plate of food with broccoli and rice
a group of people standing in a park
a red bus driving down a city street
a train stopped at a station platform
a small boat on a calm lake at sunset
a bird sitting on a branch of a tree
a child flying a kite in a field
a kitchen with white cabinets and a window
a bathroom with a sink and a mirror
a living room with a television and a sofa
a person skiing down a snowy mountain
a surfer riding a wave in the ocean
a giraffe standing next to a tall tree
an elephant walking through the tall grass
a pizza with cheese and tomatoes on a plate
a stop sign on the corner of a street
a clock tower in the middle of a city
a black and white photo of an old car
a close up of a sandwich on a table
a young boy playing with a soccer ball
a laptop computer sitting on a desk
a vase of flowers on a window sill
a motorcycle parked next to a building
a baseball player swinging a bat at a ball
Question: what color is the car? Answer: red
Question: how many cats are there? Answer: two
Question: what is the man doing? Answer: riding a horse
Question: where is the dog? Answer: on the grass
Question: is it raining? Answer: yes
Question: what is on the table? Answer: a bowl of fruit
"""


def _tokenizer() -> GPT2Tokenizer:
    """Train a byte-level BPE on the built-in corpus and wrap it as OPT's is."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the vocabulary, so any text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    return GPT2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )


def image_processor() -> BlipImageProcessor:
    """BLIP image preprocessing at the tiny size, with CLIP statistics."""
    return BlipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


def _model(
    tokenizer: GPT2Tokenizer, image_token_index: int | None
) -> Blip2ForConditionalGeneration:
    """Seeded random weights. ``image_token_index`` changes only the config."""
    newline = tokenizer.convert_tokens_to_ids("Ċ")  # byte-level spelling of "\n"
    base = len(tokenizer) - (image_token_index is not None)
    # Round up past the vocabulary, leaving room for <image>, as OPT's 50272 rows
    # hold its 50265 tokens.
    vocab_size = (base // 8 + 1) * 8
    config = Blip2Config(
        vision_config=VISION_CONFIG,
        qformer_config=QFORMER_CONFIG,
        text_config={
            "model_type": "opt",
            "hidden_size": 32,
            "word_embed_proj_dim": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": MAX_POSITIONS,
            "vocab_size": vocab_size,
            "init_std": INIT_STD,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": newline,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_index,
        initializer_range=INIT_STD,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Blip2ForConditionalGeneration(config).eval()
    _prefer_printable(model, tokenizer, base, keep={newline})
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=newline,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


@torch.no_grad()
def _prefer_printable(
    model: Blip2ForConditionalGeneration, tokenizer: GPT2Tokenizer, base: int, keep: set[int]
) -> None:
    """Make random weights emit legible text rather than stray bytes.

    One hidden unit of the final layer norm is pinned to 1; the tied embedding
    gives every special, spare or non-printable token a large negative weight
    on it, so their logits sit far below the rest.
    """
    decoder = model.language_model.model.decoder
    unit = 0
    decoder.final_layer_norm.weight[unit] = 0.0
    decoder.final_layer_norm.bias[unit] = 1.0
    embedding = decoder.embed_tokens.weight
    # OPT's "<s>" is a plain vocabulary entry, yet should never be generated.
    special = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS))
    for token_id in range(embedding.shape[0]):
        text = tokenizer.decode([token_id]) if token_id < base else ""
        legible = text.isascii() and text.isprintable() and text != ""
        good = token_id in keep or (legible and token_id not in special)
        embedding[token_id, unit] = 0.0 if good else -8.0


def build(path: Path) -> None:
    """Write the tiny checkpoint (model and processor) to ``path``."""
    path = Path(path)
    tokenizer = _tokenizer()
    # The processor adds <image> to the tokenizer as a special token.
    processor = Blip2Processor(image_processor(), tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    model = _model(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    model.save_pretrained(path)
    processor.save_pretrained(path)


def build_legacy(path: Path) -> None:
    """Write the same weights as :func:`build` in the pre-image-token form.

    Like checkpoints saved before BLIP-2 had image tokens: no ``<image>`` in
    the tokenizer, no ``image_token_index`` in config.json, and no processor
    config (so no ``num_query_tokens``), only the image processor's
    preprocessor_config.json next to the tokenizer files.
    """
    path = Path(path)
    tokenizer = _tokenizer()
    model = _model(tokenizer, None)
    model.save_pretrained(path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("image_token_index", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(path)
    images = image_processor()
    images.processor_class = "Blip2Processor"
    images.save_pretrained(path)
