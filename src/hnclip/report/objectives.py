"""What each objective beside the seed's loss did: every regularised cell against the same (alpha, tau, seed) cell
trained with the seed's loss alone, on relational accuracy, recognition, feature drift and VQA.

The comparison is paired by seed (both cells saw the same batches), so the change per seed is the objective's
effect on that run; the table and figure give its mean over seeds and the range the seeds span.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from hnclip.io import atomic_path, write_text
from hnclip.pipeline.grid import BASELINE, OBJECTIVE_AXES, parse_cell, unregularised_cell
from hnclip.report.style import DOUBLE_COLUMN_IN, PALETTE, mark_partial, new_figure
from hnclip.report.summary import setting_of
from hnclip.report.tables import display_scale, display_unit, format_value, objectives_label

# (benchmark, metric, subset, label): the trade-off the objectives are meant to move.
MEASURES = (
    ("hnc_test", "pairwise_accuracy", "relation", "HNC relation"),
    ("hnc_test", "pairwise_accuracy", "all", "HNC all"),
    ("zeroshot", "top1", "all", "zero-shot top-1"),
    ("drift", "cka", "all", "drift CKA"),
    ("drift", "mean_cosine", "all", "drift cosine"),
    ("vqav2", "accuracy", "all", "VQA v2"),
    ("textvqa", "accuracy", "all", "TextVQA"),
)
COLUMNS = ("setting", "objectives", *OBJECTIVE_AXES, "alpha", "tau", "reference_setting", "benchmark", "metric",
           "subset", "measure", "value", "reference_value", "change", "change_min", "change_max", "n_seeds")
NO_PAIRS = "No cell that adds an objective has its twin (same alpha, tau and seed, the seed's loss alone) in the summary."


def paired_changes(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (regularised model, measure): its value, the unregularised twin's, and the change (in the
    metric's stored units, like the summary); models whose twin is not in the summary are left out."""
    models = [m for m in summary["model"].unique() if m != BASELINE and unregularised_cell(m) is not None]
    measured = summary.set_index(["model", "benchmark", "metric", "subset"])["value"]
    rows = []
    for model in models:
        twin = unregularised_cell(model)
        for benchmark, metric, subset, label in MEASURES:
            key, twin_key = (model, benchmark, metric, subset), (twin, benchmark, metric, subset)
            if key not in measured.index or twin_key not in measured.index:
                continue
            rows.append({"model": model, "reference": twin, "benchmark": benchmark, "metric": metric,
                         "subset": subset, "measure": label, "value": measured[key],
                         "reference_value": measured[twin_key], "change": measured[key] - measured[twin_key]})
    return pd.DataFrame(rows, columns=["model", "reference", "benchmark", "metric", "subset", "measure", "value",
                                       "reference_value", "change"])


def objective_effects(summary: pd.DataFrame) -> pd.DataFrame:
    """Per regularised setting and measure: mean value, mean reference value, mean change and its range over
    seeds (``COLUMNS``); empty when the run sweeps no objective."""
    changes = paired_changes(summary)
    if changes.empty:
        return pd.DataFrame(columns=COLUMNS)
    changes = changes.assign(setting=changes["model"].map(setting_of),
                             reference_setting=changes["reference"].map(setting_of))
    grouped = changes.groupby(["setting", "reference_setting", "benchmark", "metric", "subset", "measure"],
                              sort=False)
    effects = grouped.agg(value=("value", "mean"), reference_value=("reference_value", "mean"),
                          change=("change", "mean"), change_min=("change", "min"), change_max=("change", "max"),
                          n_seeds=("model", "nunique")).reset_index()
    cells = effects["setting"].map(lambda setting: parse_cell(f"{setting}/seed~0"))
    effects = effects.assign(objectives=effects["setting"].map(objectives_label),
                             **{key: [cell.get(key, 0.0) for cell in cells] for key in (*OBJECTIVE_AXES, "alpha", "tau")})
    order = {label: rank for rank, (*_, label) in enumerate(MEASURES)}
    effects = effects.sort_values([*OBJECTIVE_AXES, "alpha", "tau", "measure"], key=lambda column: (
        column.map(order) if column.name == "measure" else column), kind="mergesort")
    return effects[list(COLUMNS)].reset_index(drop=True)


def _range_text(row: pd.Series) -> str:
    change = format_value(row["change"], row["metric"], signed=True)
    if row["n_seeds"] < 2:
        return change
    low, high = (format_value(row[key], row["metric"], signed=True) for key in ("change_min", "change_max"))
    return f"{change} [{low}, {high}]"


def _change_unit(metric: str) -> str:
    """Changes of a percentage are percentage points."""
    return " (pp)" if display_unit(metric) == "%" else ""


def to_markdown(effects: pd.DataFrame, partial_note: str | None = None) -> str:
    """Rows: regularised settings; columns: the change of each measure, mean over seeds [seed range]."""
    measures = [(label, metric) for _, metric, _, label in MEASURES if label in set(effects["measure"])]
    header = ["setting", "vs", "seeds", *[f"Δ {label}{_change_unit(metric)}" for label, metric in measures]]
    lines = ["# What each objective changed against the same cell without it", ""]
    if partial_note:
        lines += [f"**{partial_note}**", ""]
    if effects.empty:
        return "\n".join([*lines, NO_PAIRS]) + "\n"
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, rows in effects.groupby("setting", sort=False):
        by_measure = rows.set_index("measure")
        first = rows.iloc[0]
        cells = [f"{first['objectives']}; α = {first['alpha']:g}, τ = {first['tau']:g}", "seed's loss alone",
                 str(int(rows["n_seeds"].min()))]
        cells += [_range_text(by_measure.loc[label]) if label in by_measure.index else "–" for label, _ in measures]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Δ: the regularised cell minus the cell with the same α, τ and seed trained with the seed's loss "
              "alone, mean over seeds [lowest, highest seed]. pp: percentage points."]
    return "\n".join(lines) + "\n"


def write_objective_tables(effects: pd.DataFrame, out_dir: str | os.PathLike,
                           partial_note: str | None = None) -> list[Path]:
    """``objectives.csv`` and ``objectives.md`` in ``out_dir``, from ``objective_effects``."""
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / "objectives.csv", out_dir / "objectives.md"
    with atomic_path(csv_path) as tmp, open(tmp, "w") as handle:
        if partial_note:
            handle.write(f"# {partial_note}\n")
        effects.to_csv(handle, index=False)
    write_text(md_path, to_markdown(effects, partial_note))
    return [csv_path, md_path]


def objectives_figure(summary: pd.DataFrame, partial_note: str | None = None, *,
                      required: bool = False) -> Figure | None:
    """One panel per measure: each regularised setting's change against its unregularised twin, the mean over seeds
    with bars spanning the seeds. Without a pair: None, or (``required``: the run declared the figure) a figure that
    says so."""
    effects = objective_effects(summary)
    if effects.empty:
        return _no_pairs_figure(partial_note) if required else None
    measures = [measure for measure in MEASURES if measure[3] in set(effects["measure"])]
    settings = list(dict.fromkeys(effects["setting"]))
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(settings))]
    columns = math.ceil(len(measures) / 2)
    figure = new_figure(DOUBLE_COLUMN_IN, 3.6 + 0.15 * len(settings))
    axes_list = figure.subplots(2, columns, squeeze=False).flatten()
    for unused in axes_list[len(measures):]:
        unused.remove()
    for axes, (_, metric, _, label) in zip(axes_list, measures):
        rows = effects[effects["measure"] == label].set_index("setting").reindex(settings)
        change, low, high = (rows[key].to_numpy(dtype=float) * display_scale(metric)
                             for key in ("change", "change_min", "change_max"))
        axes.bar(range(len(settings)), change, yerr=np.nan_to_num(np.vstack([change - low, high - change])),
                 color=colours, error_kw={"elinewidth": 0.7, "ecolor": "black"})
        axes.axhline(0, color="grey", linewidth=0.6)
        axes.set_xticks([])
        axes.set_title(f"Δ {label}{_change_unit(metric)}")
    handles = [Patch(color=colour, label=_legend(effects, setting)) for colour, setting in zip(colours, settings)]
    figure.legend(handles=handles, loc="outside lower center", ncols=1 if len(settings) > 4 else 2)
    figure.suptitle("Each objective against the same cell without it\n(mean over seeds, whiskers: seed range)")
    mark_partial(figure, partial_note)
    return figure


def _legend(effects: pd.DataFrame, setting: str) -> str:
    first = effects[effects["setting"] == setting].iloc[0]
    return f"{first['objectives']}; α = {first['alpha']:g}, τ = {first['tau']:g} ({int(first['n_seeds'])} seeds)"


def _no_pairs_figure(partial_note: str | None) -> Figure:
    figure = new_figure(DOUBLE_COLUMN_IN, 1.2)
    figure.text(0.5, 0.5, NO_PAIRS, ha="center", va="center", wrap=True)
    mark_partial(figure, partial_note)
    return figure
