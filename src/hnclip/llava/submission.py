"""VQA v2 test-dev as LLaVA-1.5 reports it: a submission file for the EvalAI server, and the returned score
brought back into the results table.

LLaVA-1.5 answers the test-dev questions only, then writes one record per *test2015* question (test-dev is a
subset), in the test2015 file's order: ``{"question_id": int, "answer": str}``, the answer passed through the EvalAI
answer processor, and ``""`` for every question it did not answer (``scripts/convert_vqav2_for_submission.py``).
The server wants one JSON array. No answers are public, so no score exists locally: upload the file to the VQA
challenge (:data:`EVALAI_CHALLENGE_URL`, phase test-dev), then import the result it shows with::

    python -m hnclip.llava.submission import-score results/<run>/vqa/<model>/vqav2_testdev/submission.json \
        evalai_result.json

which writes ``evalai_scores.json`` beside the submission, a result file in the results table's format that the
summary reads when it exists.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from hnclip.data.vqa import VQAV2_TESTDEV, read_question_ids
from hnclip.io import atomic_path, write_json
from hnclip.llava.metrics import normalize_textvqa_answer as evalai_answer
from hnclip.llava.predictions import gather_chunks
from hnclip.provenance import provenance, sha256_file

log = logging.getLogger(__name__)

EVALAI_CHALLENGE_URL = "https://eval.ai/web/challenges/challenge-page/830/overview"
EVALAI_PHASE = "test-dev"
INFO_FILE = "submission_info.json"  # beside the submission: counts, its sha256, provenance
IMPORTED_SCORES_FILE = "evalai_scores.json"
# EvalAI's answer types, as its result shows them → the results table's VQA subsets.
EVALAI_SUBSETS = {"overall": "all", "yes/no": "yes/no", "number": "number", "other": "other"}


class SubmissionError(ValueError):
    """Predictions and questions do not fit together, or an EvalAI result is unreadable; names the file."""


def submission_records(predictions: Mapping[int, str], all_question_ids: Sequence[int]) -> tuple[list[dict], int]:
    """One record per test2015 question id, in order: the processed answer, or ``""`` where none was predicted.

    Returns the records and how many are empty. A prediction for a question outside test2015 is an error:
    it would be dropped silently otherwise.
    """
    known = set(all_question_ids)
    strangers = sorted(set(predictions) - known)
    if strangers:
        raise SubmissionError(f"{len(strangers)} predicted question ids are not test2015 questions "
                              f"(e.g. {strangers[:3]})")
    records = [{"question_id": qid, "answer": evalai_answer(predictions[qid]) if qid in predictions else ""}
               for qid in all_question_ids]
    return records, len(all_question_ids) - len(predictions)


def _read_predictions(path: str | os.PathLike) -> dict[int, str]:
    with open(path, encoding="utf-8") as handle:
        return {int(record["question_id"]): str(record["prediction"]) for record in map(json.loads, handle)}


def write_submission(
    *, model: str, chunk_paths: Sequence, questions_parquet, test_questions_json, out_predictions, out_submission,
    out_info, config: dict | None = None,
) -> dict:
    """Gather the test-dev chunks into one predictions file and write the EvalAI submission plus its info file
    (counts, where to upload, provenance). Returns the info."""
    import pandas as pd

    questions = pd.read_parquet(questions_parquet)
    gather_chunks(chunk_paths, out_predictions, questions["question_id"])
    predictions = _read_predictions(out_predictions)
    all_ids = read_question_ids(test_questions_json)
    records, n_empty = submission_records(predictions, all_ids)
    with atomic_path(out_submission) as tmp:  # one JSON array: what the server accepts
        tmp.write_text(json.dumps(records), encoding="utf-8")
    info = {
        "model": model, "benchmark": VQAV2_TESTDEV, "answered": len(predictions), "test2015_questions": len(all_ids),
        "empty_answers": n_empty, "upload_to": EVALAI_CHALLENGE_URL, "phase": EVALAI_PHASE,
        "submission_sha256": sha256_file(out_submission),
        "import_with": f"python -m hnclip.llava.submission import-score {out_submission} <evalai_result.json>",
        "provenance": provenance(config, inputs=[questions_parquet, test_questions_json, *chunk_paths],
                                 checksum_inputs=True),
    }
    write_json(out_info, info)
    log.info("%s: %d answers for %d test2015 questions (%d empty); upload %s to %s, phase %s", model,
             len(predictions), len(all_ids), n_empty, out_submission, EVALAI_CHALLENGE_URL, EVALAI_PHASE)
    return info


def _phase_scores(result: Any, phase: str, path: Path) -> dict[str, float]:
    """The phase's scores from EvalAI's result: ``{"test-dev": {...}}`` or a list of such objects."""
    entries = result if isinstance(result, list) else [result]
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get(phase), dict):
            scores = entry[phase]
            missing = [key for key in EVALAI_SUBSETS if not isinstance(scores.get(key), (int, float))]
            if missing:
                raise SubmissionError(f"{path}: the {phase!r} result lacks {', '.join(missing)} (got {scores!r})")
            return {key: float(scores[key]) for key in EVALAI_SUBSETS}
    raise SubmissionError(f"{path}: no {phase!r} scores in it; expected {{\"{phase}\": {{\"overall\": …, "
                          "\"yes/no\": …, \"number\": …, \"other\": …}}} as EvalAI shows them")


def evalai_score_rows(scores: Mapping[str, float], *, model: str, n: int) -> list[dict]:
    """Results-table rows of EvalAI's percentages (accuracy in [0, 1], as every VQA row); no interval: the
    server gives none."""
    return [dict(model=model, benchmark=VQAV2_TESTDEV, subset=subset, metric="accuracy",
                 value=scores[key] / 100, ci_low=None, ci_high=None, n=n)
            for key, subset in EVALAI_SUBSETS.items()]


def import_evalai_result(submission: str | os.PathLike, result_json: str | os.PathLike,
                         phase: str = EVALAI_PHASE) -> Path:
    """Write ``evalai_scores.json`` beside ``submission`` from the result EvalAI returned for it."""
    submission, result_path = Path(submission), Path(result_json)
    info_path = submission.with_name(INFO_FILE)
    if not info_path.exists():
        raise SubmissionError(f"{info_path} is missing: import a score beside the submission the workflow wrote")
    info = json.loads(info_path.read_text())
    if sha256_file(submission) != info["submission_sha256"]:
        raise SubmissionError(f"{submission} changed since the workflow wrote it (sha256 differs from "
                              f"{info_path}); the score would not belong to these predictions")
    try:
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SubmissionError(f"{result_path}: unreadable EvalAI result ({error})") from None
    scores = _phase_scores(result, phase, result_path)
    out = submission.with_name(IMPORTED_SCORES_FILE)
    write_json(out, {
        "model": info["model"], "benchmark": VQAV2_TESTDEV,
        "rows": evalai_score_rows(scores, model=info["model"], n=info["answered"]),
        "provenance": {"scored_by": EVALAI_CHALLENGE_URL, "phase": phase, "submission": str(submission),
                       "submission_sha256": info["submission_sha256"], "evalai_result_sha256": sha256_file(result_path),
                       "submission_provenance": info["provenance"]},
    })
    return out


def imported_score_files(submissions: Iterable[str | os.PathLike]) -> list[str]:
    """The imported EvalAI scores that exist beside these submission files."""
    return [str(Path(s).with_name(IMPORTED_SCORES_FILE)) for s in submissions
            if Path(s).with_name(IMPORTED_SCORES_FILE).exists()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hnclip.llava.submission", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imported = commands.add_parser("import-score", help="bring the score EvalAI returned into the results table")
    imported.add_argument("submission", help="results/<run>/vqa/<model>/vqav2_testdev/submission.json")
    imported.add_argument("result", help="EvalAI's result, e.g. {\"test-dev\": {\"overall\": 78.5, ...}}")
    imported.add_argument("--phase", default=EVALAI_PHASE)
    args = parser.parse_args(argv)
    out = import_evalai_result(args.submission, args.result, args.phase)
    print(f"wrote {out}; rerun snakemake to rebuild the summary with it")


if __name__ == "__main__":
    main()
