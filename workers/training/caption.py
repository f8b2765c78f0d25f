"""Fine-tuning BLIP-2 for captions and visual question answering: ``imago
finetune caption``.

The vision encoder always stays frozen. What learns is ``parts``:

- ``"qformer"``: the Q-Former and the language projection, in full. peft
  keeps them as ``modules_to_save`` copies, so the adapter folder holds the
  two trained copies and the base model is left as it was;
- ``"lora"``: a LoRA (rank = alpha = ``TrainSettings.rank``) on the
  language model's attention projections (OPT's ``q_proj``, ``k_proj``,
  ``v_proj``, ``out_proj``), whose base weights stay frozen;
- ``"both"``: both.

An example is the processor's encoding of its image and text (so the image
placeholders are in ``input_ids``), followed by generation's end-of-sequence
token (``"\\n"`` for the COCO checkpoints) so that the adapter learns where to
stop. A caption has no prompt; a VQA example (one with a question) is
prompted as the server prompts it, ``Question: {question} Answer:``, and its
text is the answer. The loss is on the target tokens and that end token only
(labels are -100 on padding, image placeholders and the prompt).

The adapter is a folder written by ``PeftModel.save_pretrained``: put it in
the directory ``imago serve --caption-adapter-dir`` reads and ask for its
folder name as ``adapter``. Everything random (LoRA initialisation, dropout,
example order) follows ``TrainSettings.seed``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import DUMMY_TARGET_MODULES
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from imago.workers.checkpoints import tiny
from imago.workers.families.blip2.runner import normalise_legacy, vqa_prompt
from imago.workers.training.common import (
    Example,
    Optimizer,
    TrainSettings,
    autocast,
    autocast_dtype,
    batches,
    load_examples,
    pick_device,
    progress_bar,
    running_loss,
    share_readable,
)

PARTS = ("qformer", "lora", "both")
#: Modules trained in full for parts "qformer" and "both".
FULL_MODULES = ["qformer", "language_projection"]
#: The language model's attention projections the LoRA adapts (OPT's names).
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
#: Label of positions that carry no loss (transformers' ignore index).
IGNORE = -100


def load_base(
    base: str, cache_dir: Path | None = None
) -> tuple[Blip2Processor, Blip2ForConditionalGeneration]:
    """Processor and model (float32, CPU) of ``base`` (hub id, directory or
    ``tiny:KIND`` built under ``cache_dir``), with old checkpoints normalised
    as the server normalises them; ValueError naming ``base`` otherwise."""
    source = tiny.resolve(base, cache_dir)
    try:
        processor = Blip2Processor.from_pretrained(source)
        model = Blip2ForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
        normalise_legacy(processor, model)
    except (OSError, ValueError) as exc:
        raise ValueError(f"base: cannot load BLIP-2 from {base!r}: {exc}") from exc
    return processor, model


def lora_targets(model: Blip2ForConditionalGeneration) -> list[str]:
    """Full names of the language model's attention projections; ValueError
    when it has none by OPT's names."""
    targets = [
        name
        for name, module in model.named_modules()
        if name.startswith("language_model.")
        and name.rsplit(".", 1)[-1] in LORA_PROJECTIONS
        and isinstance(module, torch.nn.Linear)
    ]
    if not targets:
        raise ValueError(
            "base: the language model has no attention projections named "
            f"{', '.join(LORA_PROJECTIONS)} (only OPT language models take a LoRA); "
            "train the Q-Former alone"
        )
    return targets


def peft_config(model: Blip2ForConditionalGeneration, parts: str, rank: int) -> LoraConfig:
    """The adapter's configuration for ``parts`` (see :data:`PARTS`).

    peft refuses a LoRA that targets no module, and "qformer" needs exactly
    that: copies of whole modules and nothing low-rank. Its placeholder
    target ``DUMMY_TARGET_MODULES`` (what X-LoRA uses for the same purpose)
    is the one way peft itself allows; it is saved in adapter_config.json and
    understood on loading, so the folder loads with plain peft calls."""
    if parts not in PARTS:
        raise ValueError(f"parts must be one of {', '.join(PARTS)}, got {parts!r}")
    targets = lora_targets(model) if parts != "qformer" else DUMMY_TARGET_MODULES
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=FULL_MODULES if parts != "lora" else None,
    )


def prompt_and_target(example: Example) -> tuple[str, str]:
    """The text the model is given and the text it learns to continue with.
    Answers follow the prompt after a space, as words follow words in BPE."""
    if example.question is None:
        return "", example.text
    return vqa_prompt(example.question), " " + example.text


def build_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_starts: Sequence[int],
    image_token_id: int,
) -> torch.Tensor:
    """Labels for ``input_ids`` ``[batch, length]``: the ids themselves, but
    IGNORE on padding (``attention_mask`` 0), on image placeholders and on
    every position of row i before ``target_starts[i]`` (the prompt)."""
    labels = input_ids.clone()
    labels[attention_mask == 0] = IGNORE
    labels[input_ids == image_token_id] = IGNORE
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    starts = torch.tensor(list(target_starts)).unsqueeze(1)
    labels[positions < starts] = IGNORE
    return labels


def _eos_id(model: Blip2ForConditionalGeneration, processor: Blip2Processor) -> int:
    """The token generation stops at (the first, where there are several)."""
    eos = model.generation_config.eos_token_id
    if isinstance(eos, list | tuple):
        eos = eos[0] if eos else None
    return processor.tokenizer.eos_token_id if eos is None else int(eos)


def _image(example: Example, processor: Blip2Processor | None = None) -> Image.Image:
    """The example's image in RGB; with ``processor``, already at the size its
    image processor resizes to (which then leaves it as it is), so that a few
    hundred photos fit in memory."""
    try:
        with Image.open(example.image) as image:
            # Phone photos store their rotation in EXIF; train on what people see.
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ValueError(f"data: cannot read image {example.image}: {exc}") from exc
    if processor is None:
        return rgb
    images = processor.image_processor
    size = (images.size["width"], images.size["height"])
    return rgb.resize(size, Image.Resampling(int(images.resample)))


def encode(
    examples: Sequence[Example],
    processor: Blip2Processor,
    model: Blip2ForConditionalGeneration,
    images: Sequence[Image.Image] | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs with ``labels`` for ``examples``, right-padded. ``images``
    are their decoded images (read from the files when None). ValueError
    naming an example that is too long or whose prompt would tokenise
    differently before its target than alone."""
    eos = _eos_id(model, processor)
    image_id = model.config.image_token_index
    limit = model.config.text_config.max_position_embeddings
    rows, starts, pixels = [], [], []
    for index, example in enumerate(examples):
        image = images[index] if images is not None else _image(example)
        prompt, target = prompt_and_target(example)
        inputs = processor(images=image, text=prompt + target, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist() + [eos]
        prompt_ids = processor.tokenizer(prompt).input_ids
        placeholders = sum(1 for token in ids if token == image_id)
        start = placeholders + len(prompt_ids)
        if ids[placeholders:start] != prompt_ids:
            raise ValueError(f"data: {example.image}: the prompt tokenises differently before "
                             "the answer than alone; start the answer with a word")  # fmt: skip
        if len(ids) > limit:
            raise ValueError(f"data: {example.image}: {len(ids)} tokens with the image's, "
                             f"over the language model's {limit} positions")  # fmt: skip
        rows.append(ids)
        starts.append(start)
        pixels.append(inputs["pixel_values"][0])
    width = max(len(ids) for ids in rows)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.stack(pixels),
        "labels": build_labels(input_ids, attention_mask, starts, image_id),
    }


def trainable_model(model: Blip2ForConditionalGeneration, parts: str, rank: int) -> PeftModel:
    """``model`` wrapped for training ``parts``; everything else frozen, the
    vision encoder in eval mode (no dropout in features nothing learns from)."""
    peft_model = get_peft_model(model, peft_config(model, parts, rank))
    peft_model.train()
    model.vision_model.requires_grad_(False)
    model.vision_model.eval()
    return peft_model


def save(peft_model: PeftModel, folder: Path) -> None:
    """Write the adapter to ``folder``, replacing it whole: the files appear
    under a hidden name first (which no adapter directory scan reads), so a
    server reloading meanwhile sees the old adapter or the new, never half."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.partial")
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    peft_model.save_pretrained(str(staging))
    share_readable(staging)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def train(
    settings: TrainSettings,
    *,
    parts: str = "both",
    on_step: Callable[[int, float], object] | None = None,
) -> Path:
    """Train an adapter on ``settings.data`` and write it to ``settings.out``
    (a folder named after the adapter), with ``settings.checkpoint_every``
    checkpoints in ``<out>.checkpoints/step-N/``; returns ``settings.out``.
    ``on_step`` is called with each step's number (from 1) and loss.
    ValueError for bad settings, data or base model, naming the problem."""
    if parts not in PARTS:
        raise ValueError(f"parts must be one of {', '.join(PARTS)}, got {parts!r}")
    if settings.out.suffix == ".safetensors":
        raise ValueError(f"out: a caption adapter is a folder, not a file: {settings.out}")
    device = pick_device(settings.device)
    half = autocast_dtype(settings.mixed_precision, device)
    examples = load_examples(settings.data)
    processor, model = load_base(settings.base, settings.cache_dir)
    torch.manual_seed(settings.seed)
    peft_model = trainable_model(model, parts, settings.rank)
    fit(peft_model, processor, examples, settings, device, half, on_step)
    save(peft_model, settings.out)
    return settings.out


def fit(
    peft_model: PeftModel,
    processor: Blip2Processor,
    examples: Sequence[Example],
    settings: TrainSettings,
    device: torch.device,
    half: torch.dtype | None,
    on_step: Callable[[int, float], object] | None = None,
) -> None:
    """Run ``settings.steps`` AdamW steps on ``peft_model`` (from
    :func:`trainable_model`) over ``examples`` on ``device``, the forward pass
    in ``half`` precision when given, writing the checkpoints ``settings``
    asks for. ``on_step`` as for :func:`train`."""
    model = peft_model.get_base_model()
    # Decoding every image and encoding every text up front stops a broken
    # example at once, not hours in; the data sets this suits are small.
    decoded = {example.image: _image(example, processor) for example in examples}
    for example in examples:
        encode([example], processor, model, [decoded[example.image]])
    peft_model.to(device)
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = Optimizer(trained, settings.learning_rate, device, half)
    checkpoints = settings.out.with_name(settings.out.name + ".checkpoints")
    order = batches(list(examples), settings.batch_size, settings.seed)
    running = None
    with progress_bar(settings.steps, f"finetune caption {settings.adapter_name}") as bar:
        for step in range(1, settings.steps + 1):
            batch = next(order)
            inputs = encode(batch, processor, model, [decoded[e.image] for e in batch])
            inputs = {key: value.to(device) for key, value in inputs.items()}
            with autocast(device, half):
                loss = peft_model(**inputs).loss
            optimizer.step(loss)
            value = float(loss.detach())
            running = running_loss(running, value)
            bar.set_postfix(loss=f"{running:.4f}")
            bar.update(1)
            if on_step is not None:
                on_step(step, value)
            if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                save(peft_model, checkpoints / f"step-{step}")
