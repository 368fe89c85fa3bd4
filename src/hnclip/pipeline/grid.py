"""The fine-tuning grid: cells named ``alpha~{a}/tau~{t}/seed~{s}`` with plain Python floats.

The one place that knows a cell's path: the rules build their paths from ``CELL_WILDCARDS`` and constrain the
``model`` wildcard with ``MODEL_WILDCARD``; the trainer, evaluation and aggregation go through ``cell_path``,
``parse_cell`` and ``cell_in_path``.
"""

from __future__ import annotations

import itertools
import re

BASELINE = "baseline"
CELL_WILDCARDS = "alpha~{alpha}/tau~{tau}/seed~{seed}"
_NUMBER = r"[0-9.e+-]+"
# the model wildcard: the baseline or a cell (a cell spans three directories)
MODEL_WILDCARD = rf"{BASELINE}|alpha~{_NUMBER}/tau~{_NUMBER}/seed~[0-9]+"
_CELL_RE = re.compile(r"^alpha~(?P<alpha>[^/]+)/tau~(?P<tau>[^/]+)/seed~(?P<seed>\d+)$")
_CELL_IN_PATH_RE = re.compile(r"(?:^|/)(alpha~[^/]+/tau~[^/]+/seed~[^/]+)/")


def format_value(value: float) -> str:
    """One spelling per value, so a cell's path never changes between runs (0 -> 0.0, 0.05 -> 0.05)."""
    return repr(float(value))


def cell_path(alpha: float, tau: float, seed: int) -> str:
    return CELL_WILDCARDS.format(alpha=format_value(alpha), tau=format_value(tau), seed=int(seed))


def grid_cells(alphas, taus, seeds) -> list[str]:
    """Every cell of the grid, alpha-major (adding a value adds only the new cells)."""
    return [cell_path(a, t, s) for a, t, s in itertools.product(alphas, taus, seeds)]


def parse_cell(cell: str) -> dict:
    """``alpha~5.0/tau~0.05/seed~1`` -> {"alpha": 5.0, "tau": 0.05, "seed": 1}; baseline -> {}."""
    if cell == BASELINE:
        return {}
    match = _CELL_RE.match(cell)
    if match is None:
        raise ValueError(f"not a grid cell path: {cell!r} (expected alpha~A/tau~T/seed~S or {BASELINE!r})")
    return {"alpha": float(match["alpha"]), "tau": float(match["tau"]), "seed": int(match["seed"])}


def control_cell(cell: str) -> str | None:
    """The alpha = 0 cell with the same tau and seed (None for the baseline)."""
    if cell == BASELINE:
        return None
    values = parse_cell(cell)
    return cell_path(0.0, values["tau"], values["seed"])


def cell_in_path(path: str) -> str | None:
    """The last grid cell named by a file's directories (``…/eval/alpha~5.0/tau~0.05/seed~1/hnc.json`` ->
    ``alpha~5.0/tau~0.05/seed~1``), None when there is none; a malformed cell raises ``ValueError``."""
    matches = _CELL_IN_PATH_RE.findall(path.replace("\\", "/"))
    if not matches:
        return None
    parse_cell(matches[-1])
    return matches[-1]
