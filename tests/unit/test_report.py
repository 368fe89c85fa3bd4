"""The aggregation library: summary table, completeness, comparison tables and figures, from fake
per-cell result files written in a tmp dir exactly where and how the evaluation stages write them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hnclip.pipeline.grid import BASELINE, cell_path, grid_cells
from hnclip.provenance import sha256_file
from hnclip.report import figures, style
from hnclip.report.figures import (
    HEATMAPS, TrainLogError, best_setting, heatmap_figure, read_train_log, tradeoff_figure, write_figures,
)
from hnclip.report.summary import (
    SUMMARY_COLUMNS, DuplicateResultError, MisattributedResultError, MissingResultError, ResultFileError,
    aggregate_over_seeds, build_summary, check_complete, model_from_result_path, partial_note, read_summary,
    summary_provenance_path,
)
from hnclip.report.tables import comparison_table, format_value, latex_escape, significance_mark, write_tables

ALPHAS, TAUS, SEEDS = (0.0, 5.0), (0.05, 0.1), (0, 1)
CELLS = grid_cells({"alpha": ALPHAS, "tau": TAUS, "seed": SEEDS})
MODELS = [BASELINE, *CELLS]
HNC_SUBSETS = ("all", "attribute", "relation", "counting", "logic", "type:relation_subj")
BENCHMARKS = ("hnc_test", "zeroshot", "drift", "vqav2", "textvqa")


# --- fake result files -------------------------------------------------------------------------

def fake_value(model: str, benchmark: str, subset: str, metric: str) -> float:
    """A deterministic, distinct number per row: alpha helps relations, tau costs recognition."""
    if model == BASELINE:
        alpha, tau, seed = 0.0, 0.0, 0
    else:
        parts = dict(part.split("~") for part in model.split("/"))
        alpha, tau, seed = float(parts["alpha"]), float(parts["tau"]), int(parts["seed"])
    base = {"pairwise_accuracy": 0.55, "top1": 0.80, "accuracy": 0.60, "exact_match": 0.40,
            "cka": 0.90, "mean_cosine": 0.85}[metric]
    offset = 0.013 * len(subset) % 0.05 + (0.02 * alpha * (subset == "relation") if model != BASELINE else 0)
    return round(base + offset - tau * 0.3 + 0.007 * seed + (0.003 * alpha if model != BASELINE else 0), 6)


def fake_row(model: str, benchmark: str, subset: str, metric: str) -> dict:
    value = fake_value(model, benchmark, subset, metric)
    row = {"model": model, "benchmark": benchmark, "subset": subset, "metric": metric, "value": value,
           "ci_low": None if metric == "cka" else round(value - 0.02, 6),
           "ci_high": None if metric == "cka" else round(value + 0.03, 6), "n": 400}
    if model != BASELINE and benchmark != "drift":
        row["delta_vs_baseline"] = round(value - fake_value(BASELINE, benchmark, subset, metric), 6)
        row["p_vs_baseline"] = 0.001 if "seed~0" in model else 0.03
        row["test"] = "mcnemar_exact"
        if "alpha~0.0/" not in model:
            row["delta_vs_control"] = 0.1
            row["p_vs_control"] = 0.2 if subset == "counting" else 0.004
    return row


def result_path(root: Path, model: str, benchmark: str) -> Path:
    if benchmark in ("vqav2", "textvqa"):
        return root / "results" / "vqa" / model / benchmark / "scores.json"
    return root / "results" / "eval" / model / f"{benchmark}.json"


BENCHMARK_ROWS = {
    "hnc_test": [("pairwise_accuracy", s) for s in HNC_SUBSETS],
    "zeroshot": [("top1", "all"), ("top1", "class:None")],  # a class called None stays a string
    "drift": [("cka", "all"), ("mean_cosine", "all")],
    "vqav2": [("accuracy", s) for s in ("all", "yes/no", "number", "other")],
    "textvqa": [("accuracy", "all"), ("exact_match", "all")],
}


def write_result(root: Path, model: str, benchmark: str, rows: list[dict] | None = None) -> Path:
    path = result_path(root, model, benchmark)
    path.parent.mkdir(parents=True, exist_ok=True)
    if rows is None:
        rows = [fake_row(model, benchmark, subset, metric) for metric, subset in BENCHMARK_ROWS[benchmark]]
    content = {"provenance": {"config_hash": "abc123", "seed": 0}, "model": model, "benchmark": benchmark,
               "rows": rows}
    path.write_text(json.dumps(content))
    return path


def write_train_log(path: Path, seed: int, steps: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    step = np.arange(1, steps + 1)
    i2t, t2i = 3.0 / np.sqrt(step) + 0.01 * seed, 2.5 / np.sqrt(step)
    frame = pd.DataFrame({
        "step": step, "epoch": step // 20, "loss": i2t + t2i, "image_to_text": i2t, "text_to_image": t2i,
        "lr": 5e-4, "samples_per_s": 900.0, "hard_negative_accuracy": 0.6,
        "val_pairwise_accuracy": [0.5 + 0.002 * s if s % 10 == 0 else None for s in step],
    })
    frame.to_csv(path, index=False)
    return path


@pytest.fixture()
def results(tmp_path: Path) -> list[Path]:
    return [write_result(tmp_path, model, benchmark) for model in MODELS for benchmark in BENCHMARKS]


@pytest.fixture()
def summary(tmp_path: Path, results: list[Path]) -> pd.DataFrame:
    return build_summary(results, tmp_path / "results" / "tables" / "summary.csv")


# --- summary -----------------------------------------------------------------------------------

def test_model_is_read_from_the_path():
    assert model_from_result_path("results/eval/alpha~5.0/tau~0.05/seed~1/hnc_test.json") == "alpha~5.0/tau~0.05/seed~1"
    vqa = "results/vqa/alpha~0.0/tau~0.1/seed~0/vqav2/scores.json"
    assert model_from_result_path(vqa) == "alpha~0.0/tau~0.1/seed~0"
    assert model_from_result_path("/x/results/vqa/baseline/textvqa/scores.json") == BASELINE
    with pytest.raises(ResultFileError, match="results/eval/other/hnc.json"):
        model_from_result_path("results/eval/other/hnc.json")


def test_summary_has_design_columns_and_the_files_values(tmp_path, results, summary):
    assert tuple(summary.columns) == SUMMARY_COLUMNS
    assert len(summary) == len(MODELS) * sum(len(rows) for rows in BENCHMARK_ROWS.values())
    row = summary[(summary["model"] == "alpha~5.0/tau~0.1/seed~1") & (summary["benchmark"] == "hnc_test")
                  & (summary["subset"] == "relation")].iloc[0]
    expected = fake_row("alpha~5.0/tau~0.1/seed~1", "hnc_test", "relation", "pairwise_accuracy")
    assert (row["alpha"], row["tau"], row["seed"]) == (5.0, 0.1, 1)
    for column in ("value", "ci_low", "ci_high", "n", "delta_vs_baseline", "p_vs_baseline",
                   "delta_vs_control", "p_vs_control"):
        assert row[column] == expected[column], column
    baseline = summary[summary["model"] == BASELINE]
    assert baseline[["alpha", "tau", "seed", "delta_vs_baseline"]].isna().all().all()
    assert summary.loc[summary["metric"] == "cka", "ci_low"].isna().all()
    assert "class:None" in set(summary["subset"])


def test_summary_is_sorted_baseline_first_then_alpha_tau_seed(summary):
    models = list(dict.fromkeys(summary["model"]))
    assert models == [BASELINE] + sorted(CELLS, key=lambda c: tuple(float(p.split("~")[1]) for p in c.split("/")))
    first = summary[summary["model"] == BASELINE]
    assert list(dict.fromkeys(first["benchmark"])) == list(BENCHMARKS)
    hnc = first[first["benchmark"] == "hnc_test"]["subset"].tolist()
    assert hnc == ["all", "attribute", "relation", "counting", "logic", "type:relation_subj"]


def test_summary_csv_round_trips_and_is_independent_of_input_order(tmp_path, results, summary):
    out = tmp_path / "results" / "tables" / "summary.csv"
    pd.testing.assert_frame_equal(read_summary(out), summary)
    again = build_summary(list(reversed(results)), tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_text() == out.read_text()
    assert out.read_text().splitlines()[0] == ",".join(SUMMARY_COLUMNS)
    assert ",baseline," not in out.read_text() and out.read_text().splitlines()[1].startswith("baseline,,,,")
    pd.testing.assert_frame_equal(again, summary)


def test_summary_provenance_lists_every_input_with_its_checksum(tmp_path, results, summary):
    sidecar = summary_provenance_path(tmp_path / "results" / "tables" / "summary.csv")
    assert sidecar.name == "summary.provenance.json"
    record = json.loads(sidecar.read_text())
    assert record["inputs"] == {str(path): sha256_file(path) for path in sorted(results, key=str)}
    assert record["rows"] == len(summary)
    assert list(record["input_config_hashes"]) == ["abc123"]


def test_duplicate_row_within_a_file_names_the_file(tmp_path):
    rows = [fake_row(BASELINE, "zeroshot", "all", "top1")] * 2
    path = write_result(tmp_path, BASELINE, "zeroshot", rows)
    with pytest.raises(DuplicateResultError, match=re.escape(str(path)) + r".*twice in the same file"):
        build_summary([path], tmp_path / "summary.csv")
    assert not (tmp_path / "summary.csv").exists()


def test_duplicate_rows_across_files_name_both(tmp_path):
    first = write_result(tmp_path, BASELINE, "zeroshot")
    second = tmp_path / "results" / "eval" / BASELINE / "zeroshot_again.json"
    shutil.copy(first, second)
    with pytest.raises(DuplicateResultError, match=f"{re.escape(str(first))} and {re.escape(str(second))}"):
        build_summary([first, second], tmp_path / "summary.csv")


def test_rows_of_another_model_are_rejected(tmp_path):
    cell = cell_path(5.0, 0.05, 0)
    rows = [fake_row(cell_path(5.0, 0.05, 1), "hnc_test", "all", "pairwise_accuracy")]
    path = write_result(tmp_path, cell, "hnc_test", rows)
    with pytest.raises(MisattributedResultError, match=re.escape(str(path)) + ".*seed~1.*seed~0"):
        build_summary([path], tmp_path / "summary.csv")


def test_file_level_model_must_match_the_path(tmp_path):
    path = write_result(tmp_path, BASELINE, "drift")
    content = json.loads(path.read_text())
    content["model"] = cell_path(0.0, 0.05, 0)
    path.write_text(json.dumps(content))
    with pytest.raises(MisattributedResultError, match=re.escape(str(path))):
        build_summary([path], tmp_path / "summary.csv")


@pytest.mark.parametrize("field, bad, message", [
    ("value", "0.5", "value must be a finite number"),
    ("value", float("nan"), "value must be a finite number"),
    ("n", None, "lacks n"),
    ("ci_low", "low", "ci_low must be a number or null"),
])
def test_malformed_rows_name_file_and_row(tmp_path, field, bad, message):
    rows = [fake_row(BASELINE, "zeroshot", "all", "top1"), fake_row(BASELINE, "zeroshot", "class:cat", "top1")]
    rows[1][field] = bad
    path = write_result(tmp_path, BASELINE, "zeroshot", rows)
    with pytest.raises(ResultFileError, match=re.escape(f"{path}: rows[1]") + ".*" + message):
        build_summary([path], tmp_path / "summary.csv")


# --- completeness ----------------------------------------------------------------------------------

def test_missing_cell_is_named_and_allow_partial_marks_partial(tmp_path, results):
    absent = cell_path(5.0, 0.1, 1)
    kept = [p for p in results if not (absent in str(p) and p.name in ("zeroshot.json", "hnc_test.json"))]
    summary = build_summary(kept, tmp_path / "summary.csv")
    with pytest.raises(MissingResultError, match=re.escape(f"{absent} (hnc_test, zeroshot)")):
        check_complete(summary, MODELS, BENCHMARKS)
    missing = check_complete(summary, MODELS, BENCHMARKS, allow_partial=True)
    assert missing == [(absent, "hnc_test"), (absent, "zeroshot")]
    note = partial_note(missing, MODELS)
    assert note == "PARTIAL: 8 of 9 cells"
    assert check_complete(summary, MODELS, ("drift",)) == [] and partial_note([], MODELS) is None

    paths = write_tables(summary, tmp_path / "tables", benchmarks=["hnc_test"], partial_note=note)
    for path in paths:
        assert note in path.read_text(), path
    assert paths[0].read_text().startswith(f"# {note}\n")
    table = pd.read_csv(paths[0], comment="#")
    assert table.loc[table["setting"] == "alpha~5.0/tau~0.1", "n_seeds"].item() == 1
    figure = heatmap_figure(aggregate_over_seeds(summary), HEATMAPS[0], note)
    assert figure.get_suptitle() == note


# --- aggregation and tables ------------------------------------------------------------------------

def test_format_value_is_the_one_number_format():
    assert format_value(0.72349, "pairwise_accuracy") == "72.3"
    assert format_value(0.051, "top1", signed=True) == "+5.1"
    assert format_value(-0.0123, "accuracy", signed=True) == "-1.2"
    assert format_value(0.98765, "cka") == "0.988"
    assert format_value(0.0123, "mean_cosine", signed=True) == "+0.012"
    assert format_value(float("nan"), "top1") == format_value(None, "cka") == "–"
    assert [significance_mark(p) for p in (0.001, 0.01, 0.049, 0.05, float("nan"))] == ["**", "*", "*", "", ""]


def test_aggregate_of_one_seed_keeps_its_interval(tmp_path):
    cell = cell_path(5.0, 0.05, 3)
    summary = build_summary([write_result(tmp_path, cell, "drift")], tmp_path / "summary.csv")
    aggregate = aggregate_over_seeds(summary).set_index("metric")
    expected = fake_row(cell, "drift", "all", "mean_cosine")
    assert aggregate.loc["mean_cosine", ["value", "ci_low", "ci_high"]].tolist() == [
        expected["value"], expected["ci_low"], expected["ci_high"]]
    assert np.isnan(aggregate.loc["cka", "ci_low"])  # one seed without a CI has none


def test_hnc_table_numbers_match_a_naive_aggregate_of_the_files(summary):
    table = comparison_table(summary, "hnc_test")
    assert table["setting"].tolist() == [BASELINE, "alpha~0.0/tau~0.05", "alpha~0.0/tau~0.1",
                                         "alpha~5.0/tau~0.05", "alpha~5.0/tau~0.1"]
    assert [c.split("|")[1] for c in table.columns if c.endswith("|value")] == [
        "all", "attribute", "relation", "counting", "logic"]  # per-type subsets are left to the CSV summary
    row = table.set_index("setting").loc["alpha~5.0/tau~0.1"]
    seeds = [fake_row(cell_path(5.0, 0.1, s), "hnc_test", "relation", "pairwise_accuracy") for s in SEEDS]
    prefix = "pairwise_accuracy|relation|"
    assert row["n_seeds"] == 2
    assert row[prefix + "value"] == pytest.approx(np.mean([r["value"] for r in seeds]), abs=1e-12)
    assert row[prefix + "ci_low"] == min(r["ci_low"] for r in seeds)
    assert row[prefix + "ci_high"] == max(r["ci_high"] for r in seeds)
    assert row[prefix + "delta_vs_baseline"] == pytest.approx(np.mean([r["delta_vs_baseline"] for r in seeds]))
    assert row[prefix + "p_vs_baseline"] == 0.03  # the larger of 0.001 and 0.03
    assert row[prefix + "p_vs_control"] == 0.004
    base = table.set_index("setting").loc[BASELINE]
    assert base[prefix + "value"] == fake_value(BASELINE, "hnc_test", "relation", "pairwise_accuracy")
    assert np.isnan(base[prefix + "delta_vs_baseline"])


def test_markdown_shows_formatted_numbers_and_marks(tmp_path, summary):
    paths = write_tables(summary, tmp_path / "tables", benchmarks=list(BENCHMARKS) + ["absent"])
    assert sorted(p.name for p in paths) == sorted(f"{b}.{s}" for b in BENCHMARKS for s in ("csv", "md", "tex"))
    markdown = (tmp_path / "tables" / "hnc_test.md").read_text()
    seeds = [fake_row(cell_path(5.0, 0.1, s), "hnc_test", "relation", "pairwise_accuracy") for s in SEEDS]
    mean = np.mean([r["value"] for r in seeds])
    cell = (f"{format_value(mean, 'top1')} [{format_value(seeds[0]['ci_low'], 'top1')}, "
            f"{format_value(seeds[1]['ci_high'], 'top1')}]")
    line = next(l for l in markdown.splitlines() if l.startswith("| α = 5, τ = 0.1 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    header = [c.strip() for c in markdown.splitlines()[2].strip("|").split("|")]
    assert cells[header.index("relation")] == cell
    delta = np.mean([r["delta_vs_baseline"] for r in seeds])
    assert cells[header.index("relation Δ baseline")] == format_value(delta, "top1", signed=True) + r"\*"
    assert cells[header.index("relation Δ control")] == r"+10.0\*\*"
    assert cells[header.index("counting Δ control")] == "+10.0"  # p = 0.2: no mark
    drift = (tmp_path / "tables" / "drift.md").read_text()
    assert "Δ baseline" not in drift and "| CKA |" in drift  # drift has no deltas: columns dropped


def _latex_body(tex: str) -> list[str]:
    return [line for line in tex.splitlines() if not line.startswith("%")]


def _braces_balanced(text: str) -> bool:
    depth = 0
    for character in re.sub(r"\\[{}%_&#$]", "", text):
        depth += {"{": 1, "}": -1}.get(character, 0)
        if depth < 0:
            return False
    return depth == 0


def test_latex_tables_are_booktabs_balanced_and_escaped(tmp_path, summary):
    columns = {"hnc_test": [("pairwise_accuracy", "all"), ("pairwise_accuracy", "type:relation_subj")]}
    write_tables(summary, tmp_path, benchmarks=BENCHMARKS, columns=columns, partial_note="PARTIAL: 100% ~ 1_2")
    for benchmark in BENCHMARKS:
        tex = (tmp_path / f"{benchmark}.tex").read_text()
        body = "\n".join(_latex_body(tex))
        assert tex.isascii(), benchmark
        assert _braces_balanced(tex), benchmark
        assert body.count(r"\begin{tabular}") == body.count(r"\end{tabular}") == 1
        markers = (r"\begin{tabular}", r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}")
        rules = [body.index(marker) for marker in markers]
        assert rules == sorted(rules), benchmark
        assert not re.search(r"(?<!\\)[%_~#]", body), benchmark
        n_columns = len(re.search(r"\\begin\{tabular\}\{@\{\}(\w+)@\{\}\}", body).group(1))
        rows = [line for line in body.splitlines() if line.endswith(r"\\") and "multicolumn" not in line]
        assert rows and all(line.count("&") == n_columns - 1 for line in rows), benchmark
        assert r"\textbf{PARTIAL: 100\% \textasciitilde{} 1\_2}" in body
    hnc = (tmp_path / "hnc_test.tex").read_text()
    assert r"type:relation\_subj" in hnc
    assert r"$\alpha$ = 5, $\tau$ = 0.05" in hnc and r"control ($\tau$ = 0.1)" in hnc
    assert "$^{**}$" in hnc
    assert latex_escape(r"a_b~c%d&e#f$g{h}i\j^k") == (
        r"a\_b\textasciitilde{}c\%d\&e\#f\$g\{h\}i\textbackslash{}j\textasciicircum{}k")


# --- figures ---------------------------------------------------------------------------------------

@pytest.fixture()
def train_logs(tmp_path: Path) -> dict[str, Path]:
    logs = {model: write_train_log(tmp_path / "results" / "finetune" / model / "train_log.csv", seed)
            for model in CELLS if "alpha~5.0/tau~0.05" in model for seed in [int(model[-1])]}  # 2 rows: fast
    logs[BASELINE] = write_train_log(tmp_path / "results" / "baseline" / "train_log.csv", 0)
    return logs


def test_every_figure_is_written_as_pdf_and_png(tmp_path, summary, train_logs, monkeypatch):
    monkeypatch.setattr(style, "PNG_DPI", 100)  # the thesis' 300 dpi only costs test time
    paths = write_figures(summary, train_logs, tmp_path / "figures")
    stems = [spec.stem for spec in HEATMAPS] + ["type_groups", "tradeoff", "training_curves"]
    assert sorted(p.name for p in paths) == sorted(f"{s}.{x}" for s in stems for x in ("pdf", "png"))
    for path in paths:
        content = path.read_bytes()
        assert len(content) > 1000, path
        assert content.startswith(b"%PDF" if path.suffix == ".pdf" else b"\x89PNG\r\n\x1a\n"), path
    assert not list((tmp_path / "figures").glob(".*"))  # no temporary files left behind


def test_figures_of_absent_metrics_are_skipped(tmp_path, results, monkeypatch):
    kept = [p for p in results if "vqa" not in p.parts and p.name != "drift.json"]
    summary = build_summary(kept, tmp_path / "summary.csv")
    # Which figures are drawn is the question here, not rendering: record the stems instead of saving.
    monkeypatch.setattr(figures, "save_figure",
                        lambda figure, out_dir, stem: [Path(f"{stem}.pdf"), Path(f"{stem}.png")])
    names = {p.name for p in write_figures(summary, {}, tmp_path / "figures")}
    assert {"heatmap_hnc_all.pdf", "heatmap_zeroshot_top1.png", "tradeoff.pdf", "type_groups.png"} <= names
    assert not any("vqav2" in n or "textvqa" in n or "drift" in n or "training" in n for n in names)
    assert len(tradeoff_figure(summary).axes) == 1  # no VQA v2: one panel


def test_best_cell_is_the_highest_hnc_all_mean_among_alpha_above_zero(summary):
    aggregate = aggregate_over_seeds(summary)
    rows = aggregate[(aggregate["benchmark"] == "hnc_test") & (aggregate["subset"] == "all")
                     & (aggregate["alpha"] > 0)]
    assert best_setting(aggregate) == rows.sort_values("value")["setting"].iloc[-1] == "alpha~5.0/tau~0.05"


def test_training_log_without_a_column_names_the_file(tmp_path):
    path = tmp_path / "train_log.csv"
    pd.DataFrame({"step": [1], "loss": [1.0]}).to_csv(path, index=False)
    with pytest.raises(TrainLogError, match=re.escape(str(path)) + ".*image_to_text, text_to_image"):
        read_train_log(path)


# --- cells that add an objective to the seed's loss ------------------------------------------------------------------

def _anchored(cell: str) -> str:
    return f"feature_anchor_weight~2.0/{cell}"


def _shift(benchmark: str, seed: int) -> float:
    """What the fake anchor does: costs relations, keeps features nearer the baseline, seed-dependent."""
    return {"hnc_test": -0.01, "zeroshot": 0.004, "drift": 0.05, "vqav2": 0.002, "textvqa": 0.0}[benchmark] * (1 + seed)


@pytest.fixture()
def objective_summary(tmp_path: Path, results: list[Path]) -> pd.DataFrame:
    anchored = []
    for cell in CELLS:
        seed = int(cell[-1])
        for benchmark in BENCHMARKS:
            rows = [{**fake_row(cell, benchmark, subset, metric), "model": _anchored(cell)}
                    for metric, subset in BENCHMARK_ROWS[benchmark]]
            for row in rows:
                row["value"] = round(row["value"] + _shift(benchmark, seed), 6)
            anchored.append(write_result(tmp_path, _anchored(cell), benchmark, rows))
    return build_summary(results + anchored, tmp_path / "results" / "tables" / "summary.csv")


def test_the_summary_names_each_models_objective_weights(objective_summary):
    anchor = objective_summary.set_index("model")["feature_anchor_weight"]
    assert (anchor[_anchored(CELLS[0])] == 2.0).all() and (anchor[CELLS[0]] == 0.0).all()
    assert anchor[BASELINE].isna().all() and (objective_summary["l2_sp_weight"].fillna(0) == 0).all()
    order = list(dict.fromkeys(objective_summary["model"]))
    assert order[0] == BASELINE and set(order[1 : 1 + len(CELLS)]) == set(CELLS)  # the seed's loss first


def test_objective_effects_are_the_paired_changes_against_the_twin_cells(objective_summary):
    from hnclip.report.objectives import objective_effects

    effects = objective_effects(objective_summary).set_index(["setting", "measure"])
    for alpha in ALPHAS:
        for tau in TAUS:
            setting = f"feature_anchor_weight~2.0/alpha~{alpha}/tau~{tau}"
            for measure, benchmark, metric, subset in (("HNC relation", "hnc_test", "pairwise_accuracy", "relation"),
                                                       ("drift CKA", "drift", "cka", "all"),
                                                       ("VQA v2", "vqav2", "accuracy", "all")):
                naive = []
                for seed in SEEDS:
                    twin = f"alpha~{alpha}/tau~{tau}/seed~{seed}"
                    anchored = round(fake_value(twin, benchmark, subset, metric) + _shift(benchmark, seed), 6)
                    naive.append(anchored - fake_value(twin, benchmark, subset, metric))
                row = effects.loc[(setting, measure)]
                assert row["change"] == pytest.approx(np.mean(naive), abs=1e-9)
                assert (row["change_min"], row["change_max"]) == pytest.approx((min(naive), max(naive)), abs=1e-9)
                assert row["n_seeds"] == len(SEEDS) and row["reference_setting"] == f"alpha~{alpha}/tau~{tau}"
                assert row["objectives"] == "feature anchor 2"


def test_objective_tables_and_figure_are_written_and_the_grid_figures_keep_the_seeds_loss(
        tmp_path, summary, objective_summary, train_logs, monkeypatch):
    from hnclip.report.objectives import objective_effects, write_objective_tables

    csv_path, md_path = write_objective_tables(objective_effects(objective_summary), tmp_path / "tables")
    assert len(pd.read_csv(csv_path)) == len(ALPHAS) * len(TAUS) * 7  # every measure of every anchored setting
    markdown = md_path.read_text()
    assert "| feature anchor 2; α = 5, τ = 0.05 | seed's loss alone | 2 | -1.5 [-2.0, -1.0] |" in markdown
    table = comparison_table(objective_summary, "hnc_test")
    assert table["setting"].tolist()[-1].startswith("feature_anchor_weight~2.0/")
    assert table["feature_anchor_weight"].tolist()[1:3] == [0.0, 0.0]
    monkeypatch.setattr(figures, "save_figure", lambda figure, out_dir, stem: [figure])
    drawn = dict(zip([*(spec.stem for spec in HEATMAPS), "type_groups", "tradeoff", "objectives", "training_curves"],
                     write_figures(objective_summary, train_logs, tmp_path / "figures")))
    assert len(drawn["objectives"].axes) == 7
    plain = dict(zip([*(spec.stem for spec in HEATMAPS), "type_groups", "tradeoff", "training_curves"],
                     write_figures(summary, train_logs, tmp_path / "plain")))
    for stem in ("heatmap_hnc_relation", "tradeoff"):  # the anchored cells are not mixed into the alpha x tau views
        assert [a.get_title() for a in drawn[stem].axes] == [a.get_title() for a in plain[stem].axes]
        assert [t.get_text() for a in drawn[stem].axes for t in a.texts] == [
            t.get_text() for a in plain[stem].axes for t in a.texts]


def test_the_objectives_table_orders_settings_by_their_weights_and_says_when_it_has_no_pair(tmp_path, summary,
                                                                                            objective_summary):
    from hnclip.report.objectives import NO_PAIRS, objective_effects, objectives_figure, write_objective_tables

    effects = objective_effects(objective_summary)
    assert effects["feature_anchor_weight"].unique().tolist() == [2.0]
    assert list(dict.fromkeys(effects["setting"])) == [
        f"feature_anchor_weight~2.0/alpha~{a}/tau~{t}" for a in ALPHAS for t in TAUS]  # numeric, then alpha, tau
    csv_path, md_path = write_objective_tables(objective_effects(summary), tmp_path / "none")  # no regularised cell at all
    assert pd.read_csv(csv_path).empty and NO_PAIRS in md_path.read_text()
    assert objectives_figure(summary) is None
    assert objectives_figure(summary, required=True).texts[0].get_text() == NO_PAIRS
