"""One figure style for every taskvec figure: print-ready, colour-blind-safe, PNG + PDF, atomic."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_path  # noqa: E402

# Okabe & Ito (2008) colour-blind-safe palette.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
SINGLE_COLUMN_IN = 3.4
DOUBLE_COLUMN_IN = 7.0

_PAPER = {
    "figure.figsize": (SINGLE_COLUMN_IN, 2.6),
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.2,
    "savefig.bbox": "tight",
    "savefig.dpi": 200,
    "pdf.fonttype": 42,  # embed TrueType: editable text in vector output
    "ps.fonttype": 42,
    "image.cmap": "cividis",
}


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    with plt.rc_context(_PAPER):
        yield


def save_figure(fig, out_dir: str | Path, name: str, formats: Iterable[str] = ("png", "pdf")) -> list[Path]:
    """Write `fig` as out_dir/name.<fmt> for each format, atomically; close it; return the paths."""
    out_dir = Path(out_dir)
    paths = []
    for fmt in formats:
        path = out_dir / f"{name}.{fmt}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt)
        paths.append(path)
    plt.close(fig)
    return paths
