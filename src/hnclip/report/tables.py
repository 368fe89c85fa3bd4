"""Comparison tables per benchmark (CSV, Markdown, LaTeX/booktabs), views of the summary table.

Rows: the baseline, the alpha = 0 control(s), then every (alpha, tau) setting, then the same for each objective
setting beside the seed's loss (a regulariser's weight, the preference mix), each aggregated over seeds (``summary.aggregate_over_seeds``). Columns: the benchmark's key metrics/subsets, each with its
delta vs the baseline and vs the control and significance marks. Numbers are formatted in one place,
``format_value``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from hnclip.pipeline.grid import BASELINE, OBJECTIVE_AXES, objectives_of
from hnclip.io import atomic_path, write_text
from hnclip.data.leakage import CLEAN_SUFFIX
from hnclip.report.summary import SUBSET_ORDER, aggregate_over_seeds, setting_of

log = logging.getLogger(__name__)

PERCENT_METRICS = frozenset({"pairwise_accuracy", "top1", "top5", "accuracy", "exact_match", "macro_accuracy",
                             "text_score", "image_score", "group_score"})
THREE_DECIMAL_METRICS = frozenset({"cka", "mean_cosine"})
MISSING = "–"  # en dash: a number that does not exist (baseline's delta, a CI-less metric)

# The metrics a benchmark's table shows, first one broken down by subset; unknown benchmarks show all.
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "hnc_test": ("pairwise_accuracy",),
    "zeroshot": ("top1",),
    "drift": ("cka", "mean_cosine"),
    "vqav2": ("accuracy",),
    "textvqa": ("accuracy", "exact_match"),
    "vqav2_testdev": ("accuracy",),
    "sugarcrepe": ("accuracy",),
    "aro": ("macro_accuracy", "accuracy"),  # ARO's own figures: macro for VG-Relation/Attribution, accuracy for order
    "winoground": ("group_score", "text_score", "image_score"),
}
# Subset prefixes too fine for a thesis table (per HNC type, per class, per question type, per SugarCrepe category,
# per Winoground tag).
FINE_SUBSET_PREFIXES = ("type:", "class:", "question_type:", "tag:", "replace_", "swap_", "add_")
METRIC_LABELS = {
    "pairwise_accuracy": "pairwise acc.", "top1": "top-1", "top5": "top-5", "cka": "CKA",
    "mean_cosine": "mean cosine", "accuracy": "accuracy", "exact_match": "exact match",
}
COMPARISONS = ("baseline", "control")

Column = tuple[str, str]  # (metric, subset)


# --- numbers: formatted here and nowhere else ----------------------------------------------------

def display_scale(metric: str) -> float:
    """Factor from the stored number to the shown one: accuracies are fractions, shown in percent."""
    return 100.0 if metric in PERCENT_METRICS else 1.0


def display_unit(metric: str) -> str:
    return "%" if metric in PERCENT_METRICS else ""


def format_value(value: float | None, metric: str, *, signed: bool = False) -> str:
    """Accuracies as percentages with one decimal (deltas then in percentage points), CKA/cosine
    and unknown metrics with three decimals; a missing number is an en dash."""
    if value is None or pd.isna(value):
        return MISSING
    decimals = 1 if metric in PERCENT_METRICS else 3
    sign = "+" if signed else ""
    return f"{float(value) * display_scale(metric):{sign}.{decimals}f}"


def significance_mark(p_value: float | None) -> str:
    """'**' for p < 0.01, '*' for p < 0.05, '' otherwise or when unknown."""
    if p_value is None or pd.isna(p_value):
        return ""
    return "**" if p_value < 0.01 else "*" if p_value < 0.05 else ""


# --- which rows and columns ----------------------------------------------------------------------

# The subsets whose score without HNC's training images a table shows beside the whole: 'all', and ARO's parts
# (ARO has no 'all'). The others are in summary.csv.
CLEAN_SHOWN = ("all", "vg_relation", "vg_attribution", "coco_order", "flickr30k_order")


def is_coarse_subset(subset: str) -> bool:
    if subset.endswith(CLEAN_SUFFIX):
        return subset.removesuffix(CLEAN_SUFFIX) in CLEAN_SHOWN
    return not subset.startswith(FINE_SUBSET_PREFIXES)


def _subset_sort_key(subset: str) -> tuple[int, int, str]:
    """The usual order, each subset's score without HNC's training images right after the whole."""
    whole = subset.removesuffix(CLEAN_SUFFIX)
    rank = SUBSET_ORDER.index(whole) if whole in SUBSET_ORDER else len(SUBSET_ORDER)
    return (rank, subset != whole, whole)


def key_columns(summary: pd.DataFrame, benchmark: str) -> list[Column]:
    """The (metric, subset) columns of a benchmark's table that the summary has.

    The first key metric gets 'all' and every coarse subset (HNC type groups, VQA answer types); the
    other key metrics get 'all', and the coarse subsets the first one lacks (ARO: macro accuracy where ARO reports
    it, accuracy for the order sets).
    """
    rows = summary[summary["benchmark"] == benchmark]
    present = set(zip(rows["metric"], rows["subset"]))
    metrics = KEY_METRICS.get(benchmark) or tuple(sorted(rows["metric"].unique()))
    columns: list[Column] = []
    covered: set[str] = set()
    for position, metric in enumerate(metrics):
        subsets = sorted({s for m, s in present if m == metric and is_coarse_subset(s)}, key=_subset_sort_key)
        columns += [(metric, s) for s in subsets if position == 0 or s == "all" or s not in covered]
        covered |= set(subsets)
    return columns


def _ordered_settings(aggregate: pd.DataFrame) -> list[str]:
    """Baseline, then per objective setting (the seed's loss first) the alpha = 0 controls by tau and every other
    setting by (alpha, tau)."""
    settings = aggregate.drop_duplicates("setting")[["setting", "alpha", "tau", *OBJECTIVE_AXES]]
    baseline = [BASELINE] if (settings["setting"] == BASELINE).any() else []
    grid = settings[settings["setting"] != BASELINE].assign(not_control=lambda f: f["alpha"] != 0.0)
    grid = grid.sort_values([*OBJECTIVE_AXES, "not_control", "alpha", "tau"], kind="mergesort")
    return baseline + grid["setting"].tolist()


def comparison_table(summary: pd.DataFrame, benchmark: str, columns: Sequence[Column] | None = None) -> pd.DataFrame:
    """The numeric table of one benchmark: a row per setting, per key column the seed mean, its
    interval, and the deltas/p-values vs baseline and control (column names ``metric|subset|stat``)."""
    columns = list(columns) if columns is not None else key_columns(summary, benchmark)
    aggregate = aggregate_over_seeds(summary[summary["benchmark"] == benchmark])
    if aggregate.empty:
        raise ValueError(f"the summary has no rows for benchmark {benchmark!r}")
    settings = _ordered_settings(aggregate)
    rows = summary[summary["benchmark"] == benchmark]
    seeds = rows.groupby(rows["model"].map(setting_of))["model"].nunique()
    indexed = aggregate.set_index(["setting", "metric", "subset"])
    firsts = aggregate.drop_duplicates("setting").set_index("setting")
    table = pd.DataFrame({
        "setting": settings,
        "alpha": [firsts.at[s, "alpha"] for s in settings],
        "tau": [firsts.at[s, "tau"] for s in settings],
        **{axis: [firsts.at[s, axis] for s in settings] for axis in _swept_axes(aggregate)},
        "n_seeds": [int(seeds[s]) for s in settings],  # the baseline counts as its one model
    })
    stats = ("value", "ci_low", "ci_high", "delta_vs_baseline", "p_vs_baseline", "delta_vs_control", "p_vs_control")
    for metric, subset in columns:
        for stat in stats:
            table[f"{metric}|{subset}|{stat}"] = [
                indexed.at[(s, metric, subset), stat] if (s, metric, subset) in indexed.index else float("nan")
                for s in settings
            ]
    return table


def _swept_axes(aggregate: pd.DataFrame) -> list[str]:
    """The objective axes some setting turns on: the tables of a run without them keep their columns."""
    return [axis for axis in OBJECTIVE_AXES if (aggregate[axis].fillna(0) != 0).any()]


# --- display -----------------------------------------------------------------------------------

OBJECTIVE_LABELS = {"l2_sp_weight": "L2-SP", "distillation_weight": "distillation",
                    "feature_anchor_weight": "feature anchor", "preference_mix": "preference mix"}


def objectives_label(setting: str) -> str:
    """'feature anchor 1, L2-SP 0.1' for the objectives a setting turns on; '' for the seed's loss alone."""
    if setting == BASELINE:
        return ""
    return ", ".join(f"{OBJECTIVE_LABELS[axis]} {value:g}" for axis, value in objectives_of(f"{setting}/seed~0").items())


def setting_label(setting: str, alpha: float, tau: float, *, latex: bool = False) -> str:
    """'baseline', 'control (τ = 0.05)' or 'α = 5, τ = 0.05', followed by '; feature anchor 1' when the setting
    adds objectives; with ``latex`` ready to typeset."""
    if setting == BASELINE:
        return "baseline"
    a, t = (r"$\alpha$", r"$\tau$") if latex else ("α", "τ")
    label = f"control ({t} = {tau:g})" if alpha == 0.0 else f"{a} = {alpha:g}, {t} = {tau:g}"
    objectives = objectives_label(setting)
    return f"{label}; {objectives}" if objectives else label


def column_label(metric: str, subset: str, columns: Sequence[Column]) -> str:
    """The subset when the table has one metric; else the metric, plus the subset when not 'all'."""
    subset_label = subset.split(":", 1)[1] if subset.startswith("answer_type:") else subset
    if len({m for m, _ in columns}) == 1:
        return subset_label
    metric_label = METRIC_LABELS.get(metric, metric)
    return metric_label if subset == "all" else f"{metric_label} {subset_label}"


def _shown_comparisons(table: pd.DataFrame, columns: Sequence[Column]) -> dict[Column, list[str]]:
    """Per column, the comparisons with at least one delta (drift has none vs the baseline)."""
    return {
        (metric, subset): [c for c in COMPARISONS if table[f"{metric}|{subset}|delta_vs_{c}"].notna().any()]
        for metric, subset in columns
    }


def _shown_number(value: float, metric: str, *, latex: bool, signed: bool = False) -> str:
    """``format_value`` for a display cell: LaTeX gets ASCII only (a math minus, '--' for missing)."""
    text = format_value(value, metric, signed=signed)
    if not latex:
        return text
    return "--" if text == MISSING else "$-$" + text[1:] if text.startswith("-") else text


def _value_cell(row: pd.Series, metric: str, subset: str, *, latex: bool) -> str:
    prefix = f"{metric}|{subset}|"
    value = _shown_number(row[prefix + "value"], metric, latex=latex)
    if pd.isna(row[prefix + "value"]) or pd.isna(row[prefix + "ci_low"]) or pd.isna(row[prefix + "ci_high"]):
        return value
    low, high = (_shown_number(row[prefix + bound], metric, latex=latex) for bound in ("ci_low", "ci_high"))
    return f"{value} {{\\scriptsize [{low}, {high}]}}" if latex else f"{value} [{low}, {high}]"


def _delta_cell(row: pd.Series, metric: str, subset: str, comparison: str, *, latex: bool) -> str:
    prefix = f"{metric}|{subset}|"
    delta = row[prefix + f"delta_vs_{comparison}"]
    text = _shown_number(delta, metric, latex=latex, signed=True)
    mark = "" if pd.isna(delta) else significance_mark(row[prefix + f"p_vs_{comparison}"])
    if not mark:
        return text
    return f"{text}$^{{{mark}}}$" if latex else text + mark.replace("*", r"\*")


def _display_rows(table: pd.DataFrame, columns: Sequence[Column], shown: dict[Column, list[str]], *, latex: bool):
    for _, row in table.iterrows():
        label = setting_label(row["setting"], row["alpha"], row["tau"], latex=latex)
        no_seed = "--" if latex else MISSING
        cells = [label, str(row["n_seeds"]) if row["setting"] != BASELINE else no_seed]
        for metric, subset in columns:
            cells.append(_value_cell(row, metric, subset, latex=latex))
            cells += [_delta_cell(row, metric, subset, c, latex=latex) for c in shown[(metric, subset)]]
        yield cells


def _table_notes(columns: Sequence[Column], delta: str = "Δ") -> str:
    units = sorted({"accuracies in %, deltas in percentage points" if m in PERCENT_METRICS else
                    f"{METRIC_LABELS.get(m, m)} as a number" for m, _ in columns})
    return (f"Mean over seeds [interval]; {'; '.join(units)}. {delta}: mean paired difference; "
            "* p < 0.05, ** p < 0.01 (largest p over seeds).")


def to_markdown(table: pd.DataFrame, columns: Sequence[Column], *, title: str, partial_note: str | None = None) -> str:
    shown = _shown_comparisons(table, columns)
    header = ["Model", "Seeds"]
    for metric, subset in columns:
        label = column_label(metric, subset, columns)
        header += [label] + [f"{label} Δ {c}" for c in shown[(metric, subset)]]
    lines = [f"### {title}", ""]
    if partial_note:
        lines += [f"**{partial_note}**", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join([":--", "--:"] + ["--:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in _display_rows(table, columns, shown, latex=False)]
    return "\n".join(lines + ["", _table_notes(columns).replace("*", r"\*"), ""])


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text (one pass, so escapes are not re-escaped)."""
    return re.sub(r"[\\&%$#_{}~^]", lambda match: _LATEX_SPECIALS[match.group()], text)


def to_latex(table: pd.DataFrame, columns: Sequence[Column], *, source: str, partial_note: str | None = None) -> str:
    """A booktabs ``tabular`` ready to ``\\input`` inside the thesis' ``table`` environment."""
    shown = _shown_comparisons(table, columns)
    widths = [1 + len(shown[c]) for c in columns]
    n_columns = 2 + sum(widths)
    groups, rules, subheads, start = [], [], [], 3
    for (metric, subset), width in zip(columns, widths):
        groups.append(rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(column_label(metric, subset, columns))}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
        unit = display_unit(metric)
        subheads.append(latex_escape(f"value ({unit})" if unit else "value"))
        subheads += [rf"$\Delta$ {c}" for c in shown[(metric, subset)]]
        start += width
    lines = [
        f"% {latex_escape(source)}: generated by hnclip.report.tables; do not edit.",
        f"% {latex_escape(_table_notes(columns, delta='Delta'))}",
        rf"\begin{{tabular}}{{@{{}}lr{'r' * sum(widths)}@{{}}}}",
        r"\toprule",
        " & ".join(["", ""] + groups) + r" \\",
        " ".join(rules),
        " & ".join(["Model", "Seeds"] + subheads) + r" \\",
        r"\midrule",
    ]
    for cells in _display_rows(table, columns, shown, latex=True):
        lines.append(" & ".join(cells) + r" \\")
    lines.append(r"\bottomrule")
    if partial_note:
        lines.append(rf"\multicolumn{{{n_columns}}}{{@{{}}l}}{{\textbf{{{latex_escape(partial_note)}}}}} \\")
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


def write_csv(table: pd.DataFrame, path: Path, partial_note: str | None) -> None:
    """Numeric CSV; a partial table starts with a '# PARTIAL: …' line (``pd.read_csv(comment='#')``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            if partial_note:
                handle.write(f"# {partial_note}\n")
            table.to_csv(handle, index=False)


def write_tables(
    summary: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    benchmarks: Sequence[str],
    partial_note: str | None = None,
    columns: Mapping[str, Sequence[Column]] | None = None,
) -> list[Path]:
    """``{out_dir}/{benchmark}.csv|.md|.tex`` per benchmark with rows in the summary (others are skipped
    with a warning: ``check_complete`` decides whether that is an error). ``columns`` overrides ``key_columns`` per
    benchmark."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    for benchmark in benchmarks:
        if not (summary["benchmark"] == benchmark).any():
            log.warning("no rows for benchmark %s: its table is skipped", benchmark)
            continue
        chosen = list((columns or {}).get(benchmark) or key_columns(summary, benchmark))
        table = comparison_table(summary, benchmark, chosen)
        paths = [out_dir / f"{benchmark}.{suffix}" for suffix in ("csv", "md", "tex")]
        write_csv(table, paths[0], partial_note)
        write_text(paths[1], to_markdown(table, chosen, title=benchmark, partial_note=partial_note))
        write_text(paths[2], to_latex(table, chosen, source=benchmark, partial_note=partial_note))
        written += paths
    return written
