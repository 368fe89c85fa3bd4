"""Thesis figures, views of the summary table and the training logs (never of models or GPUs).

Every figure is written as ``{stem}.pdf`` and ``{stem}.png``: alpha × tau heatmaps, per-type-group
bars, the relational-gain trade-off scatter and training curves. Figures whose numbers are absent
from the summary are skipped (logged), so a run without VQA still draws the rest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from hnclip.pipeline.grid import BASELINE, OBJECTIVE_AXES, objectives_of, parse_cell
from hnclip.report.style import (
    DOUBLE_COLUMN_IN, LINESTYLES, MARKERS, OKABE_ITO, PALETTE, ROLE_COLOURS, SEQUENTIAL_CMAP, SINGLE_COLUMN_IN,
    mark_partial, new_figure, save_figure, thesis_style,
)
from hnclip.report.summary import aggregate_over_seeds, setting_of
from hnclip.report.objectives import objectives_figure
from hnclip.report.tables import display_scale, display_unit, format_value, key_columns, objectives_label

log = logging.getLogger(__name__)

HNC = ("hnc_test", "pairwise_accuracy")
TRAIN_LOG_COLUMNS = ("step", "loss", "image_to_text", "text_to_image", "val_pairwise_accuracy")
LOSS_PARTS = (("loss", "total", OKABE_ITO["black"]), ("image_to_text", "image→text", OKABE_ITO["blue"]),
              ("text_to_image", "text→image", OKABE_ITO["orange"]))
SMOOTHING_FRACTION = 0.02
CHANCE_PAIRWISE = 0.5  # a pair is two captions: guessing is right half the time


class TrainLogError(ValueError):
    """A training log is unreadable or lacks a column; the message names the file."""


@dataclass(frozen=True)
class HeatmapSpec:
    stem: str
    benchmark: str
    metric: str
    subset: str
    title: str


HEATMAPS = (
    HeatmapSpec("heatmap_hnc_all", "hnc_test", "pairwise_accuracy", "all", "HNC pairwise accuracy (all)"),
    HeatmapSpec("heatmap_hnc_relation", "hnc_test", "pairwise_accuracy", "relation",
                "HNC pairwise accuracy (relation)"),
    HeatmapSpec("heatmap_zeroshot_top1", "zeroshot", "top1", "all", "Zero-shot top-1"),
    HeatmapSpec("heatmap_drift_cka", "drift", "cka", "all", "CKA to the baseline tower"),
    HeatmapSpec("heatmap_vqav2_accuracy", "vqav2", "accuracy", "all", "VQA v2 accuracy"),
    HeatmapSpec("heatmap_textvqa_accuracy", "textvqa", "accuracy", "all", "TextVQA accuracy"),
)


def _select(aggregate: pd.DataFrame, benchmark: str, metric: str, subset: str | None = None) -> pd.DataFrame:
    mask = (aggregate["benchmark"] == benchmark) & (aggregate["metric"] == metric)
    if subset is not None:
        mask &= aggregate["subset"] == subset
    return aggregate[mask]


def _baseline_value(rows: pd.DataFrame) -> float | None:
    baseline = rows[rows["setting"] == BASELINE]
    return None if baseline.empty else float(baseline["value"].iloc[0])


def _axis_number(value: float) -> str:
    return f"{value:g}"


def alpha_tau(setting: str) -> tuple[float, float]:
    """``alpha~5.0/tau~0.05`` -> (5.0, 0.05), parsed by the grid's own rules (any seed will do)."""
    cell = parse_cell(f"{setting}/seed~0")
    return cell["alpha"], cell["tau"]


def _unit_suffix(metric: str) -> str:
    unit = display_unit(metric)
    return f" ({unit})" if unit else ""


# --- alpha × tau heatmaps ------------------------------------------------------------------------

def _annotate_cells(axes, image, matrix: pd.DataFrame, metric: str) -> None:
    """Each cell's value, dark text on light cells and light text on dark ones."""
    scale = display_scale(metric)
    for row, alpha in enumerate(matrix.index):
        for column, tau in enumerate(matrix.columns):
            value = matrix.at[alpha, tau]
            light = not np.isnan(value) and image.norm(value * scale) > 0.55
            axes.text(column, row, format_value(value, metric), ha="center", va="center", fontsize=7,
                      color="black" if light or np.isnan(value) else "white")


def heatmap_figure(aggregate: pd.DataFrame, spec: HeatmapSpec, partial_note: str | None = None) -> Figure | None:
    """Mean over seeds per (alpha, tau); the baseline's value in the title and as a line on the colour bar."""
    rows = _select(aggregate, spec.benchmark, spec.metric, spec.subset)
    grid = rows[rows["setting"] != BASELINE]
    if grid.empty:
        return None
    matrix = grid.pivot(index="alpha", columns="tau", values="value").sort_index().sort_index(axis=1)
    scale = display_scale(spec.metric)
    baseline = _baseline_value(rows)
    shown = matrix.to_numpy(dtype=float) * scale
    limits = [np.nanmin(shown), np.nanmax(shown)] + ([baseline * scale] if baseline is not None else [])
    figure = new_figure(SINGLE_COLUMN_IN, 1.1 + 0.3 * len(matrix.index))
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(shown), cmap=SEQUENTIAL_CMAP, aspect="auto", origin="lower",
                        vmin=min(limits), vmax=max(limits))
    _annotate_cells(axes, image, matrix, spec.metric)
    axes.set_xticks(range(len(matrix.columns)), [_axis_number(t) for t in matrix.columns])
    axes.set_yticks(range(len(matrix.index)), [_axis_number(a) for a in matrix.index])
    axes.set_xlabel(r"temperature $\tau$")
    axes.set_ylabel(r"hard-negative weight $\alpha$")
    colour_bar = figure.colorbar(image, ax=axes, label=f"mean over seeds{_unit_suffix(spec.metric)}")
    title = spec.title
    if baseline is not None:
        colour_bar.ax.axhline(baseline * scale, color=OKABE_ITO["vermillion"], linewidth=1.2)
        title += f"\nbaseline {format_value(baseline, spec.metric)}{display_unit(spec.metric)} (line on colour bar)"
    axes.set_title(title)
    mark_partial(figure, partial_note)
    return figure


# --- per-type-group bars -------------------------------------------------------------------------

def best_setting(aggregate: pd.DataFrame) -> str | None:
    """The alpha > 0 setting with the highest HNC 'all' pairwise accuracy, mean over seeds."""
    rows = _select(aggregate, *HNC, "all")
    candidates = rows[(rows["setting"] != BASELINE) & (rows["alpha"] > 0)].dropna(subset=["value"])
    if candidates.empty:
        return None
    return str(candidates.sort_values(["value", "setting"], ascending=[False, True])["setting"].iloc[0])


def _matching_control(aggregate: pd.DataFrame, best: str | None) -> str | None:
    """The alpha = 0 setting of the best cell's tau, else the control with the smallest tau."""
    settings = aggregate.drop_duplicates("setting")
    controls = settings[(settings["setting"] != BASELINE) & (settings["alpha"] == 0.0)].sort_values("tau")
    if controls.empty:
        return None
    if best is not None:
        best_tau = settings.loc[settings["setting"] == best, "tau"].iloc[0]
        same_tau = controls[controls["tau"] == best_tau]
        if not same_tau.empty:
            return str(same_tau["setting"].iloc[0])
    return str(controls["setting"].iloc[0])


def _bar_label(role: str, setting: str, aggregate: pd.DataFrame) -> str:
    if role == "baseline":
        return "baseline"
    first = aggregate[aggregate["setting"] == setting].iloc[0]
    seeds = int(first["n_seeds"])
    what = "control α = 0" if role == "control" else f"best α = {first['alpha']:g}"
    return f"{what}, τ = {first['tau']:g} ({seeds} seed{'s' if seeds != 1 else ''})"


def type_group_figure(aggregate: pd.DataFrame, partial_note: str | None = None) -> Figure | None:
    """HNC pairwise accuracy per type group with intervals: baseline, control, best cell."""
    hnc = _select(aggregate, *HNC)
    groups = [subset for metric, subset in key_columns(hnc, HNC[0]) if metric == HNC[1] and subset != "all"]
    if not groups:
        return None
    best = best_setting(aggregate)
    roles = [("baseline", BASELINE), ("control", _matching_control(hnc, best)), ("best", best)]
    roles = [(role, setting) for role, setting in roles if setting is not None and (hnc["setting"] == setting).any()]
    if not roles:
        return None
    figure = new_figure(SINGLE_COLUMN_IN, 2.3)
    axes = figure.add_subplot()
    width = 0.8 / len(roles)
    positions = np.arange(len(groups))
    indexed = hnc.set_index(["setting", "subset"])
    for index, (role, setting) in enumerate(roles):
        rows = indexed.reindex([(setting, group) for group in groups])
        values = rows["value"].to_numpy(dtype=float) * 100
        errors = np.vstack([values - rows["ci_low"].to_numpy(dtype=float) * 100,
                            rows["ci_high"].to_numpy(dtype=float) * 100 - values])
        axes.bar(positions + (index - (len(roles) - 1) / 2) * width, values, width,
                 yerr=np.nan_to_num(errors), color=ROLE_COLOURS[role], label=_bar_label(role, setting, hnc),
                 error_kw={"elinewidth": 0.7, "ecolor": "black"})
    axes.axhline(CHANCE_PAIRWISE * 100, color="black", linestyle=":", linewidth=0.8)
    axes.set_xticks(positions, groups)
    axes.set_ylabel("pairwise accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title("HNC test by negative type (chance dotted)")
    figure.legend(loc="outside lower center", ncols=1)
    mark_partial(figure, partial_note)
    return figure


# --- the compositionality benchmarks --------------------------------------------------------------

# (benchmark, metric, subset, label) of the figure: each benchmark's headline numbers, as its paper reports them.
COMPOSITIONAL_PANELS = (
    ("SugarCrepe", (("sugarcrepe", "accuracy", "replace", "replace"), ("sugarcrepe", "accuracy", "swap", "swap"),
                    ("sugarcrepe", "accuracy", "add", "add"))),
    ("ARO", (("aro", "macro_accuracy", "vg_relation", "VG-Rel."), ("aro", "macro_accuracy", "vg_attribution", "VG-Att."),
             ("aro", "accuracy", "coco_order", "COCO-Ord."), ("aro", "accuracy", "flickr30k_order", "Flickr-Ord."))),
    ("Winoground", (("winoground", "text_score", "all", "text"), ("winoground", "image_score", "all", "image"),
                    ("winoground", "group_score", "all", "group"))),
)


def compositional_figure(aggregate: pd.DataFrame, partial_note: str | None = None) -> Figure | None:
    """SugarCrepe, ARO and Winoground side by side: baseline, control and the best HNC cell (mean over seeds,
    intervals), one panel per benchmark."""
    panels = [(title, [m for m in measures if not _select(aggregate, *m[:3]).empty]) for title, measures in
              COMPOSITIONAL_PANELS]
    panels = [(title, measures) for title, measures in panels if measures]
    if not panels:
        return None
    best = best_setting(aggregate)
    roles = [("baseline", BASELINE), ("control", _matching_control(aggregate, best)), ("best", best)]
    roles = [(role, setting) for role, setting in roles if setting is not None]
    figure = new_figure(DOUBLE_COLUMN_IN, 2.4)
    axes_list = figure.subplots(1, len(panels), squeeze=False, width_ratios=[len(m) for _, m in panels])[0]
    width = 0.8 / len(roles)
    for axes, (title, measures) in zip(axes_list, panels):
        positions = np.arange(len(measures))
        for index, (role, setting) in enumerate(roles):
            rows = [_select(aggregate, *measure[:3]) for measure in measures]
            rows = [r[r["setting"] == setting] for r in rows]
            values = np.array([r["value"].iloc[0] * 100 if not r.empty else np.nan for r in rows])
            lows = np.array([r["ci_low"].iloc[0] * 100 if not r.empty else np.nan for r in rows])
            highs = np.array([r["ci_high"].iloc[0] * 100 if not r.empty else np.nan for r in rows])
            errors = np.nan_to_num(np.vstack([values - lows, highs - values]))
            axes.bar(positions + (index - (len(roles) - 1) / 2) * width, values, width, yerr=errors,
                     color=ROLE_COLOURS[role], label=_bar_label(role, setting, aggregate) if axes is axes_list[0] else None,
                     error_kw={"elinewidth": 0.7, "ecolor": "black"})
        axes.set_xticks(positions, [measure[3] for measure in measures])
        axes.set_ylim(0, 100)
        axes.set_title(title)
    axes_list[0].set_ylabel("accuracy / score (%)")
    figure.legend(loc="outside lower center", ncols=len(roles))
    mark_partial(figure, partial_note)
    return figure


# --- trade-off scatter ---------------------------------------------------------------------------

def per_seed_change(summary: pd.DataFrame, benchmark: str, metric: str, subset: str = "all") -> pd.Series | None:
    """value − baseline value for every grid model (index), in display units; None without a baseline."""
    rows = summary[(summary["benchmark"] == benchmark) & (summary["metric"] == metric) & (summary["subset"] == subset)]
    baseline = rows.loc[rows["model"] == BASELINE, "value"]
    grid = rows[rows["model"] != BASELINE]
    if baseline.empty or grid.empty:
        return None
    return (grid.set_index("model")["value"] - float(baseline.iloc[0])) * display_scale(metric)


def _seed_spread(changes: pd.DataFrame) -> pd.DataFrame:
    """Per setting the mean change on both axes and the min/max over seeds (the error bars)."""
    changes = changes.assign(setting=changes.index.map(setting_of))
    spread = changes.groupby("setting").agg(x=("x", "mean"), x_min=("x", "min"), x_max=("x", "max"),
                                            y=("y", "mean"), y_min=("y", "min"), y_max=("y", "max"))
    values = [alpha_tau(setting) for setting in spread.index]
    return spread.assign(alpha=[alpha for alpha, _ in values], tau=[tau for _, tau in values])


def _tradeoff_panel(axes, spread: pd.DataFrame, alphas: list[float], taus: list[float], x_label: str) -> None:
    for setting, point in spread.iterrows():
        axes.errorbar(
            point["x"], point["y"],
            xerr=[[point["x"] - point["x_min"]], [point["x_max"] - point["x"]]],
            yerr=[[point["y"] - point["y_min"]], [point["y_max"] - point["y"]]],
            color=PALETTE[alphas.index(point["alpha"]) % len(PALETTE)],
            marker=MARKERS[taus.index(point["tau"]) % len(MARKERS)], linestyle="none", elinewidth=0.7,
        )
    axes.axhline(0, color="grey", linewidth=0.6, linestyle="--")
    axes.axvline(0, color="grey", linewidth=0.6, linestyle="--")
    axes.set_xlabel(x_label)


def tradeoff_figure(summary: pd.DataFrame, partial_note: str | None = None) -> Figure | None:
    """Relational gain vs object-recognition change (and vs VQA v2 change when measured), one point
    per (alpha, tau) at the mean over seeds, error bars spanning the seeds."""
    gain = per_seed_change(summary, *HNC, "relation")
    if gain is None:
        return None
    panels = []
    for benchmark, metric, label in (("zeroshot", "top1", "zero-shot top-1"), ("vqav2", "accuracy", "VQA v2 accuracy")):
        change = per_seed_change(summary, benchmark, metric)
        if change is not None:
            joined = pd.DataFrame({"x": change, "y": gain}).dropna()
            if not joined.empty:
                panels.append((_seed_spread(joined), f"Δ {label} vs baseline (pp)"))
    if not panels:
        return None
    alphas = sorted(set().union(*(spread["alpha"] for spread, _ in panels)))
    taus = sorted(set().union(*(spread["tau"] for spread, _ in panels)))
    figure = new_figure(SINGLE_COLUMN_IN if len(panels) == 1 else DOUBLE_COLUMN_IN, 2.4)
    axes_list = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (spread, x_label) in zip(axes_list, panels):
        _tradeoff_panel(axes, spread, alphas, taus, x_label)
    axes_list[0].set_ylabel("Δ HNC relation vs baseline (pp)")
    handles = [Line2D([], [], color=PALETTE[i % len(PALETTE)], marker="o", linestyle="none", label=f"α = {a:g}")
               for i, a in enumerate(alphas)]
    handles += [Line2D([], [], color="grey", marker=MARKERS[i % len(MARKERS)], linestyle="none", label=f"τ = {t:g}")
                for i, t in enumerate(taus)]
    figure.legend(handles=handles, loc="outside right upper")
    mark_partial(figure, partial_note)
    return figure


# --- training curves -----------------------------------------------------------------------------

def read_train_log(path: str | os.PathLike) -> pd.DataFrame:
    """The columns the curves need, numeric (validation accuracy blank except at validation steps)."""
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise TrainLogError(f"{path}: unreadable training log ({error})") from None
    missing = [column for column in TRAIN_LOG_COLUMNS if column not in frame.columns]
    if missing:
        raise TrainLogError(f"{path}: training log lacks column(s) {', '.join(missing)}")
    return frame[list(TRAIN_LOG_COLUMNS)].apply(pd.to_numeric, errors="coerce")


def _logs_by_setting(train_logs: Mapping[str, str | os.PathLike]) -> dict[str, list[tuple[str, pd.DataFrame]]]:
    """Baseline first, then settings by (alpha, tau); each with its seeds' logs in seed order."""
    def order(model: str) -> tuple:
        cell = parse_cell(model)
        return (model != BASELINE, *(cell.get(axis, 0.0) for axis in OBJECTIVE_AXES), cell.get("alpha", 0.0),
                cell.get("tau", 0.0), cell.get("seed", 0))
    grouped: dict[str, list[tuple[str, pd.DataFrame]]] = {}
    for model in sorted(train_logs, key=order):
        seed = "" if model == BASELINE else f"seed {parse_cell(model)['seed']}"
        grouped.setdefault(setting_of(model), []).append((seed, read_train_log(train_logs[model])))
    return grouped


def _setting_title(setting: str) -> str:
    if setting == BASELINE:
        return "baseline"
    alpha, tau = alpha_tau(setting)
    objectives = objectives_label(setting)
    return f"α = {alpha:g}, τ = {tau:g}" + (f"; {objectives}" if objectives else "")


def running_mean(values: pd.Series, fraction: float = SMOOTHING_FRACTION) -> pd.Series:
    """Per-step losses are noisy; a centred running mean over ``fraction`` of the steps shows the trend."""
    window = max(1, int(len(values) * fraction))
    return values.rolling(window, center=True, min_periods=1).mean()


def _plot_training_row(loss_axes, validation_axes, setting: str, logs: list[tuple[str, pd.DataFrame]]) -> None:
    for index, (_, frame) in enumerate(logs):
        linestyle = LINESTYLES[index % len(LINESTYLES)]
        for column, _, colour in LOSS_PARTS:
            loss_axes.plot(frame["step"], running_mean(frame[column]), color=colour, linestyle=linestyle,
                           linewidth=0.7)
        validation = frame.dropna(subset=["val_pairwise_accuracy"])
        validation_axes.plot(validation["step"], validation["val_pairwise_accuracy"] * 100, linestyle=linestyle,
                             marker="o", markersize=2.5, color=OKABE_ITO["bluish_green"], linewidth=0.8)
    loss_axes.set_title(f"{_setting_title(setting)}: loss (running mean)")
    loss_axes.set_ylabel("loss")
    validation_axes.set_title(f"{_setting_title(setting)}: validation")
    validation_axes.set_ylabel("pairwise acc. (%)")
    if all(frame["val_pairwise_accuracy"].isna().all() for _, frame in logs):
        validation_axes.text(0.5, 0.5, "no validation steps", ha="center", va="center",
                             transform=validation_axes.transAxes)


def training_curves_figure(
    train_logs: Mapping[str, str | os.PathLike], partial_note: str | None = None
) -> Figure | None:
    """A row per (alpha, tau): loss parts and validation pairwise accuracy vs step, seeds overlaid."""
    if not train_logs:
        return None
    grouped = _logs_by_setting(train_logs)
    figure = new_figure(DOUBLE_COLUMN_IN, 0.6 + 1.5 * len(grouped))
    # No shared x: the baseline's pre-training and the fine-tuning runs have different lengths.
    axes_grid = figure.subplots(len(grouped), 2, squeeze=False)
    for (loss_axes, validation_axes), (setting, logs) in zip(axes_grid, grouped.items()):
        _plot_training_row(loss_axes, validation_axes, setting, logs)
    for axes in axes_grid[-1]:
        axes.set_xlabel("step")
    seeds = max(grouped.values(), key=len)
    handles = [Line2D([], [], color=colour, label=label) for _, label, colour in LOSS_PARTS]
    handles += [Line2D([], [], color="grey", linestyle=LINESTYLES[i % len(LINESTYLES)], label=seed or "run")
                for i, (seed, _) in enumerate(seeds)]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6))
    mark_partial(figure, partial_note)
    return figure


# --- all figures -------------------------------------------------------------------------------

def write_figures(
    summary: pd.DataFrame,
    train_logs: Mapping[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    partial_note: str | None = None,
    objectives: bool = False,
) -> list[Path]:
    """Draw every figure the summary and logs allow into ``out_dir``; returns the files written.

    The alpha x tau figures show the seed's loss (and the baseline); the cells that add an objective are compared
    with them in the ``objectives`` figure (drawn, if only to say it has no pair, when ``objectives``: the run
    declared it), and their training curves are drawn with the others."""
    seed_loss = summary[summary["model"].map(lambda model: model == BASELINE or not objectives_of(model))]
    aggregate = aggregate_over_seeds(seed_loss)
    written: list[Path] = []
    with thesis_style():
        builders = [(spec.stem, lambda spec=spec: heatmap_figure(aggregate, spec, partial_note)) for spec in HEATMAPS]
        builders += [
            ("type_groups", lambda: type_group_figure(aggregate, partial_note)),
            ("compositional", lambda: compositional_figure(aggregate, partial_note)),
            ("tradeoff", lambda: tradeoff_figure(seed_loss, partial_note)),
            ("objectives", lambda: objectives_figure(summary, partial_note, required=objectives)),
            ("training_curves", lambda: training_curves_figure(train_logs, partial_note)),
        ]
        for stem, build in builders:
            figure = build()
            if figure is None:
                log.info("figure %s skipped: its numbers are not in the summary", stem)
                continue
            written += save_figure(figure, out_dir, stem)
    return written
