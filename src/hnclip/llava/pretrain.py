"""Train the demo LLaVA's projector and language model on synthetic data, with the vision tower frozen.

Two stages, as LLaVA-1.5 trains (tower frozen throughout):

1. *Alignment* on image-caption pairs in LLaVA's ``plain`` format (the image tokens, then the caption). The
   demo's captions are the HNC training positives of the synthetic GQA images. LLaVA-1.5 trains only the
   projector here because its Vicuna is already a language model; the demo's tiny Llama starts from scratch,
   so it trains too.
2. *Instruction tuning* on the VQA training questions with the LLaVA-1.5 evaluation prompt. As in LLaVA-1.5's
   data mix, an image's questions form one multi-turn conversation (only the first turn carries the image);
   the loss is on the answers and their ``</s>`` only.
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
    IMAGE_TOKEN,
    OCR_LINE_PREFIX,
    asked_question,
    expand_image_tokens,
    llava15_followup_turn,
    llava15_prompt,
    num_image_tokens,
    pad_colour_from_mean,
    preprocess_images,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value HF's causal-LM loss skips
LOG_COLUMNS = ("stage", "step", "loss", "lr", "target_tokens", "seconds")
REQUIRED_COLUMNS = ("dataset", "question_id", "image_path", "question", "majority_answer", "ocr_tokens")
READING_DATASETS = ("textvqa",)  # datasets whose answers are read off the image: spelled, never words
CAPTION_COLUMNS = ("image_path", "positive")  # the preprocess stage's HNC shards


class PretrainDataError(ValueError):
    """The demo LLaVA's training data (question tables, caption shards, batch sizes) is unusable."""


@dataclass(frozen=True)
class TrainingExample:
    """One tokenised sequence (a caption, or a conversation of questions about one image): ids, labels that mask
    everything but the targets, and its image's row in the pixel table."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    image_row: int


def _read_tables(paths: Sequence[str | os.PathLike], columns: Sequence[str], what: str) -> pd.DataFrame:
    """Concatenate Parquet files, naming the file that lacks one of ``columns``."""
    tables = []
    for path in paths:
        table = pd.read_parquet(path)
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise PretrainDataError(f"{path} lacks column(s) {missing}")
        tables.append(table)
    if not tables:
        raise PretrainDataError(f"no {what} tables given")
    return pd.concat(tables, ignore_index=True)


def load_question_tables(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate preprocess-stage question Parquets, checking the columns training needs."""
    return _read_tables(paths, REQUIRED_COLUMNS, "training question")


def load_caption_tables(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """The distinct (image_path, caption) pairs of preprocess-stage HNC shards (their ``positive`` captions)."""
    captions = _read_tables(paths, CAPTION_COLUMNS, "caption")[list(CAPTION_COLUMNS)]
    return captions.drop_duplicates(ignore_index=True).rename(columns={"positive": "caption"})


def _ocr_list(value) -> list[str]:
    return [] if value is None else [str(token) for token in value]


def tokenizer_training_texts(questions: pd.DataFrame) -> Iterator[str]:
    """The words the demo tokenizer keeps whole: the prompts (OCR line prefix included) and the answers,
    except what is read off a sign (OCR tokens, every TextVQA answer, even where the OCR missed), which it spells."""
    yield OCR_LINE_PREFIX
    for row in questions.itertuples(index=False):
        yield llava15_prompt(asked_question(row.question, row.dataset))
        if row.dataset not in READING_DATASETS:
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


def caption_examples(
    captions: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, image_tokens: int, image_rows: dict[str, int]
) -> list[TrainingExample]:
    """Alignment examples after LLaVA's ``plain`` format: ``<s>``, the image tokens, then the caption as target.

    LLaVA ends the caption with its ``"\\n"`` separator; the demo ends it with ``</s>``, the token its answers end with.
    """
    prompt_ids = tokenizer(expand_image_tokens(IMAGE_TOKEN, image_tokens))["input_ids"]
    examples = []
    for row in captions.itertuples(index=False):
        target = tokenizer(str(row.caption), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(TrainingExample(
            input_ids=tuple(prompt_ids + target),
            labels=tuple([IGNORE_INDEX] * len(prompt_ids) + target),
            image_row=image_rows[str(row.image_path)],
        ))
    return examples


def _conversations(questions: pd.DataFrame, max_turns: int) -> Iterator[list]:
    """Each image's questions in table order, cut into conversations of at most ``max_turns`` questions."""
    by_image: dict[str, list] = {}
    for row in questions.itertuples(index=False):
        by_image.setdefault(str(row.image_path), []).append(row)
    for rows in by_image.values():
        for start in range(0, len(rows), max_turns):
            yield rows[start:start + max_turns]


def build_training_examples(
    questions: pd.DataFrame,
    tokenizer: PreTrainedTokenizerBase,
    image_tokens: int,
    image_rows: dict[str, int],
    *,
    ocr_prompt_fraction: float,
    seed: int,
    max_turns: int = 1,
) -> list[TrainingExample]:
    """Tokenise each image's questions as conversations of up to ``max_turns`` turns, answers as targets.

    The first turn is the full evaluation prompt (system line, image, question); later turns follow the
    previous answer's ``</s>``. OCR-bearing questions get the OCR line with probability ``ocr_prompt_fraction``:
    training on both prompt variants keeps either in distribution, so TextVQA can be evaluated with or without it.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    rng = random.Random(seed)
    examples = []
    for conversation in _conversations(questions, max_turns):
        input_ids: list[int] = []
        labels: list[int] = []
        for turn, row in enumerate(conversation):
            ocr = _ocr_list(row.ocr_tokens)
            ocr = ocr if ocr and rng.random() < ocr_prompt_fraction else None
            question = asked_question(row.question, row.dataset)
            if turn == 0:
                prompt_ids = tokenizer(expand_image_tokens(llava15_prompt(question, ocr_tokens=ocr), image_tokens))
            else:
                prompt_ids = tokenizer(llava15_followup_turn(question, ocr_tokens=ocr), add_special_tokens=False)
            answer_ids = _answer_ids(tokenizer, str(row.majority_answer))
            input_ids += prompt_ids["input_ids"] + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids["input_ids"]) + answer_ids
        examples.append(TrainingExample(tuple(input_ids), tuple(labels), image_rows[str(conversation[0].image_path)]))
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


def _batches_forever(n_examples: int, batch_size: int, generator: torch.Generator, stage: str) -> Iterator[list[int]]:
    """Shuffled epochs; a short last batch is dropped, so every step sees ``batch_size`` examples."""
    if n_examples < batch_size:
        raise PretrainDataError(f"{stage} stage: {n_examples} training sequences is fewer than one batch of "
                                f"{batch_size} (llava.{STAGE_BATCH_KEYS[stage]})")
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


STAGE_BATCH_KEYS = {"alignment": "align_batch_size", "instruction": "pretrain_batch_size"}


@dataclass(frozen=True)
class StageSettings:
    """One training stage's optimisation: AdamW, linear warm-up (default 5 % of ``steps``), cosine decay."""

    name: str
    steps: int
    lr: float
    batch_size: int
    seed: int
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


def _train_stage(model, examples, pixel_table, pad_id: int, settings: StageSettings, writer) -> dict:
    """Train ``model``'s trainable parameters on ``examples``; one log row per step. Returns the stage summary."""
    device = next(model.parameters()).device
    pixel_table = pixel_table.to(device=device, dtype=next(model.parameters()).dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(1, settings.steps // 20) if settings.warmup_steps is None else settings.warmup_steps
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, settings.steps)
    batches = _batches_forever(len(examples), settings.batch_size, torch.Generator().manual_seed(settings.seed),
                               settings.name)
    losses: list[float] = []
    started = time.perf_counter()
    for step in tqdm(range(1, settings.steps + 1), desc=f"demo llava: {settings.name}", unit="step"):
        batch = collate_examples([examples[i] for i in next(batches)], pixel_table, pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        current_lr = scheduler.get_last_lr()[0]
        losses.append(_training_step(model, optimizer, scheduler, batch, settings.max_grad_norm))
        target_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
        writer.writerow([settings.name, step, f"{losses[-1]:.6f}", f"{current_lr:.6g}", target_tokens,
                         f"{time.perf_counter() - started:.3f}"])
    tail = losses[-min(len(losses), 20):]
    return {
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "first_loss": losses[0] if losses else math.nan,
        "final_loss": sum(tail) / len(tail) if tail else math.nan,
        "seconds": time.perf_counter() - started,
        "n_sequences": len(examples),
    }


def _image_rows(image_paths: Sequence[str]) -> dict[str, int]:
    return {path: row for row, path in enumerate(image_paths)}


def _alignment_stage(model, tokenizer, image_processor, caption_parquets, background, image_tokens: int,
                     settings: StageSettings, writer) -> dict:
    captions = load_caption_tables(caption_parquets)
    caption_images = sorted(set(captions["image_path"].astype(str)))
    examples = caption_examples(captions, tokenizer, image_tokens, _image_rows(caption_images))
    pixels = load_pixel_table(caption_images, image_processor, background)
    return {**_train_stage(model, examples, pixels, tokenizer.pad_token_id, settings, writer),
            "n_captions": len(captions), "n_images": len(caption_images)}


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
    ocr_prompt_fraction: float = 1.0,
    max_turns: int = 1,
    caption_parquets: Sequence[str | os.PathLike] = (),
    alignment_steps: int = 0,
    alignment_batch_size: int = 32,
    alignment_lr: float | None = None,
    pad_colour: tuple[int, int, int] | None = None,
) -> dict:
    """Train projector + language model in place; the tower stays frozen.

    With ``alignment_steps`` > 0, first the alignment stage on the captions of ``caption_parquets`` (learning
    rate ``alignment_lr``, default ``lr``), then instruction tuning on the questions of ``train_parquets``
    (conversations of up to ``max_turns`` questions per image). fp32 on the model's device. Writes a per-step
    CSV to ``log_path`` (atomically, at the end) and returns a summary: the instruction stage's figures at the
    top level (steps, losses, seconds, question/image counts, trainable parameters), the alignment stage's
    under ``"alignment"``, and ``total_seconds`` (both stages and data preparation).
    """
    if alignment_steps and not caption_parquets:
        raise PretrainDataError("alignment_steps > 0 needs caption tables (caption_parquets)")
    torch.manual_seed(seed)
    questions = load_question_tables(train_parquets)
    background = tuple(pad_colour) if pad_colour is not None else pad_colour_from_mean(image_processor.image_mean)
    image_tokens = num_image_tokens(model.config.vision_config, model.config.vision_feature_select_strategy)
    model.train()
    freeze_vision_tower(model)
    summary: dict = {}
    started = time.perf_counter()
    with atomic_path(log_path) as tmp_log, open(tmp_log, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LOG_COLUMNS)
        if alignment_steps:
            alignment = StageSettings("alignment", alignment_steps, alignment_lr or lr, alignment_batch_size, seed,
                                      weight_decay=weight_decay, max_grad_norm=max_grad_norm)
            summary["alignment"] = _alignment_stage(model, tokenizer, image_processor, caption_parquets, background,
                                                    image_tokens, alignment, writer)
        image_paths = sorted(set(questions["image_path"].astype(str)))
        examples = build_training_examples(questions, tokenizer, image_tokens, _image_rows(image_paths),
                                           ocr_prompt_fraction=ocr_prompt_fraction, seed=seed, max_turns=max_turns)
        pixels = load_pixel_table(image_paths, image_processor, background)
        instruction = StageSettings("instruction", steps, lr, batch_size, seed, warmup_steps, weight_decay,
                                    max_grad_norm)
        summary.update(_train_stage(model, examples, pixels, tokenizer.pad_token_id, instruction, writer))
        handle.flush()
    model.eval()
    return {
        **summary,
        "seed": seed,
        "max_turns": max_turns,
        "ocr_prompt_fraction": ocr_prompt_fraction,
        "total_seconds": time.perf_counter() - started,
        "n_questions": len(questions),
        "n_images": len(image_paths),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_tower_parameters": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "pad_colour": list(background),
    }


def demo_tokenizer_texts(
    train_parquets: Iterable[str | os.PathLike], caption_parquets: Iterable[str | os.PathLike] = ()
) -> Iterator[str]:
    """The tokenizer corpus for the demo LLaVA: prompts and answers of the question tables, and the captions."""
    yield from tokenizer_training_texts(load_question_tables(list(train_parquets)))
    caption_parquets = list(caption_parquets)
    if caption_parquets:
        yield from load_caption_tables(caption_parquets)["caption"]
