"""One plotting style for every thesis figure: Okabe–Ito colours, 8 pt type, column-width sizes.

Figures are built as ``matplotlib.figure.Figure`` objects without pyplot, so no global backend or
figure registry is touched (safe in Snakemake jobs and tests); saving renders with Agg (PNG) and the
PDF backend (vector).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import matplotlib
from cycler import cycler
from matplotlib.figure import Figure

from hnclip.io import atomic_path

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision deficiency.
OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9", "bluish_green": "#009E73",
    "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "reddish_purple": "#CC79A7",
}
# Cycle order: yellow last, it is faint on white.
PALETTE = tuple(OKABE_ITO[name] for name in (
    "blue", "orange", "bluish_green", "vermillion", "reddish_purple", "sky_blue", "black", "yellow",
))
ROLE_COLOURS = {"baseline": "#7F7F7F", "control": OKABE_ITO["sky_blue"], "best": OKABE_ITO["vermillion"]}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")
SEQUENTIAL_CMAP = "cividis"  # perceptually uniform and designed for colour-vision deficiency
PARTIAL_COLOUR = OKABE_ITO["vermillion"]

SINGLE_COLUMN_IN = 3.3
DOUBLE_COLUMN_IN = 6.8
PNG_DPI = 300

STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "figure.titlesize": 8,
    "axes.linewidth": 0.6, "lines.linewidth": 1.0, "lines.markersize": 4,
    "xtick.major.width": 0.6, "ytick.major.width": 0.6, "xtick.major.size": 2.5, "ytick.major.size": 2.5,
    "axes.spines.top": False, "axes.spines.right": False, "axes.prop_cycle": cycler(color=PALETTE),
    "legend.frameon": False, "errorbar.capsize": 2, "image.cmap": SEQUENTIAL_CMAP,
    "pdf.fonttype": 42,  # TrueType in the PDF: text stays text, journals and thesis offices accept it
    "svg.hashsalt": "hnclip",
    # No savefig.bbox = 'tight': constrained layout already fits the margins, and 'tight' draws twice.
}


@contextlib.contextmanager
def thesis_style() -> Iterator[None]:
    """Every figure is created, drawn and saved inside this context."""
    with matplotlib.rc_context(STYLE):
        yield


def new_figure(width_in: float = SINGLE_COLUMN_IN, height_in: float = 2.2) -> Figure:
    return Figure(figsize=(width_in, height_in), layout="constrained")


def mark_partial(figure: Figure, partial_note: str | None) -> None:
    """Say on the figure itself, above everything, that it shows only part of the grid."""
    if partial_note:
        figure.suptitle(partial_note, color=PARTIAL_COLOUR, fontweight="bold")


def save_figure(figure: Figure, out_dir: str | os.PathLike, stem: str) -> list[Path]:
    """``{stem}.pdf`` (vector) and ``{stem}.png`` (300 dpi), atomically; timestamps stripped so a
    rerun on the same summary gives the same bytes."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{stem}.pdf", out_dir / f"{stem}.png"]
    with atomic_path(paths[0]) as tmp:
        figure.savefig(tmp, format="pdf", metadata={"CreationDate": None, "Producer": None})
    with atomic_path(paths[1]) as tmp:
        figure.savefig(tmp, format="png", dpi=PNG_DPI, metadata={"Software": None})
    return paths
