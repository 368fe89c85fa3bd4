"""The fine-tuning grid: cells named ``alpha~{a}/tau~{t}/seed~{s}`` with plain Python floats, preceded by one
directory per objective whose weight is not 0 (``feature_anchor_weight~1.0/alpha~5.0/tau~0.05/seed~0``).

An objective (``OBJECTIVE_AXES``: a regulariser's weight or the preference mix) is swept by the grid like alpha and
tau, or set once for every cell by its ``finetune`` key; either way the path names it, so a cell's path always says
which objectives trained it. At 0 the term is off and the cell is the seed's, with the path it always had: adding an
axis to a grid keeps the cells it already trained and adds only the new ones.

The one place that knows a cell's path: the rules constrain the ``cell`` and ``model`` wildcards with
``CELL_WILDCARD`` and ``MODEL_WILDCARD``; the trainer, evaluation and aggregation go through ``cell_path``,
``parse_cell`` and ``cell_in_path``.
"""

from __future__ import annotations

import itertools
import math
import re

BASELINE = "baseline"
# The objectives a grid may sweep (hnclip.train.objectives), in the order their directories nest.
OBJECTIVE_AXES = ("l2_sp_weight", "distillation_weight", "feature_anchor_weight", "preference_mix")
# The objectives that compare the student with a frozen copy of the baseline (a teacher pass per step).
TEACHER_AXES = ("distillation_weight", "feature_anchor_weight", "preference_mix")
_NUMBER = r"[0-9.e+-]+"
_OBJECTIVE_PREFIX = rf"(?:(?:{'|'.join(OBJECTIVE_AXES)})~{_NUMBER}/)*"
# the cell wildcard (a cell spans three directories, more with objective axes) and the model wildcard
CELL_WILDCARD = rf"{_OBJECTIVE_PREFIX}alpha~{_NUMBER}/tau~{_NUMBER}/seed~[0-9]+"
MODEL_WILDCARD = rf"{BASELINE}|{CELL_WILDCARD}"
_CELL_RE = re.compile(
    rf"^(?P<objectives>{_OBJECTIVE_PREFIX})alpha~(?P<alpha>[^/]+)/tau~(?P<tau>[^/]+)/seed~(?P<seed>\d+)$"
)
_CELL_IN_PATH_RE = re.compile(rf"(?:^|/)({_OBJECTIVE_PREFIX}alpha~[^/]+/tau~[^/]+/seed~[^/]+)/")


def format_value(value: float) -> str:
    """One spelling per value, so a cell's path never changes between runs (0 -> 0.0, 0.05 -> 0.05)."""
    return repr(float(value))


def cell_path(alpha: float, tau: float, seed: int, **objectives: float) -> str:
    """The cell's path; ``objectives`` are objective-axis values (0: off, not named in the path)."""
    unknown = sorted(set(objectives) - set(OBJECTIVE_AXES))
    if unknown:
        raise ValueError(f"not an objective axis: {', '.join(unknown)} (axes: {', '.join(OBJECTIVE_AXES)})")
    infinite = [f"{name} {value}" for name, value in (("alpha", alpha), ("tau", tau), *objectives.items())
                if not math.isfinite(float(value))]
    if infinite:
        raise ValueError(f"a grid value must be a finite number, got {', '.join(infinite)}")
    prefix = "".join(f"{axis}~{format_value(objectives[axis])}/" for axis in OBJECTIVE_AXES
                     if objectives.get(axis, 0) != 0)
    return f"{prefix}alpha~{format_value(alpha)}/tau~{format_value(tau)}/seed~{int(seed)}"


def swept_axes(grid: dict) -> list[str]:
    """The objective axes a grid sweeps: some value not 0 (absent or [0.0] sweeps nothing)."""
    return [axis for axis in OBJECTIVE_AXES if any(grid.get(axis, [0.0]))]


def effective_grid(finetune: dict) -> dict:
    """``finetune.grid`` with each objective it does not sweep set to the ``finetune`` key's value, so that the
    cells' paths name every objective that trains them."""
    grid = dict(finetune["grid"])
    swept = swept_axes(grid)
    for axis in OBJECTIVE_AXES:
        if axis not in swept:
            grid[axis] = [finetune.get(axis, 0.0)]
    return grid


def grid_cells(grid: dict) -> list[str]:
    """Every cell of the grid (keys alpha, tau, seed and any objective axes), alpha-major; adding a value adds only
    the new cells."""
    axes = [axis for axis in OBJECTIVE_AXES if axis in grid]
    cells = []
    for alpha, tau, seed, *values in itertools.product(grid["alpha"], grid["tau"], grid["seed"],
                                                       *(grid[axis] for axis in axes)):
        cells.append(cell_path(alpha, tau, seed, **dict(zip(axes, values))))
    return list(dict.fromkeys(cells))


def parse_cell(cell: str) -> dict:
    """``feature_anchor_weight~1.0/alpha~5.0/tau~0.05/seed~1`` -> {"alpha": 5.0, "tau": 0.05, "seed": 1,
    "feature_anchor_weight": 1.0} (objective axes only when named); baseline -> {}."""
    if cell == BASELINE:
        return {}
    match = _CELL_RE.match(cell)
    if match is None:
        raise ValueError(f"not a grid cell path: {cell!r} (expected [objective~W/]alpha~A/tau~T/seed~S or "
                         f"{BASELINE!r})")
    values = {"alpha": float(match["alpha"]), "tau": float(match["tau"]), "seed": int(match["seed"])}
    for segment in filter(None, match["objectives"].split("/")):
        axis, value = segment.split("~", 1)
        values[axis] = float(value)
    if cell_path(**values) != cell:  # one path per cell: a second spelling would train the same cell twice
        raise ValueError(f"not a grid cell path: {cell!r} (its values are spelled {cell_path(**values)!r})")
    return values


def objectives_of(cell: str) -> dict[str, float]:
    """The objective-axis values a cell names ({} for the seed's loss and the baseline)."""
    return {axis: value for axis, value in parse_cell(cell).items() if axis in OBJECTIVE_AXES}


def control_cell(cell: str) -> str | None:
    """The alpha = 0 cell with the same tau, seed and objectives (None for the baseline)."""
    if cell == BASELINE:
        return None
    values = parse_cell(cell)
    return cell_path(**{**values, "alpha": 0.0})


def unregularised_cell(cell: str) -> str | None:
    """The same alpha, tau and seed trained with the seed's loss alone; None when ``cell`` is that one already."""
    values = parse_cell(cell)
    if cell == BASELINE or not objectives_of(cell):
        return None
    return cell_path(values["alpha"], values["tau"], values["seed"])


def cell_in_path(path: str) -> str | None:
    """The last grid cell named by a file's directories (``…/eval/alpha~5.0/tau~0.05/seed~1/hnc.json`` ->
    ``alpha~5.0/tau~0.05/seed~1``), None when there is none; a malformed cell raises ``ValueError``."""
    matches = _CELL_IN_PATH_RE.findall(path.replace("\\", "/"))
    if not matches:
        return None
    parse_cell(matches[-1])
    return matches[-1]
