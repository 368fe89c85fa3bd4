"""The aggregation stage, one function per rule: summary, tables, figures (from result files only)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from hnclip.report.summary import build_summary, check_complete, partial_note, read_summary

log = logging.getLogger(__name__)


def _completeness_note(summary, models: Sequence[str], benchmarks: Sequence[str], allow_partial: bool) -> str | None:
    missing = check_complete(summary, models, benchmarks, allow_partial=allow_partial)
    note = partial_note(missing, models)
    if note:
        log.warning("%s; missing: %s", note, missing)
    return note


def write_summary(result_files: Sequence, out_csv, *, models, benchmarks, allow_partial: bool) -> None:
    summary = build_summary(result_files, out_csv)
    _completeness_note(summary, models, benchmarks, allow_partial)
    log.info("summary: %d rows from %d result files", len(summary), len(result_files))


def write_tables_from_summary(summary_csv, out_dir, *, models, benchmarks, allow_partial: bool,
                              objectives: bool = False) -> None:
    """The per-benchmark tables, and the objectives table when the run declares it (``objectives``) or the summary
    pairs a regularised cell with its twin."""
    from hnclip.report.objectives import objective_effects, write_objective_tables
    from hnclip.report.tables import write_tables

    summary = read_summary(summary_csv)
    note = _completeness_note(summary, models, benchmarks, allow_partial)
    written = write_tables(summary, out_dir, benchmarks=benchmarks, partial_note=note)
    effects = objective_effects(summary)
    if objectives or not effects.empty:
        written += write_objective_tables(effects, out_dir, note)
    log.info("wrote %d table files", len(written))


def write_figures_from_summary(
    summary_csv, train_logs: Mapping[str, str], out_dir, *, models, benchmarks, allow_partial: bool,
    objectives: bool = False,
) -> None:
    from hnclip.report.figures import write_figures

    summary = read_summary(summary_csv)
    note = _completeness_note(summary, models, benchmarks, allow_partial)
    logs = {cell: path for cell, path in train_logs.items() if Path(path).exists()}
    written = write_figures(summary, logs, out_dir, partial_note=note, objectives=objectives)
    log.info("wrote %d figure files", len(written))


def write_leakage_table(leakage_files: Sequence, out_csv, out_md) -> None:
    """The overlap of every benchmark with HNC's training images, as CSV and Markdown."""
    import json

    from hnclip.data.leakage import leakage_table
    from hnclip.io import write_text

    table = leakage_table(json.loads(Path(path).read_text()) for path in leakage_files)
    write_text(out_csv, table.to_csv(index=False))
    lines = ["# Benchmark images HNC trained on", "",
             "Items whose image is an HNC training image (by VG id, or COCO / Flickr30k id through Visual Genome's "
             "image_data.json). Every benchmark is also scored without them (subsets `…@no_hnc_overlap`).", "",
             "| benchmark | part | items | overlapping | share |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r.benchmark} | {r.part} | {r.items} | {r.overlapping_items} | {100 * r.overlap_share:.1f} % |"
              for r in table.itertuples(index=False)]
    notes = sorted({n for n in table["note"] if n})
    write_text(out_md, "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n")
    log.info("leakage table: %d parts", len(table))
