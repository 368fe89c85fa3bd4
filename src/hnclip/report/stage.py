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


def write_tables_from_summary(summary_csv, out_dir, *, models, benchmarks, allow_partial: bool) -> None:
    from hnclip.report.tables import write_tables

    summary = read_summary(summary_csv)
    note = _completeness_note(summary, models, benchmarks, allow_partial)
    written = write_tables(summary, out_dir, benchmarks=benchmarks, partial_note=note)
    log.info("wrote %d table files", len(written))


def write_figures_from_summary(
    summary_csv, train_logs: Mapping[str, str], out_dir, *, models, benchmarks, allow_partial: bool
) -> None:
    from hnclip.report.figures import write_figures

    summary = read_summary(summary_csv)
    note = _completeness_note(summary, models, benchmarks, allow_partial)
    logs = {cell: path for cell, path in train_logs.items() if Path(path).exists()}
    written = write_figures(summary, logs, out_dir, partial_note=note)
    log.info("wrote %d figure files", len(written))
