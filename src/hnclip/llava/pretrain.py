"""Train the demo LLaVA's projector and language model on synthetic VQA, with the vision tower frozen.

LLaVA-1.5 trains projector + LLM on top of a frozen CLIP tower; the demo does the same in miniature, so
that swapping a fine-tuned tower in later measures what the tower contributes. Each training example is the
LLaVA-1.5 evaluation prompt followed by the majority answer and ``</s>``; the loss is on those answer tokens only.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from hnclip.io import atomic_path
from hnclip.llava.prompt import (
    expand_image_tokens,
    llava15_prompt,
    num_image_tokens,
    pad_colour_from_mean,
    preprocess_images,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value HF's causal-LM loss skips
LOG_COLUMNS = ("step", "loss", "lr", "answer_tokens", "seconds")
REQUIRED_COLUMNS = ("question_id", "image_path", "question", "majority_answer", "ocr_tokens")


class PretrainDataError(ValueError):
    """A training question table lacks what the demo LLaVA needs."""


@dataclass(frozen=True)
class TrainingExample:
    """One tokenised question: prompt + answer ids, labels masking the prompt, and its image's row in the pixel table."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    image_row: int


def load_question_tables(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate preprocess-stage question Parquets, checking the columns training needs."""
    tables = []
    for path in paths:
        table = pd.read_parquet(path)
        missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
        if missing:
            raise PretrainDataError(f"{path} lacks column(s) {missing}")
        tables.append(table)
    if not tables:
        raise PretrainDataError("no training question tables given")
    return pd.concat(tables, ignore_index=True)


def _ocr_list(value) -> list[str]:
    return [] if value is None else [str(token) for token in value]


def tokenizer_training_texts(questions: pd.DataFrame) -> Iterator[str]:
    """Every text the demo tokenizer must know: each prompt (with and without OCR line) and every answer."""
    for row in questions.itertuples(index=False):
        ocr = _ocr_list(row.ocr_tokens)
        yield llava15_prompt(row.question, ocr_tokens=ocr or None)
        yield llava15_prompt(row.question)
        yield from (str(answer) for answer in getattr(row, "answers", [row.majority_answer]))
        yield str(row.majority_answer)


def load_pixel_table(
    image_paths: Sequence[str], image_processor, background: tuple[int, int, int], batch_size: int = 256
) -> torch.Tensor:
    """Preprocess every image once (square padding + CLIP processor): the images are tiny, training reuses them."""
    chunks = []
    for start in tqdm(range(0, len(image_paths), batch_size), desc="preprocess images", unit="batch"):
        images = []
        for path in image_paths[start:start + batch_size]:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except OSError as error:
                raise PretrainDataError(f"cannot read training image {path}: {error}") from error
        chunks.append(preprocess_images(images, image_processor, background))
    return torch.cat(chunks)


def _answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    # vicuna_v1 separates "ASSISTANT:" and the reply with a space and ends the reply with </s>.
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def build_training_examples(
    questions: pd.DataFrame,
    tokenizer: PreTrainedTokenizerBase,
    image_tokens: int,
    image_rows: dict[str, int],
    *,
    ocr_prompt_fraction: float,
    seed: int,
) -> list[TrainingExample]:
    """Tokenise each question's prompt and majority answer; OCR-bearing questions get the OCR line at random.

    Training on both prompt variants keeps the OCR line in distribution, so the demo can be evaluated on
    TextVQA with and without it, like LLaVA-1.5.
    """
    rng = random.Random(seed)
    examples = []
    for row in questions.itertuples(index=False):
        ocr = _ocr_list(row.ocr_tokens)
        use_ocr = bool(ocr) and rng.random() < ocr_prompt_fraction
        prompt = expand_image_tokens(llava15_prompt(row.question, ocr_tokens=ocr if use_ocr else None), image_tokens)
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = _answer_ids(tokenizer, str(row.majority_answer))
        examples.append(TrainingExample(
            input_ids=tuple(prompt_ids + answer_ids),
            labels=tuple([IGNORE_INDEX] * len(prompt_ids) + answer_ids),
            image_row=image_rows[str(row.image_path)],
        ))
    return examples


def collate_examples(examples: Sequence[TrainingExample], pixel_table: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (training needs no left padding: positions start at 0 for every row)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids)
        labels[i, :n] = torch.tensor(example.labels)
        attention_mask[i, :n] = 1
    pixel_values = pixel_table[torch.tensor([e.image_row for e in examples])]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values}


def _batches_forever(n_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Shuffled epochs; a short last batch is dropped, so every step sees ``batch_size`` examples."""
    if n_examples < batch_size:
        raise PretrainDataError(f"{n_examples} training questions is fewer than one batch of {batch_size}")
    while True:
        order = torch.randperm(n_examples, generator=generator).tolist()
        for start in range(0, n_examples - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def freeze_vision_tower(model: LlavaForConditionalGeneration) -> None:
    """LLaVA-1.5 never updates the tower: no gradients, and eval mode so nothing stateful changes."""
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    tower.eval()


def _training_step(model, optimizer, scheduler, batch, max_grad_norm: float) -> float:
    loss = model(**batch).loss
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def pretrain_demo_llava(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    image_processor,
    train_parquets: list[Path],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    log_path: str | os.PathLike,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    ocr_prompt_fraction: float = 0.5,
    pad_colour: tuple[int, int, int] | None = None,
) -> dict:
    """Train projector + language model in place on the questions of ``train_parquets``; the tower stays frozen.

    fp32 on the model's device, AdamW with linear warm-up (default 5 % of ``steps``) then cosine decay,
    loss on answer tokens only. Writes a per-step CSV to ``log_path`` (atomically, at the end) and returns a
    summary: steps, final loss, seconds, question/image counts, trainable parameters.
    """
    torch.manual_seed(seed)
    questions = load_question_tables(train_parquets)
    background = tuple(pad_colour) if pad_colour is not None else pad_colour_from_mean(image_processor.image_mean)
    image_paths = sorted(set(questions["image_path"].astype(str)))
    pixel_table = load_pixel_table(image_paths, image_processor, background)
    image_tokens = num_image_tokens(model.config.vision_config, model.config.vision_feature_select_strategy)
    examples = build_training_examples(
        questions, tokenizer, image_tokens, {p: i for i, p in enumerate(image_paths)},
        ocr_prompt_fraction=ocr_prompt_fraction, seed=seed,
    )
    device = next(model.parameters()).device
    pixel_table = pixel_table.to(device=device, dtype=next(model.parameters()).dtype)

    model.train()
    freeze_vision_tower(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    batches = _batches_forever(len(examples), batch_size, torch.Generator().manual_seed(seed))

    losses: list[float] = []
    started = time.perf_counter()
    with atomic_path(log_path) as tmp_log, open(tmp_log, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LOG_COLUMNS)
        for step in tqdm(range(1, steps + 1), desc="pretrain demo llava", unit="step"):
            batch = {k: v.to(device) for k, v in collate_examples([examples[i] for i in next(batches)], pixel_table,
                                                                   tokenizer.pad_token_id).items()}
            current_lr = scheduler.get_last_lr()[0]
            losses.append(_training_step(model, optimizer, scheduler, batch, max_grad_norm))
            answer_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
            writer.writerow([step, f"{losses[-1]:.6f}", f"{current_lr:.6g}", answer_tokens,
                             f"{time.perf_counter() - started:.3f}"])
        handle.flush()
    model.eval()
    tail = losses[-min(len(losses), 20):]
    return {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "final_loss": sum(tail) / len(tail) if tail else math.nan,
        "first_loss": losses[0] if losses else math.nan,
        "seconds": time.perf_counter() - started,
        "n_questions": len(examples),
        "n_images": len(image_paths),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "frozen_tower_parameters": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "pad_colour": list(background),
    }


def demo_tokenizer_texts(train_parquets: Iterable[str | os.PathLike]) -> Iterator[str]:
    """The tokenizer corpus for the demo LLaVA: prompts and answers of the given question tables."""
    return tokenizer_training_texts(load_question_tables(list(train_parquets)))
