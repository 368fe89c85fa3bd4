"""VQA v2 (val, and test-dev) and TextVQA (val) → one typed question table each, one row per question.

Columns (``QUESTION_SCHEMA``): ``dataset`` ("vqav2" / "vqav2_testdev" / "textvqa"), ``question_id`` (int64),
``image_id`` (str), ``image_path`` (str), ``question`` (str), ``answers`` (list<str>, exactly 10, raw as
annotated: normalisation belongs to the scorer; none for test-dev, whose answers are not public), ``answer_type`` (str), ``question_type`` (str),
``majority_answer`` (str), ``ocr_tokens`` (list<str>), ``ocr_source`` (str).

Choices for TextVQA, which has neither answer types nor question types nor a majority answer:

* ``answer_type`` is ``"other"`` for every question: TextVQA answers are open-ended strings read off the
  image, which is what VQA v2 calls "other"; inventing yes/no or number types from the answers would
  make a reporting subset depend on the labels being scored.
* ``question_type`` is the question's first two words, lower-cased, punctuation dropped ("what is",
  "what brand", "who is"; see :func:`leading_words_question_type`), the coarse analogue of VQA v2's
  prefix-based question types, used for stratified subsampling and per-type reporting.
* ``majority_answer`` is the most frequent of the 10 answers after strip + lower-case, ties going to
  the answer given first; it is returned as first written (stripped). VQA v2's is its
  ``multiple_choice_answer``.
* ``ocr_tokens`` come from ``ocr_json`` when given (TextVQA's Rosetta OCR file ``{"data": [{"image_id",
  "ocr_tokens"}]}``, or LLaVA's question file ``llava_textvqa_val_v051_ocr.jsonl`` whose prompt carries a
  ``Reference OCR token: a, b, c`` line), else from an ``ocr_tokens`` field of the question records
  themselves, else empty. ``ocr_source`` records which ("rosetta:<file>", "llava:<file>", "inline",
  "none"); VQA v2 rows have ``ocr_tokens`` empty and ``ocr_source`` "none".
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hnclip.data import (
    DataFormatError,
    OnMissingImage,
    check_images_dir,
    record_field,
    rows_with_images,
    string_field,
)
from hnclip.data import load_json as load_data_json
from hnclip.io import atomic_path
from hnclip.provenance import provenance

log = logging.getLogger(__name__)

N_ANSWERS = 10
TEXTVQA_ANSWER_TYPE = "other"
NO_OCR = "none"

QUESTION_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("question_id", pa.int64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answers", pa.list_(pa.string()), nullable=False),
        pa.field("answer_type", pa.string(), nullable=False),
        pa.field("question_type", pa.string(), nullable=False),
        pa.field("majority_answer", pa.string(), nullable=False),
        pa.field("ocr_tokens", pa.list_(pa.string()), nullable=False),
        pa.field("ocr_source", pa.string(), nullable=False),
    ]
)
QUESTION_COLUMNS = tuple(QUESTION_SCHEMA.names)

_OCR_LINE = re.compile(r"^Reference OCR token:[ \t]?(.*)$", re.MULTILINE)


class VQAFormatError(DataFormatError):
    """A VQA v2 / TextVQA / OCR file breaks the documented format; the message names file and question."""


def load_json(path: str | os.PathLike) -> Any:
    return load_data_json(path, VQAFormatError)


def _field(path: Path, container: Any, key: str, what: str) -> Any:
    return record_field(path, container, key, what, VQAFormatError)


def _string_field(path: Path, container: Any, key: str, what: str) -> str:
    return string_field(path, container, key, what, VQAFormatError)


def _question_id(path: Path, record: Any, what: str) -> int:
    question_id = _field(path, record, "question_id", what)
    if type(question_id) is not int:
        raise VQAFormatError(f"{path}: {what}: question_id must be an integer, got {question_id!r}")
    return question_id


def _checked_answers(path: Path, question_id: int, answers: Any) -> list[str]:
    if not isinstance(answers, list) or len(answers) != N_ANSWERS:
        count = len(answers) if isinstance(answers, list) else type(answers).__name__
        raise VQAFormatError(f"{path}: question {question_id}: expected {N_ANSWERS} answers, got {count}")
    if not all(isinstance(answer, str) for answer in answers):
        raise VQAFormatError(f"{path}: question {question_id}: every answer must be a string, got {answers!r}")
    return answers


# --------------------------------------------------------------------------------------------------------
# VQA v2


def vqav2_image_path(images_dir: str | os.PathLike, data_subtype: str, image_id: int) -> str:
    """COCO's file name convention, e.g. ``val2014/COCO_val2014_000000123456.jpg``."""
    return str(Path(images_dir) / f"COCO_{data_subtype}_{image_id:012d}.jpg")


def _vqav2_annotations_by_question(path: Path) -> dict[int, dict]:
    annotations = _field(path, load_json(path), "annotations", "the annotations file")
    by_question: dict[int, dict] = {}
    for index, annotation in enumerate(annotations):
        question_id = _question_id(path, annotation, f"annotation #{index}")
        what = f"annotation of question {question_id}"
        if question_id in by_question:
            raise VQAFormatError(f"{path}: question {question_id} has more than one annotation")
        raw_answers = _field(path, annotation, "answers", what)
        if not isinstance(raw_answers, list) or len(raw_answers) != N_ANSWERS:
            _checked_answers(path, question_id, raw_answers)  # raises, naming the count
        answers = _checked_answers(
            path, question_id, [_field(path, answer, "answer", f"{what}: an answer") for answer in raw_answers]
        )
        by_question[question_id] = {
            "answers": answers,
            "answer_type": _string_field(path, annotation, "answer_type", what),
            "question_type": _string_field(path, annotation, "question_type", what),
            "majority_answer": _string_field(path, annotation, "multiple_choice_answer", what),
            "image_id": _field(path, annotation, "image_id", what),
        }
    return by_question


def _vqav2_row(
    questions_path: Path,
    annotations_path: Path,
    index: int,
    record: Any,
    annotations: dict[int, dict],
    images_dir: Path,
    data_subtype: str,
) -> dict:
    """One question joined with its annotation (popped from ``annotations``, so leftovers can be reported)."""
    question_id = _question_id(questions_path, record, f"question #{index}")
    what = f"question {question_id}"
    image_id = _field(questions_path, record, "image_id", what)
    if type(image_id) is not int:  # COCO ids are ints; the file name pads them to 12 digits
        raise VQAFormatError(f"{questions_path}: {what}: image_id must be an integer, got {image_id!r}")
    annotation = annotations.pop(question_id, None)
    if annotation is None:
        raise VQAFormatError(
            f"{annotations_path}: no annotation for question {question_id} of {questions_path} "
            "(or that question id appears twice)"
        )
    if annotation["image_id"] != image_id:
        raise VQAFormatError(
            f"{annotations_path}: question {question_id}: annotation image {annotation['image_id']} "
            f"!= question image {image_id}"
        )
    return {
        "dataset": "vqav2",
        "question_id": question_id,
        "image_id": str(image_id),
        "image_path": vqav2_image_path(images_dir, data_subtype, image_id),
        "question": _string_field(questions_path, record, "question", what),
        "answers": annotation["answers"],
        "answer_type": annotation["answer_type"],
        "question_type": annotation["question_type"],
        "majority_answer": annotation["majority_answer"],
        "ocr_tokens": [],
        "ocr_source": NO_OCR,
    }


def read_vqav2(
    questions_json: str | os.PathLike,
    annotations_json: str | os.PathLike,
    images_dir: str | os.PathLike,
    *,
    on_missing_image: OnMissingImage = "error",
) -> pd.DataFrame:
    """VQA v2 questions joined with their annotations, one row per question (module docstring: columns).

    Every question needs exactly one annotation with 10 answers and the same image id; the image file
    ``images_dir/COCO_{data_subtype}_{image_id:012d}.jpg`` must exist (``data_subtype`` from the questions
    file, e.g. ``val2014``), else :class:`~hnclip.data.MissingImageError` (or, with
    ``on_missing_image="skip"``, the question is dropped and logged).
    """
    questions_path, annotations_path = Path(questions_json), Path(annotations_json)
    questions_file = load_json(questions_path)
    data_subtype = _string_field(questions_path, questions_file, "data_subtype", "the questions file")
    questions = _field(questions_path, questions_file, "questions", "the questions file")
    annotations = _vqav2_annotations_by_question(annotations_path)
    images_dir = check_images_dir(images_dir)

    rows = [
        _vqav2_row(questions_path, annotations_path, index, record, annotations, images_dir, data_subtype)
        for index, record in enumerate(questions)
    ]
    if annotations:
        raise VQAFormatError(
            f"{annotations_path}: {len(annotations)} annotations have no question in {questions_path} "
            f"(e.g. question {next(iter(annotations))})"
        )
    return _question_frame(rows, referenced_by=questions_path, on_missing_image=on_missing_image)


VQAV2_TESTDEV = "vqav2_testdev"
# test-dev is a subset of test2015: its questions file says "test-dev2015", its images are test2015's.
TEST_IMAGES_SUBTYPE = "test2015"
UNKNOWN = "unknown"


def read_vqav2_testdev(
    questions_json: str | os.PathLike, images_dir: str | os.PathLike, *, on_missing_image: OnMissingImage = "error"
) -> pd.DataFrame:
    """VQA v2 test-dev questions (``v2_OpenEnded_mscoco_test-dev2015_questions.json``), one row per question.

    No answers are public: ``answers`` is empty and the answer type, question type and majority answer are
    ``"unknown"``/empty; the predictions are scored by the EvalAI server (:mod:`hnclip.llava.submission`).
    Images are ``images_dir/COCO_test2015_{image_id:012d}.jpg``.
    """
    path = Path(questions_json)
    records = _field(path, load_json(path), "questions", "the questions file")
    images_dir = check_images_dir(images_dir)
    rows = []
    for index, record in enumerate(records):
        question_id = _question_id(path, record, f"question #{index}")
        image_id = _field(path, record, "image_id", f"question {question_id}")
        if type(image_id) is not int:
            raise VQAFormatError(f"{path}: question {question_id}: image_id must be an integer, got {image_id!r}")
        rows.append({
            "dataset": VQAV2_TESTDEV,
            "question_id": question_id,
            "image_id": str(image_id),
            "image_path": vqav2_image_path(images_dir, TEST_IMAGES_SUBTYPE, image_id),
            "question": _string_field(path, record, "question", f"question {question_id}"),
            "answers": [],
            "answer_type": UNKNOWN,
            "question_type": UNKNOWN,
            "majority_answer": "",
            "ocr_tokens": [],
            "ocr_source": NO_OCR,
        })
    return _question_frame(rows, referenced_by=path, on_missing_image=on_missing_image)


def read_question_ids(questions_json: str | os.PathLike) -> list[int]:
    """Every question id of a VQA v2 questions file, in its order (a submission lists all of test2015's)."""
    path = Path(questions_json)
    records = _field(path, load_json(path), "questions", "the questions file")
    return [_question_id(path, record, f"question #{index}") for index, record in enumerate(records)]


# --------------------------------------------------------------------------------------------------------
# TextVQA


def leading_words_question_type(question: str, n_words: int = 2) -> str:
    """TextVQA's stand-in for a question type: the first ``n_words`` words, lower-cased, no punctuation."""
    words = re.findall(r"[a-z0-9']+", question.lower())
    return " ".join(words[:n_words]) or "none"


def majority_answer(answers: Iterable[str]) -> str:
    """The most frequent answer after strip + lower-case; ties go to the one given first.

    Returned as first written (stripped), so a scorer's own normalisation still applies to it.
    """
    answers = [answer.strip() for answer in answers]
    counts = Counter(answer.lower() for answer in answers)
    best = max(counts.values())
    return next(answer for answer in answers if counts[answer.lower()] == best)


def _rosetta_tokens(path: Path, document: Any) -> dict[str, list[str]]:
    """TextVQA's OCR file: ``{"data": [{"image_id", "ocr_tokens": [...]}, ...]}`` → image id → tokens."""
    tokens: dict[str, list[str]] = {}
    for index, entry in enumerate(_field(path, document, "data", "the OCR file")):
        image_id = str(_field(path, entry, "image_id", f"OCR entry #{index}"))
        entry_tokens = _field(path, entry, "ocr_tokens", f"OCR entry of image {image_id}")
        if not isinstance(entry_tokens, list) or not all(isinstance(t, str) for t in entry_tokens):
            raise VQAFormatError(f"{path}: OCR entry of image {image_id}: ocr_tokens must be a list of strings")
        tokens[image_id] = entry_tokens
    return tokens


def _llava_tokens(path: Path) -> dict[tuple[str, str], list[str]]:
    """LLaVA's question file → (image id, lower-cased question) → OCR tokens.

    Each line is ``{"question_id": <TextVQA image id>, "image", "text", "category"}`` and ``text`` holds three
    lines: the question, ``Reference OCR token: a, b, c`` (empty after the colon and space when the image has no
    tokens) and the short-answer instruction. Its ``question_id`` is the image id, shared by every question of
    an image, so LLaVA's own evaluator joins on (image id, lower-cased question), and so does this.
    """
    tokens: dict[tuple[str, str], list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise VQAFormatError(f"{path}: not valid UTF-8 (byte {error.start}: {error.reason})") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise VQAFormatError(f"{path}: line {number}: malformed JSON: {error.msg}") from error
        image_id = str(_field(path, entry, "question_id", f"line {number}"))
        text = _string_field(path, entry, "text", f"line {number}")
        match = _OCR_LINE.search(text)
        tokens[(image_id, text.split("\n", 1)[0].lower())] = (
            match.group(1).split(", ") if match and match.group(1) else []
        )
    return tokens


class OcrLookup:
    """Where a TextVQA question's OCR tokens come from (see the module docstring)."""

    def __init__(self, ocr_json: str | os.PathLike | None) -> None:
        self.path = None if ocr_json is None else Path(ocr_json)
        self.by_image: dict[str, list[str]] | None = None
        self.by_question: dict[tuple[str, str], list[str]] | None = None
        if self.path is None:
            return
        if self.path.suffix == ".jsonl":
            self.by_question = _llava_tokens(self.path)
            self.source = f"llava:{self.path.name}"
        else:
            self.by_image = _rosetta_tokens(self.path, load_json(self.path))
            self.source = f"rosetta:{self.path.name}"

    def tokens(self, questions_path: Path, record: dict, question_id: int, image_id: str) -> tuple[list[str], str]:
        """(tokens, ocr_source) of one question; a question the OCR file does not cover is an error."""
        if self.by_question is not None:
            key = (image_id, str(record.get("question", "")).lower())
            if key not in self.by_question:
                raise VQAFormatError(f"{self.path}: no OCR entry for question {question_id} (image {image_id!r}, "
                                     f"question {key[1]!r})")
            return self.by_question[key], self.source
        if self.by_image is not None:
            if image_id not in self.by_image:
                raise VQAFormatError(f"{self.path}: no OCR entry for image {image_id!r} (question {question_id})")
            return self.by_image[image_id], self.source
        if "ocr_tokens" in record:
            inline = record["ocr_tokens"]
            if not isinstance(inline, list) or not all(isinstance(token, str) for token in inline):
                raise VQAFormatError(
                    f"{questions_path}: question {question_id}: ocr_tokens must be a list of strings, got {inline!r}"
                )
            return inline, "inline"
        return [], NO_OCR


def read_textvqa(
    json_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    ocr_json: str | os.PathLike | None = None,
    *,
    on_missing_image: OnMissingImage = "error",
) -> pd.DataFrame:
    """TextVQA questions (``{"data": [...]}``), one row per question; images at ``images_dir/{image_id}.jpg``.

    Answer type, question type, majority answer and OCR tokens are derived as the module docstring says.
    """
    path = Path(json_path)
    records = _field(path, load_json(path), "data", "the TextVQA file")
    ocr = OcrLookup(ocr_json)
    images_dir = check_images_dir(images_dir)
    rows = []
    for index, record in enumerate(records):
        question_id = _question_id(path, record, f"question #{index}")
        what = f"question {question_id}"
        image_id = str(_field(path, record, "image_id", what))
        question = _string_field(path, record, "question", what)
        answers = _checked_answers(path, question_id, _field(path, record, "answers", what))
        tokens, source = ocr.tokens(path, record, question_id, image_id)
        rows.append({
            "dataset": "textvqa",
            "question_id": question_id,
            "image_id": image_id,
            "image_path": str(images_dir / f"{image_id}.jpg"),
            "question": question,
            "answers": answers,
            "answer_type": TEXTVQA_ANSWER_TYPE,
            "question_type": leading_words_question_type(question),
            "majority_answer": majority_answer(answers),
            "ocr_tokens": tokens,
            "ocr_source": source,
        })
    return _question_frame(rows, referenced_by=path, on_missing_image=on_missing_image)


# --------------------------------------------------------------------------------------------------------
# Shared: table building, subsampling, writing


def _question_frame(rows: list[dict], *, referenced_by: Path, on_missing_image: OnMissingImage) -> pd.DataFrame:
    """Rows → a typed frame (through the Arrow schema, so types are checked), minus missing-image rows."""
    n_read = len(rows)
    rows, missing = rows_with_images(rows, id_key="question_id", what="question", referenced_by=referenced_by,
                                     on_missing_image=on_missing_image, error=VQAFormatError)
    try:
        table = pa.Table.from_pylist(rows, schema=QUESTION_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise VQAFormatError(f"{referenced_by}: a field has the wrong type: {error}") from error
    frame = table.to_pandas()
    frame.attrs["dropped"] = {"missing_image": n_read - len(rows)}
    frame.attrs["missing_images"] = sorted(Path(p).name for p in missing)
    return frame


def stratified_subsample(df: pd.DataFrame, n: int, seed: int, by: str = "question_type") -> pd.DataFrame:
    """``n`` rows drawn without replacement, each stratum of ``by`` represented in proportion to its size.

    Stratum quotas are n·size/N rounded down, the remaining rows going to the largest fractional parts
    (ties: larger stratum, then stratum name). The draw depends only on (the rows' question ids, n, seed),
    not on the frame's row order; the result is sorted by question_id. ``n >= len(df)`` returns every row.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    ordered = df.sort_values("question_id", kind="stable").reset_index(drop=True)
    if n >= len(ordered):
        return ordered
    sizes = ordered.groupby(by, sort=True).size()
    quotas = _largest_remainder_quotas(sizes, n)
    rng = np.random.default_rng(seed)
    chosen = []
    for stratum, quota in quotas.items():  # strata in sorted order: the draw sequence is fixed
        positions = np.flatnonzero((ordered[by] == stratum).to_numpy())
        chosen.append(rng.choice(positions, size=quota, replace=False))
    picked = np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=int)
    return ordered.iloc[picked].reset_index(drop=True)


def _largest_remainder_quotas(sizes: pd.Series, n: int) -> dict[Any, int]:
    total = int(sizes.sum())
    exact = {stratum: n * int(size) / total for stratum, size in sizes.items()}
    quotas = {stratum: int(value) for stratum, value in exact.items()}
    leftover = n - sum(quotas.values())
    by_remainder = sorted(exact, key=lambda s: (-(exact[s] - quotas[s]), -int(sizes[s]), str(s)))
    for stratum in by_remainder[:leftover]:
        quotas[stratum] += 1
    return quotas


def write_questions(df: pd.DataFrame, out_path: str | os.PathLike, *, metadata: dict | None = None) -> None:
    """Write a question table as zstd Parquet with :data:`QUESTION_SCHEMA`, atomically.

    ``{"provenance": provenance(), **metadata}`` (metadata: e.g. the inputs, the subsampling seed) is stored
    as JSON under the schema metadata key ``hnclip``. Columns beyond the schema are refused, as are missing
    ones.
    """
    columns = list(df.columns)
    if sorted(columns) != sorted(QUESTION_COLUMNS):
        raise ValueError(f"question table columns {columns} differ from {list(QUESTION_COLUMNS)}")
    record = {"provenance": provenance(), **(metadata or {})}
    schema = QUESTION_SCHEMA.with_metadata({"hnclip": json.dumps(record, default=str)})
    table = pa.Table.from_pandas(df[list(QUESTION_COLUMNS)], schema=schema, preserve_index=False)
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_questions(path: str | os.PathLike) -> pd.DataFrame:
    """A question table written by :func:`write_questions`; its metadata dict in ``df.attrs["hnclip"]``."""
    table = pq.read_table(path)
    frame = table.to_pandas()
    raw = (table.schema.metadata or {}).get(b"hnclip")
    frame.attrs["hnclip"] = json.loads(raw) if raw else {}
    return frame
