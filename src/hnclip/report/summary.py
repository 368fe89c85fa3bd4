"""The results table (docs/design.md, "The results table"): one row per measured number, built only from the
per-cell result files, plus the completeness check and the over-seeds aggregation the views share.
"""

from __future__ import annotations

import json
import logging
import math
import os
from numbers import Real
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from hnclip.pipeline.grid import BASELINE, OBJECTIVE_AXES, cell_in_path, parse_cell
from hnclip.io import atomic_path, write_json
from hnclip.provenance import provenance

log = logging.getLogger(__name__)

# the objective axes: a cell's weight of each objective beside the seed's loss (0: off; empty for the baseline)
SUMMARY_COLUMNS = (
    "model", "alpha", "tau", "seed", *OBJECTIVE_AXES, "benchmark", "subset", "metric", "value", "ci_low", "ci_high",
    "n", "delta_vs_baseline", "p_vs_baseline", "delta_vs_control", "p_vs_control",
)
ROW_KEY = ("model", "benchmark", "subset", "metric")
TEXT_COLUMNS = ("model", "benchmark", "subset", "metric")
FLOAT_COLUMNS = (
    "alpha", "tau", *OBJECTIVE_AXES, "value", "ci_low", "ci_high",
    "delta_vs_baseline", "p_vs_baseline", "delta_vs_control", "p_vs_control",
)
INT_COLUMNS = ("seed", "n")
REQUIRED_ROW_FIELDS = ("model", "benchmark", "subset", "metric", "value", "n")
OPTIONAL_NUMBER_FIELDS = ("ci_low", "ci_high", "delta_vs_baseline", "p_vs_baseline", "delta_vs_control", "p_vs_control")

# Reading order of the thesis; benchmarks not listed sort after these, alphabetically.
BENCHMARK_ORDER = ("hnc_test", "zeroshot", "drift", "sugarcrepe", "aro", "winoground", "vqav2", "vqav2_testdev", "textvqa")
# 'all' first, then HNC's type groups and VQA's answer types in their usual order.
SUBSET_ORDER = ("all", "attribute", "relation", "counting", "logic", "yes/no", "number", "other",
                "replace", "swap", "add", "vg_relation", "vg_attribution", "coco_order", "flickr30k_order")


class ResultFileError(ValueError):
    """A per-cell result file is unreadable or malformed; the message names the file."""


class DuplicateResultError(ResultFileError):
    """Two rows measure the same (model, benchmark, subset, metric)."""


class MisattributedResultError(ResultFileError):
    """A file's rows name another model than the cell its path belongs to."""


class MissingResultError(LookupError):
    """An expected model × benchmark has no rows in the summary."""


# --- reading one result file ---------------------------------------------------------------------

def model_from_result_path(path: str | os.PathLike) -> str:
    """The model a result file belongs to, from its path: the ``alpha~/tau~/seed~`` directories or
    a ``baseline`` directory (``results/eval/{model}/hnc_test.json``, ``results/vqa/{model}/vqav2/scores.json``)."""
    try:
        cell = cell_in_path(str(path))
    except ValueError as error:
        raise ResultFileError(f"{path}: {error}") from None
    if cell is not None:
        return cell
    directories = Path(path).parts[:-1]
    if BASELINE in directories:
        return BASELINE
    raise ResultFileError(
        f"{path}: cannot tell the model from the path (expected a '{BASELINE}' or alpha~A/tau~T/seed~S directory)"
    )


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_row(row: object, index: int, path: Path) -> None:
    """Every row has the results table's fields with the right kinds; errors name the file and row."""
    if not isinstance(row, dict):
        raise ResultFileError(f"{path}: rows[{index}] is a {type(row).__name__}, not an object")
    missing = [field for field in REQUIRED_ROW_FIELDS if row.get(field) is None]
    if missing:
        raise ResultFileError(f"{path}: rows[{index}] lacks {', '.join(missing)}")
    for field in TEXT_COLUMNS:
        if not isinstance(row[field], str) or not row[field]:
            raise ResultFileError(f"{path}: rows[{index}].{field} must be a non-empty string, got {row[field]!r}")
    if not _is_number(row["value"]) or not math.isfinite(row["value"]):
        raise ResultFileError(f"{path}: rows[{index}].value must be a finite number, got {row['value']!r}")
    if not isinstance(row["n"], int) or isinstance(row["n"], bool) or row["n"] < 0:
        raise ResultFileError(f"{path}: rows[{index}].n must be a non-negative integer, got {row['n']!r}")
    for field in OPTIONAL_NUMBER_FIELDS:
        if row.get(field) is not None and not _is_number(row[field]):
            raise ResultFileError(f"{path}: rows[{index}].{field} must be a number or null, got {row[field]!r}")


def read_result_file(path: str | os.PathLike) -> tuple[str, list[dict], dict]:
    """(model, validated rows, provenance) of one result file; rows must belong to the path's model."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ResultFileError(f"{path}: unreadable result file ({error})") from None
    if not isinstance(content, dict) or not isinstance(content.get("rows"), list):
        raise ResultFileError(f"{path}: expected an object with a 'rows' list")
    model = model_from_result_path(path)
    if content.get("model", model) != model:
        raise MisattributedResultError(
            f"{path}: file says model {content['model']!r} but its path belongs to {model!r}"
        )
    for index, row in enumerate(content["rows"]):
        _check_row(row, index, path)
        if row["model"] != model:
            raise MisattributedResultError(
                f"{path}: rows[{index}] is for model {row['model']!r} but the path belongs to {model!r}"
            )
    return model, content["rows"], content.get("provenance") or {}


# --- building, sorting, reading the summary ------------------------------------------------------

def _summary_records(model: str, rows: list[dict]) -> list[dict]:
    cell = parse_cell(model)
    objectives = {axis: None if model == BASELINE else cell.get(axis, 0.0) for axis in OBJECTIVE_AXES}
    return [
        {
            **{column: row.get(column) for column in SUMMARY_COLUMNS},
            "alpha": cell.get("alpha"), "tau": cell.get("tau"), "seed": cell.get("seed"), **objectives,
        }
        for row in rows
    ]


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """One dtype per column, whatever the source (JSON nulls, CSV blanks)."""
    frame = frame.reindex(columns=list(SUMMARY_COLUMNS))
    for column in TEXT_COLUMNS:
        frame[column] = frame[column].astype(str)
    for column in FLOAT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="raise").astype("float64")
    for column in INT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="raise").astype("Int64")
    return frame


def _rank(values: pd.Series, order: Sequence[str]) -> pd.Series:
    """Position in ``order``; values not listed rank after it (ties then break alphabetically)."""
    position = {name: rank for rank, name in enumerate(order)}
    return values.map(lambda name: position.get(name, len(order)))


def sort_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Baseline first, then the seed's loss before other objectives, alpha, tau, seed; within a model benchmark,
    subset, metric."""
    keys = pd.DataFrame({
        "not_baseline": (summary["model"] != BASELINE).astype(int),
        **{axis: summary[axis] for axis in OBJECTIVE_AXES},
        "alpha": summary["alpha"], "tau": summary["tau"], "seed": summary["seed"],
        "benchmark_rank": _rank(summary["benchmark"], BENCHMARK_ORDER), "benchmark": summary["benchmark"],
        "subset_rank": _rank(summary["subset"], SUBSET_ORDER), "subset": summary["subset"],
        "metric": summary["metric"],
    })
    order = keys.sort_values(list(keys.columns), kind="mergesort", na_position="first").index
    return summary.loc[order].reset_index(drop=True)


def _reject_duplicates(frame: pd.DataFrame, sources: list[str]) -> None:
    duplicated = frame.duplicated(list(ROW_KEY), keep=False)
    if duplicated.any():
        first = frame.loc[duplicated, list(ROW_KEY)].iloc[0]
        same = (frame[list(ROW_KEY)] == first).all(axis=1)
        files = sorted({sources[i] for i in np.flatnonzero(same.to_numpy())})
        raise DuplicateResultError(
            f"duplicate result row {tuple(first)} in {' and '.join(files)}"
            + (" (twice in the same file)" if len(files) == 1 else "")
        )


def summary_provenance_path(out_csv: str | os.PathLike) -> Path:
    """``results/tables/summary.csv`` -> ``results/tables/summary.provenance.json``."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}.provenance.json")


def build_summary(result_files: Iterable[str | os.PathLike], out_csv: str | os.PathLike) -> pd.DataFrame:
    """Read every result file, check it, write ``out_csv`` (docs/design.md's columns, sorted) and its provenance."""
    paths = sorted({Path(path) for path in result_files}, key=str)
    if not paths:
        raise ResultFileError("no result files given to build the summary from")
    records: list[dict] = []
    sources: list[str] = []
    config_hashes: dict[str, list[str]] = {}
    for path in paths:
        model, rows, file_provenance = read_result_file(path)
        records += _summary_records(model, rows)
        sources += [str(path)] * len(rows)
        if "config_hash" in file_provenance:
            config_hashes.setdefault(str(file_provenance["config_hash"]), []).append(str(path))
    frame = _typed(pd.DataFrame.from_records(records, columns=list(SUMMARY_COLUMNS)))
    _reject_duplicates(frame, sources)
    summary = sort_summary(frame)
    with atomic_path(out_csv) as tmp:
        summary.to_csv(tmp, index=False)
    write_json(summary_provenance_path(out_csv), provenance(
        inputs=[str(path) for path in paths], checksum_inputs=True,
        rows=len(summary), input_config_hashes=config_hashes,
    ))
    log.info("summary: %d rows from %d result files -> %s", len(summary), len(paths), out_csv)
    return summary


def read_summary(path: str | os.PathLike) -> pd.DataFrame:
    """Read a summary CSV back with the dtypes ``build_summary`` returned.

    Only blank fields are missing values: a subset or class called 'None' or 'NA' stays a string.
    """
    path = Path(path)
    frame = pd.read_csv(
        path, keep_default_na=False, dtype={column: str for column in TEXT_COLUMNS},
        na_values={column: [""] for column in FLOAT_COLUMNS + INT_COLUMNS},
    )
    absent = [column for column in SUMMARY_COLUMNS if column not in frame.columns]
    if absent:
        raise ResultFileError(f"{path}: not a summary table, lacks columns {', '.join(absent)}")
    return _typed(frame)


# --- completeness ------------------------------------------------------------------------------

def check_complete(
    summary: pd.DataFrame,
    expected_models: Sequence[str],
    benchmarks: Sequence[str],
    *,
    allow_partial: bool = False,
) -> list[tuple[str, str]]:
    """The (model, benchmark) pairs without any row; raises ``MissingResultError`` unless ``allow_partial``."""
    present = set(zip(summary["model"], summary["benchmark"]))
    missing = [(model, benchmark) for model in expected_models for benchmark in benchmarks
               if (model, benchmark) not in present]
    if missing and not allow_partial:
        by_model: dict[str, list[str]] = {}
        for model, benchmark in missing:
            by_model.setdefault(model, []).append(benchmark)
        listing = "; ".join(f"{model} ({', '.join(names)})" for model, names in by_model.items())
        raise MissingResultError(
            f"missing results for {len(missing)} model × benchmark pair(s): {listing}"
        )
    return missing


def partial_note(missing: Sequence[tuple[str, str]], expected_models: Sequence[str]) -> str | None:
    """'PARTIAL: n of m cells' (n = models with every benchmark) when anything is missing, else None."""
    if not missing:
        return None
    incomplete = {model for model, _ in missing}
    complete = sum(model not in incomplete for model in dict.fromkeys(expected_models))
    return f"PARTIAL: {complete} of {len(dict.fromkeys(expected_models))} cells"


# --- aggregation over seeds ----------------------------------------------------------------------

def setting_of(model: str) -> str:
    """The grid setting a model belongs to: 'baseline' or ``[objective~W/]alpha~A/tau~T`` (the seed dropped)."""
    return model if model == BASELINE else model.rsplit("/", 1)[0]


def _largest_p(p_values: pd.Series) -> float:
    """Conservative combination over seeds: the largest p, unknown (NaN) if any seed's p is unknown."""
    return float("nan") if p_values.isna().any() else float(p_values.max())


def aggregate_over_seeds(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, benchmark, subset, metric) with the seed aggregate.

    ``value`` is the mean over seeds; ``value_min``/``value_max`` the spread. The interval is the
    seed's own bootstrap CI when there is one seed, else the envelope [min ci_low, max ci_high] over
    seeds (a seed without a CI contributes its value): it covers both test-set sampling and seed
    variation without assuming normality from 2–3 seeds. Deltas are means over seeds; their p is the
    largest per-seed p (significant only if every seed is).
    """
    frame = summary.assign(
        setting=summary["model"].map(setting_of),
        low_or_value=summary["ci_low"].fillna(summary["value"]),
        high_or_value=summary["ci_high"].fillna(summary["value"]),
    )
    grouped = frame.groupby(["setting", "benchmark", "subset", "metric"], sort=False, dropna=False)
    result = grouped.agg(
        alpha=("alpha", "first"), tau=("tau", "first"), **{axis: (axis, "first") for axis in OBJECTIVE_AXES},
        n_seeds=("model", "nunique"),
        value=("value", "mean"), value_min=("value", "min"), value_max=("value", "max"),
        single_ci_low=("ci_low", "first"), single_ci_high=("ci_high", "first"),
        envelope_low=("low_or_value", "min"), envelope_high=("high_or_value", "max"),
        delta_vs_baseline=("delta_vs_baseline", "mean"), delta_vs_control=("delta_vs_control", "mean"),
        n=("n", "min"),
    ).reset_index()
    result["p_vs_baseline"] = grouped["p_vs_baseline"].agg(_largest_p).to_numpy()
    result["p_vs_control"] = grouped["p_vs_control"].agg(_largest_p).to_numpy()
    one_seed = result["n_seeds"] == 1
    result["ci_low"] = result["envelope_low"].where(~one_seed, result["single_ci_low"])
    result["ci_high"] = result["envelope_high"].where(~one_seed, result["single_ci_high"])
    return result.drop(columns=["single_ci_low", "single_ci_high", "envelope_low", "envelope_high"])
