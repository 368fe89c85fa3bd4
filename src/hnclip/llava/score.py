"""Score one model's VQA v2 / TextVQA predictions officially, with CIs and paired comparisons.

Light on purpose (no torch): it gathers the chunk files, checks that every question has exactly one answer,
scores each answer, and writes the results-table rows.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from hnclip.evaluate.stats import align_reference, bootstrap_ci, paired_bootstrap
from hnclip.io import atomic_path, write_json
from hnclip.llava.predictions import gather_chunks
from hnclip.llava.metrics import normalize_textvqa_answer as evalai_answer
from hnclip.llava.metrics import textvqa_accuracy, textvqa_exact_match, vqa_accuracy
from hnclip.provenance import provenance

log = logging.getLogger(__name__)

ITEM_KEY = "question_id"


def score_items(predictions: pd.DataFrame, questions: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Per question: the prediction and its official score(s), with the grouping columns."""
    table = questions.merge(predictions[["question_id", "prediction"]], on="question_id", how="left",
                            validate="one_to_one")
    missing = table["prediction"].isna()
    if missing.any():
        raise ValueError(f"{int(missing.sum())} {dataset} question(s) have no prediction, "
                         f"e.g. question_id {int(table.loc[missing, 'question_id'].iloc[0])}")
    answers = table["answers"].map(list)
    if dataset == "textvqa":
        table["accuracy"] = [textvqa_accuracy(p, a) for p, a in zip(table["prediction"], answers)]
        table["exact_match"] = [textvqa_exact_match(p, a) for p, a in zip(table["prediction"], answers)]
    else:
        # As LLaVA-1.5's reported VQA v2 number: its answers pass the EvalAI processor before upload, and the
        # server's VQA evaluation scores what arrives ("man's hat" arrives as "man 's hat").
        table["accuracy"] = [vqa_accuracy(evalai_answer(p), a) for p, a in zip(table["prediction"], answers)]
    columns = ["question_id", "image_id", "answer_type", "question_type", "prediction", "accuracy"]
    return table[columns + (["exact_match"] if dataset == "textvqa" else [])]


def _subsets(items: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    subsets = [("all", np.ones(len(items), dtype=bool))]
    for column in ["answer_type", "question_type"]:
        for value in sorted(items[column].unique()):
            subsets.append((f"{column}:{value}", (items[column] == value).to_numpy()))
    return subsets


def vqa_report(
    items: pd.DataFrame, *, model: str, benchmark: str, references: Mapping[str, pd.DataFrame],
    n_boot: int, seed: int,
) -> list[dict]:
    """Results-table rows: each metric on all questions, per answer type and per question type.

    CIs resample images (questions about one image are not independent); differences against a reference are
    paired bootstraps on the same questions (soft accuracies: McNemar does not apply).
    """
    metrics = ["accuracy"] + (["exact_match"] if "exact_match" in items else [])
    aligned = {
        (name, metric): align_reference(items, reference, [ITEM_KEY], name, value_column=metric)
        for name, reference in references.items()
        for metric in metrics
    }
    clusters = items["image_id"].astype(str).to_numpy()
    rows = []
    for subset, mask in _subsets(items):
        for metric in metrics:
            values = items[metric].to_numpy(dtype=float)[mask]
            ci = bootstrap_ci(values, clusters[mask], n_boot=n_boot, seed=seed)
            row = dict(model=model, benchmark=benchmark, subset=subset, metric=metric, value=ci.value,
                       ci_low=ci.ci_low, ci_high=ci.ci_high, n=int(mask.sum()))
            for name in references:
                paired = paired_bootstrap(values, aligned[name, metric][mask], clusters[mask],
                                          n_boot=n_boot, seed=seed)
                row[f"delta_vs_{name}"], row[f"p_vs_{name}"] = paired["delta"], paired["p_value"]
                row["test"] = "paired_bootstrap"
            rows.append(row)
    return rows


def score_vqa(
    *, model: str, dataset: str, chunk_paths: Sequence, questions_parquet, references: Mapping[str, str | os.PathLike],
    out_predictions, out_scores, out_items, n_boot: int, seed: int, config: dict | None = None,
) -> None:
    """Gather the chunks into one predictions file, score it, and write scores.json + per-question Parquet."""
    questions = pd.read_parquet(questions_parquet)
    gather_chunks(chunk_paths, out_predictions, questions["question_id"])
    with open(out_predictions, encoding="utf-8") as handle:
        predictions = pd.DataFrame([json.loads(line) for line in handle])
    items = score_items(predictions, questions, dataset)
    rows = vqa_report(items, model=model, benchmark=dataset,
                      references={name: pd.read_parquet(path) for name, path in references.items()},
                      n_boot=n_boot, seed=seed)
    with atomic_path(out_items) as tmp:
        items.to_parquet(tmp, index=False)
    settings = {k: str(predictions[k].iloc[0]) for k in ("prompt_variant", "max_new_tokens") if k in predictions}
    write_json(out_scores, {
        "model": model, "benchmark": dataset, "rows": rows,
        "provenance": provenance(config, seed=seed, inputs=[questions_parquet, *chunk_paths, *references.values()],
                                 checksum_inputs=True, inference=settings),
    })
    log.info("%s %s: accuracy %.4f on %d questions", model, dataset, rows[0]["value"], len(items))

