"""Prediction files of the VQA stage (one JSON line per question), readable without torch: the scoring job
gathers and checks them cheaply."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

from hnclip.io import atomic_path

logger = logging.getLogger(__name__)


class PredictionFileError(ValueError):
    """A predictions file cannot be resumed or gathered: malformed lines, duplicates, gaps or mixed settings."""


def _parse_lines(path: Path, text: str) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PredictionFileError(f"{path}:{number}: not a JSON line ({error.msg})") from error
        if not isinstance(record, dict) or "question_id" not in record or "prediction" not in record:
            raise PredictionFileError(f"{path}:{number}: a prediction line needs question_id and prediction")
        records.append(record)
    return records


def _index_by_question(path: Path, records: Iterable[dict]) -> dict[int, dict]:
    indexed: dict[int, dict] = {}
    for record in records:
        question_id = int(record["question_id"])
        if question_id in indexed:
            raise PredictionFileError(f"{path}: question_id {question_id} appears more than once")
        indexed[question_id] = record
    return indexed


def read_completed_predictions(path: str | os.PathLike, *, repair: bool = True) -> dict[int, dict]:
    """The complete prediction lines of ``path`` by question id ({} if the file does not exist).

    A trailing line without its newline is what a killed writer leaves: with ``repair`` the file is
    truncated to its last complete line, otherwise it is an error. Any other malformed line is an error.
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1
    if complete_end < len(data):
        if not repair:
            raise PredictionFileError(f"{path} ends with an incomplete line: the job that wrote it did not finish")
        logger.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run",
                       path, len(data) - complete_end)
        with open(path, "r+b") as handle:
            handle.truncate(complete_end)
    return _index_by_question(path, _parse_lines(path, data[:complete_end].decode("utf-8")))


def gather_chunks(
    chunk_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike, expected_ids: Iterable[int]
) -> Path:
    """Concatenate chunk prediction files into ``out_path`` (in ``expected_ids`` order), atomically.

    Fails, writing nothing, when a chunk is missing or ends mid-line, a question appears twice (within or
    across chunks), an expected question is absent, or a chunk holds a question that was not expected.
    """
    expected = [int(q) for q in expected_ids]
    if len(set(expected)) != len(expected):
        raise PredictionFileError(f"expected_ids for {out_path} contain duplicates")
    found: dict[int, dict] = {}
    source: dict[int, Path] = {}
    for chunk in map(Path, chunk_paths):
        if not chunk.is_file():
            raise PredictionFileError(f"chunk {chunk} does not exist")
        for question_id, record in read_completed_predictions(chunk, repair=False).items():
            if question_id in found:
                raise PredictionFileError(f"question_id {question_id} is in both {source[question_id]} and {chunk}")
            found[question_id], source[question_id] = record, chunk
    missing = [q for q in expected if q not in found]
    if missing:
        raise PredictionFileError(f"{len(missing)} question(s) have no prediction for {out_path}, e.g. {missing[:5]}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise PredictionFileError(f"{len(unexpected)} unexpected question(s) in chunks for {out_path}, "
                                  f"e.g. {unexpected[:5]} from {source[unexpected[0]]}")
    with atomic_path(out_path) as tmp:
        tmp.write_text("".join(json.dumps(found[q]) + "\n" for q in expected), encoding="utf-8")
    return Path(out_path)
