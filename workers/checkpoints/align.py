"""A tiny random-weight BLIP-2 image-text retrieval model built in seconds.

The checkpoint has the layout of Salesforce/blip2-itm-vit-g: a
``Blip2ForImageTextRetrieval`` (vision tower, Q-Former with its text layers,
vision and text projections and the image-text matching head) next to a
processor whose tokenizer is an uncased BERT WordPiece tokenizer and whose
image processor uses CLIP statistics. :func:`build` writes the full checkpoint;
:func:`build_without_itm` writes the same weights without the matching head,
as an alignment-only checkpoint would be.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import BertTokenizerFast, Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor

from imago.workers.checkpoints.blip2 import CORPUS, QFORMER_CONFIG, VISION_CONFIG, image_processor

SEED = 4321
NUM_QUERY_TOKENS = 4
# Q-Former text positions: the longest text in tokens, [CLS] and [SEP] included.
MAX_POSITIONS = 32
# Width of the shared image-text embedding space, unlike the Q-Former's 32 so
# that a projection left out shows up as a shape error.
EMBED_DIM = 16
# BERT's special tokens; [PAD] first so that it has id 0, the Q-Former's pad id.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Random weights spread this wide make embeddings and scores depend on input.
INIT_STD = 0.2


def _tokenizer() -> BertTokenizerFast:
    """Train an uncased WordPiece vocabulary on the built-in corpus."""
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    alphabet = list(string.ascii_lowercase + string.digits + string.punctuation)
    trainer = trainers.WordPieceTrainer(
        vocab_size=400,
        # Every printable ASCII character, alone and as a continuation, comes
        # first in a fixed order. The trainer would otherwise number them in
        # hash-map order, which changes from process to process, and ties
        # between merges are broken by those numbers: the vocabulary, and so
        # every checkpoint built from it, would differ from build to build.
        special_tokens=SPECIAL_TOKENS + alphabet + [f"##{c}" for c in alphabet],
        show_progress=False,
    )
    wordpiece.train_from_iterator(CORPUS.splitlines(), trainer)
    return BertTokenizerFast(
        vocab=wordpiece.get_vocab(), do_lower_case=True, model_max_length=MAX_POSITIONS
    )


def _processor() -> Blip2Processor:
    """The processor; creating it adds ``<image>`` to the tokenizer."""
    return Blip2Processor(image_processor(), _tokenizer(), num_query_tokens=NUM_QUERY_TOKENS)


def _model(processor: Blip2Processor) -> Blip2ForImageTextRetrieval:
    """Seeded random weights.

    ``image_token_index`` is set, as ``num_query_tokens`` is on the processor:
    ``processor(images=..., text=...)`` then prepends one ``<image>`` per query
    and the model strips them again, so a direct call works on both branches.
    """
    tokenizer = processor.tokenizer
    config = Blip2Config(
        vision_config=VISION_CONFIG,
        qformer_config={
            **QFORMER_CONFIG,
            "max_position_embeddings": MAX_POSITIONS,
            # Every id the tokenizer can produce (<image> included) has a row.
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            # Retrieval runs text through the Q-Former, so it needs the text
            # feed-forward layers that captioning checkpoints leave out.
            "use_qformer_text_input": True,
        },
        # Never built by the retrieval model; small so the config stays small.
        text_config={
            "model_type": "opt",
            "hidden_size": 32,
            "word_embed_proj_dim": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        num_query_tokens=NUM_QUERY_TOKENS,
        image_text_hidden_size=EMBED_DIM,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token.content),
        initializer_range=INIT_STD,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Blip2ForImageTextRetrieval(config).eval()
        # Query tokens start at zero, which would make every query alike.
        with torch.no_grad():
            model.query_tokens.normal_(0.0, INIT_STD)
    return model


def build(path: Path) -> None:
    """Write the tiny retrieval checkpoint, matching head included, to ``path``."""
    path = Path(path)
    processor = _processor()
    _model(processor).save_pretrained(path)
    processor.save_pretrained(path)


def build_without_itm(path: Path) -> None:
    """Write the weights of :func:`build` without the ``itm_head.*`` tensors."""
    path = Path(path)
    processor = _processor()
    model = _model(processor)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("itm_head.")}
    model.save_pretrained(path, state_dict=state)
    processor.save_pretrained(path)
