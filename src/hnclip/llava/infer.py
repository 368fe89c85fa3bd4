"""Batched, resumable greedy VQA inference with a transformers LLaVA, following the LLaVA-1.5 protocol.

LLaVA's own scripts run batch size 1 because their batching changed answers. Here batches are left-padded
with an attention mask; ``generate`` derives position ids from that mask, so every row sees the same
positions and keys as it would alone (the tests check identical answers at batch 16 and batch 1).

Output is one JSON line per question, flushed batch by batch. A killed job is resumed by calling
``answer_questions`` again on the same file: complete lines are kept, a trailing partial line dropped, and
only the missing questions are answered. The jobs (``answer_chunk``, ``predict_vqa``) keep that file in a state
directory that is continued only by the job that made it (same model, questions, settings and code).
``gather_chunks`` turns chunk files into the final predictions file, atomically and only when no question is
missing or duplicated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaForConditionalGeneration

from hnclip.llava.predictions import (  # noqa: F401  (re-exported: the inference API)
    PredictionFileError,
    gather_chunks,
    read_completed_predictions,
)
from hnclip.llava.demo_model import PROTOCOL_FILE
from hnclip.llava.prompt import (
    asked_question,
    expand_image_tokens,
    llava15_prompt,
    num_image_tokens,
    pad_colour_from_mean,
    preprocess_images,
    prompt_variant,
)
from hnclip.loader import default_loader_workers, read_ahead
from hnclip.llava.tower_delta import files_dir, load_llava
from hnclip.resume import claim_state_dir, job_fingerprint, release_state_dir

logger = logging.getLogger(__name__)

QUESTION_COLUMNS = ("question_id", "image_path", "question")
# Settings that must agree between a resumed file's existing lines and the new run.
RESUME_KEYS = ("prompt_variant", "max_new_tokens")  # a record is continued only with the same of each


class QuestionTableError(ValueError):
    """The question table given to inference is unusable (missing columns, duplicate ids, unreadable image)."""


@dataclass
class LlavaForInference:
    """A LLaVA checkpoint loaded for VQA: model in eval mode, left-padding tokenizer, PIL CLIP processor."""

    model: LlavaForConditionalGeneration
    tokenizer: Any
    image_processor: Any
    pad_colour: tuple[int, int, int]


def load_llava_for_inference(
    checkpoint_dir: str | os.PathLike, *, device: str = "cpu", dtype: str | torch.dtype = "auto"
) -> LlavaForInference:
    """Load a HF LLaVA checkpoint directory (demo or ``llava-hf``-derived) or a tower delta of one
    (``hnclip.llava.tower_delta``) for ``answer_questions``.

    The pad colour comes from ``llava_protocol.json`` when present, else from LLaVA's rule (processor mean).
    """
    files = files_dir(checkpoint_dir)
    model = load_llava(checkpoint_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(files)
    tokenizer.padding_side = "left"
    # The PIL backend matches the CLIPImageProcessor LLaVA-1.5 was evaluated with (PIL bicubic resize).
    image_processor = CLIPImageProcessorPil.from_pretrained(files)
    protocol_file = files / PROTOCOL_FILE
    if protocol_file.is_file():
        pad_colour = tuple(json.loads(protocol_file.read_text())["pad_colour"])
    else:
        pad_colour = pad_colour_from_mean(image_processor.image_mean)
    return LlavaForInference(model, tokenizer, image_processor, pad_colour)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Reading and resuming prediction files
# ----------------------------------------------------------------------------------------------------------------


def _check_resume_settings(path: Path, done: dict[int, dict], expected: dict[int, dict[str, Any]]) -> None:
    """Every answered question was asked as this run would ask it (``expected``: per question id, RESUME_KEYS)."""
    for question_id, record in done.items():
        wanted = expected.get(question_id)
        for key in RESUME_KEYS if wanted is not None else ():
            if record.get(key) != wanted[key]:
                raise PredictionFileError(
                    f"{path}: question_id {question_id} was answered with {key}={record.get(key)!r}, "
                    f"this run uses {wanted[key]!r}; remove the file to start over"
                )


def _validated_questions(questions: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in QUESTION_COLUMNS if c not in questions.columns]
    if missing:
        raise QuestionTableError(f"question table lacks column(s) {missing}")
    duplicated = questions["question_id"][questions["question_id"].duplicated()]
    if len(duplicated):
        raise QuestionTableError(f"question table repeats question_id {int(duplicated.iloc[0])}")
    return questions


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def _ocr_tokens(row, use_ocr: bool) -> list[str] | None:
    """The OCR line's tokens (an image without any gets the line empty, as LLaVA writes it), or None: no line."""
    if not use_ocr:
        return None
    tokens = getattr(row, "ocr_tokens", None)
    return [] if tokens is None else [str(t) for t in tokens]


def question_prompt(row, use_ocr: bool) -> str:
    """The exact prompt one question-table row is asked with (one ``<image>``, expanded to the image's tokens)."""
    return llava15_prompt(asked_question(row.question, getattr(row, "dataset", None)),
                          ocr_tokens=_ocr_tokens(row, use_ocr))


def row_prompt_variant(row, use_ocr: bool) -> str:
    return prompt_variant(use_ocr, getattr(row, "dataset", None))


def table_prompt_variants(questions: pd.DataFrame, use_ocr: bool) -> list[str]:
    """The prompt variants a question table's rows are asked with (one per dataset in it)."""
    datasets = questions["dataset"].unique() if "dataset" in questions else [None]
    return sorted({prompt_variant(use_ocr, None if d is None else str(d)) for d in datasets})


def _load_images(question_ids: Sequence[int], image_paths: Sequence[str]) -> list[Image.Image]:
    images = []
    for question_id, image_path in zip(question_ids, image_paths):
        try:
            with Image.open(image_path) as image:
                images.append(image.convert("RGB"))
        except OSError as error:
            raise QuestionTableError(f"question_id {question_id}: cannot read image {image_path}: {error}") from error
    return images


class _PixelValuesOfBatch:
    """Loader side: a batch's (question ids, image paths) give back its ``pixel_values``, padded to squares and
    processed as LLaVA-1.5 does. Runs in loader workers, so it carries only the processor and the pad colour."""

    def __init__(self, image_processor, pad_colour: tuple[int, int, int]):
        self.image_processor, self.pad_colour = image_processor, pad_colour

    def __call__(self, request: tuple[tuple[int, ...], tuple[str, ...]]) -> torch.Tensor:
        question_ids, image_paths = request
        return preprocess_images(_load_images(question_ids, image_paths), self.image_processor, self.pad_colour)


def _image_request(rows: Sequence) -> tuple[tuple[int, ...], tuple[str, ...]]:
    # plain tuples: the rows' namedtuple class is made on the fly by pandas and does not pickle to a worker
    return tuple(int(row.question_id) for row in rows), tuple(str(row.image_path) for row in rows)


def _generated_lengths(new_tokens: torch.Tensor, eos_id: int) -> list[int]:
    """Tokens generated per row, counting the ``</s>`` that ended it (rows stop at different steps)."""
    lengths = []
    for row in new_tokens.tolist():
        lengths.append(row.index(eos_id) + 1 if eos_id in row else len(row))
    return lengths


def generate_answers(
    llava: LlavaForInference, rows: Sequence, *, use_ocr: bool, max_new_tokens: int,
    pixel_values: torch.Tensor | None = None,
) -> list[tuple[str, int]]:
    """Greedy answers for ``rows`` (question-table rows) as one left-padded batch: (text, tokens generated).
    ``pixel_values``: the rows' images already read and processed (by a loader worker); None = read them here."""
    model, tokenizer = llava.model, llava.tokenizer
    image_tokens = num_image_tokens(model.config.vision_config, model.config.vision_feature_select_strategy)
    prompts = [expand_image_tokens(question_prompt(row, use_ocr), image_tokens) for row in rows]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    parameter = next(model.parameters())
    if pixel_values is None:
        pixel_values = _PixelValuesOfBatch(llava.image_processor, llava.pad_colour)(_image_request(rows))
    with torch.inference_mode():
        output = model.generate(
            input_ids=encoded["input_ids"].to(parameter.device),
            attention_mask=encoded["attention_mask"].to(parameter.device),
            pixel_values=pixel_values.to(device=parameter.device, dtype=parameter.dtype, non_blocking=True),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new_tokens = output[:, encoded["input_ids"].shape[1]:].cpu()
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [(text.strip(), n) for text, n in zip(texts, _generated_lengths(new_tokens, tokenizer.eos_token_id))]


def _prediction_record(row, prediction: str, n_tokens: int, settings: dict[str, Any]) -> dict[str, Any]:
    """One answer with everything needed to audit it: ``prompt`` is the text the model was given (its one
    ``<image>`` stands for the image's patch tokens)."""
    return {
        "question_id": int(row.question_id),
        "dataset": getattr(row, "dataset", None),
        "image_id": None if getattr(row, "image_id", None) is None else str(row.image_id),
        "question": row.question,
        "prompt": question_prompt(row, settings["use_ocr"]),
        "prediction": prediction,
        "generated_tokens": n_tokens,
        "prompt_variant": row_prompt_variant(row, settings["use_ocr"]),
        "use_ocr": settings["use_ocr"],
        "ocr_tokens": _ocr_tokens(row, settings["use_ocr"]) or [],
        "max_new_tokens": settings["max_new_tokens"],
    }


def _row_batches(questions: pd.DataFrame, batch_size: int) -> list[list]:
    rows = list(questions.itertuples(index=False))
    return [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]


def answer_questions(
    model: LlavaForConditionalGeneration,
    tokenizer,
    image_processor,
    questions_df: pd.DataFrame,
    out_jsonl: str | os.PathLike,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    use_ocr: bool = False,
    pad_colour: tuple[int, int, int] | None = None,
    num_workers: int = 0,
) -> Path:
    """Answer every question of ``questions_df`` greedily, appending one JSON line each to ``out_jsonl``.

    Resumable: lines already in ``out_jsonl`` are kept (a partial last line is dropped) and their questions
    skipped; they must have been written with the same prompt variant and ``max_new_tokens`` and belong to
    ``questions_df``. Lines are written in ``questions_df`` order and flushed after each batch.
    ``out_jsonl`` is a working file: ``gather_chunks`` publishes the final one. ``num_workers`` processes read and
    preprocess the next batches' images while the model answers this one (0 = read them here, between batches).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token: batched decoding needs one")
    questions_df = _validated_questions(questions_df)
    out_jsonl = Path(out_jsonl)
    settings = {"use_ocr": use_ocr, "max_new_tokens": max_new_tokens}
    done = read_completed_predictions(out_jsonl)
    expected = {int(row.question_id): {"prompt_variant": row_prompt_variant(row, use_ocr),
                                       "max_new_tokens": max_new_tokens}
                for row in questions_df.itertuples(index=False)}
    _check_resume_settings(out_jsonl, done, expected)
    unknown = set(done) - set(int(q) for q in questions_df["question_id"])
    if unknown:
        raise PredictionFileError(f"{out_jsonl} holds {len(unknown)} question(s) not in this question table, "
                                  f"e.g. {min(unknown)}")
    todo = questions_df[~questions_df["question_id"].astype("int64").isin(done)]
    colour = tuple(pad_colour) if pad_colour is not None else pad_colour_from_mean(image_processor.image_mean)
    llava = LlavaForInference(model.eval(), tokenizer, image_processor, colour)  # type: ignore[arg-type]
    if done:
        logger.info("%s: resuming, %d answered, %d to go", out_jsonl, len(done), len(todo))
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    batches = _row_batches(todo, batch_size)
    pixel_values = read_ahead(_PixelValuesOfBatch(image_processor, colour), [_image_request(b) for b in batches],
                              num_workers=num_workers, pin_memory=next(model.parameters()).is_cuda)
    with open(out_jsonl, "a", encoding="utf-8") as handle, contextlib.closing(pixel_values), \
            tqdm(total=len(todo), desc="vqa", unit="q") as progress:
        for rows, pixels in zip(batches, pixel_values):
            answers = generate_answers(llava, rows, use_ocr=use_ocr, max_new_tokens=max_new_tokens,
                                       pixel_values=pixels)
            handle.write("".join(json.dumps(_prediction_record(row, text, n, settings)) + "\n"
                                 for row, (text, n) in zip(rows, answers)))
            handle.flush()
            os.fsync(handle.fileno())
            progress.update(len(rows))
    return out_jsonl


# ----------------------------------------------------------------------------------------------------------------
# Chunking (parallel jobs) and gathering
# ----------------------------------------------------------------------------------------------------------------


def chunk_questions(df: pd.DataFrame, n_chunks: int, k: int) -> pd.DataFrame:
    """Chunk ``k`` of ``n_chunks``: contiguous blocks of the questions sorted by question_id.

    Deterministic whatever the table's row order; chunk sizes differ by at most ``ceil(n / n_chunks)``
    (LLaVA's ``split_list`` rule), some trailing chunks may be empty.
    """
    if n_chunks < 1 or not 0 <= k < n_chunks:
        raise ValueError(f"need n_chunks >= 1 and 0 <= k < n_chunks, got n_chunks={n_chunks}, k={k}")
    ordered = _validated_questions(df).sort_values("question_id", kind="stable")
    size = math.ceil(len(ordered) / n_chunks) if len(ordered) else 0
    return ordered.iloc[k * size:(k + 1) * size]


PARTIAL_PREDICTIONS = "predictions.partial.jsonl"


def _answer_resumably(
    llava: LlavaForInference, checkpoint_dir: str | os.PathLike, questions_parquet: str | os.PathLike,
    questions: pd.DataFrame, out_path: str | os.PathLike, state_dir: str | os.PathLike, *, settings: dict[str, Any],
    batch_size: int, max_new_tokens: int, use_ocr: bool, dtype: str | torch.dtype,
) -> float:
    """Answer ``questions`` into a working file in ``state_dir``, then publish ``out_path`` and drop the state;
    returns the seconds spent answering.

    The working file is continued only when the same model, question table, settings and code made it
    (``hnclip.resume``): a re-exported model or a new question table starts it over. ``state_dir`` must not be a
    declared workflow output, so a failed or pre-empted job's work survives for the rerun.
    """
    device = next(llava.model.parameters()).device
    fingerprint = job_fingerprint(
        {**settings, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "use_ocr": use_ocr,
         "prompt_variants": table_prompt_variants(questions, use_ocr), "device": device.type,
         "dtype": str(dtype)},
        [checkpoint_dir, questions_parquet],
    )
    claim_state_dir(state_dir, fingerprint)
    work_path = Path(state_dir) / PARTIAL_PREDICTIONS
    started = time.perf_counter()
    answer_questions(llava.model, llava.tokenizer, llava.image_processor, questions, work_path,
                     batch_size=batch_size, max_new_tokens=max_new_tokens, use_ocr=use_ocr, pad_colour=llava.pad_colour,
                     num_workers=default_loader_workers(device))
    seconds = time.perf_counter() - started
    gather_chunks([work_path], out_path, questions["question_id"])
    release_state_dir(state_dir)
    return seconds


def predict_vqa(
    checkpoint_dir: str | os.PathLike,
    questions_parquet: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    state_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    use_ocr: bool = False,
    device: str = "cpu",
    dtype: str | torch.dtype = "auto",
) -> dict[str, Any]:
    """Answer every question of a table into ``out_path`` (resumable from ``state_dir``, default
    ``<out_path>.state``); ``out_path`` appears only complete. Returns run figures."""
    out_path = Path(out_path)
    state_dir = Path(state_dir) if state_dir is not None else out_path.with_name(out_path.name + ".state")
    questions = pd.read_parquet(questions_parquet)
    llava = load_llava_for_inference(checkpoint_dir, device=device, dtype=dtype)
    seconds = _answer_resumably(
        llava, checkpoint_dir, questions_parquet, questions, out_path, state_dir, settings={}, batch_size=batch_size,
        max_new_tokens=max_new_tokens, use_ocr=use_ocr, dtype=dtype,
    )
    return {
        "checkpoint_dir": str(checkpoint_dir),
        "questions": str(questions_parquet),
        "n_questions": len(questions),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "prompt_variants": table_prompt_variants(questions, use_ocr),
        "pad_colour": list(llava.pad_colour),
        "device": device,
        "dtype": str(next(llava.model.parameters()).dtype),
        "seconds_this_run": seconds,
    }


@dataclass(frozen=True)
class DatasetChunk:
    """One dataset's share of a VQA job: its question table, where its chunk's answers go, its resume state."""

    dataset: str
    questions_parquet: str
    out_jsonl: str
    state_dir: str
    use_ocr: bool


def answer_chunk(
    *, checkpoint_dir, datasets: Sequence[DatasetChunk], n_chunks: int, chunk: int, batch_size: int,
    max_new_tokens: int, dtype: str,
) -> None:
    """One VQA job: load the model once, then answer chunk ``chunk`` of ``n_chunks`` of every dataset in turn (each
    resumable from its state dir, each published only when complete). Loading LLaVA-1.5-7B takes minutes; doing it
    once per model instead of once per dataset and chunk is most of what a VQA job costs beyond answering."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llava = load_llava_for_inference(checkpoint_dir, device=device, dtype=dtype)
    for part in datasets:
        questions = chunk_questions(pd.read_parquet(part.questions_parquet), n_chunks, chunk)
        seconds = _answer_resumably(
            llava, checkpoint_dir, part.questions_parquet, questions, part.out_jsonl, part.state_dir,
            settings={"n_chunks": n_chunks, "chunk": chunk}, batch_size=batch_size, max_new_tokens=max_new_tokens,
            use_ocr=part.use_ocr, dtype=dtype,
        )
        logger.info("%s: %d questions in %.1f s (%s, batch %d, %s)", part.dataset, len(questions), seconds, device,
                    batch_size, prompt_variant(part.use_ocr, part.dataset))
