"""The house style every figure is drawn under, and what the figure families share: colours, display names,
saving, empty-panel and axis helpers, the annotated heatmap.

Determinism: figures are drawn on bare `matplotlib.figure.Figure` objects (no pyplot state, no backend
dependence), under the house style applied *after a reset to matplotlib's defaults* (so neither a user's
matplotlibrc nor Jupyter's inline backend changes a pixel), with one bundled font and fixed file metadata (no
timestamps or version strings). The same inputs give byte-identical PNG and PDF files in a notebook kernel
and on the command line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path

import matplotlib as mpl
import matplotlib.style
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from analysis.data import Results, model_size

STYLE = Path(__file__).parents[1] / "style.mplstyle"
FORMATS = ("png", "pdf")
# The formats `save` writes; `output_formats` narrows it (e.g. PNG only for the figures committed to the repo).
_ACTIVE_FORMATS: ContextVar[tuple[str, ...]] = ContextVar("formats", default=FORMATS)
# Fixed metadata: matplotlib otherwise stamps its version (PNG, PDF) and the creation time (PDF).
METADATA = {
    "png": {"Software": "dssd-pipeline analysis"},
    "pdf": {"Creator": "dssd-pipeline analysis", "Producer": None, "CreationDate": None},
}
# Settings that must hold whatever the style file says (a style file silently ignores some keys).
FIXED_RC = {
    "svg.hashsalt": "dssd-analysis",
    "pdf.fonttype": 42,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "savefig.transparent": False,
}

# Okabe–Ito, in the order of the style file's cycle; named so semantic colours stay fixed across figures.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
CORRECT_COLOR, INCORRECT_COLOR = "#0072B2", "#D55E00"
FULL_COLOR = "#999999"
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]

CALIBRATIONS = ("empirical", "ltt")  # listed first, in this order, wherever calibration methods are compared
# How a value of a label column (setting, calibration, fill) is named in legends and titles.
DISPLAY_NAMES = {
    "generate": "HF generate",
    "greedy": "greedy (ours)",
    "early_exit": "early exit",
    "layerskip": "LayerSkip (tuned)",
    "dssd_paper": "DSSD (paper's rule)",
    "dssd": "DSSD (exit set + γ)",
    "dssd_tuned": "DSSD (tuned)",
    "layerskip_nobonus": "LayerSkip, no bonus",
    "dssd_perfect_gate": "DSSD, perfect gate (bound)",
    "oracle": "oracle bound",
    "empirical": "empirical",
    "ltt": "LTT (guaranteed)",
    "trained": "trained heads",
    "logit_lens": "logit lens",
    "lazy": "jagged cache, lazy fill",
    "copy": "state copy",
    "recompute": "prefix recompute",
    "full": "full model",
}


class SkipFigure(Exception):
    """The data a figure needs is absent; reported as a notice, not an error."""


def label(value: str) -> str:
    return DISPLAY_NAMES.get(value, value)


def ordered(values: Iterable[str], first: Iterable[str] = ()) -> list[str]:
    """The distinct non-empty values, those in `first` leading in its order, the rest sorted."""
    present = sorted({v for v in values if isinstance(v, str) and v})
    first = [v for v in first if v in present]
    return first + [v for v in present if v not in first]


def styled(fn: Callable[[Results, Path], list[Path]]) -> Callable[[Results, Path], list[Path]]:
    """Run a figure function under the house style, reset to defaults first (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(res: Results, out_dir: Path) -> list[Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with mpl.style.context(STYLE, after_reset=True), mpl.rc_context(FIXED_RC):
            return fn(res, out_dir)

    return wrapper


@contextlib.contextmanager
def output_formats(formats: Iterable[str]) -> Iterator[None]:
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {formats}")
    token = _ACTIVE_FORMATS.set(formats)
    try:
        yield
    finally:
        _ACTIVE_FORMATS.reset(token)


def save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    # Embedding the font in a PDF (pdf.fonttype 42) subsets it through fontTools, which logs hundreds of INFO
    # lines per file: nothing a reader of the log file needs.
    logging.getLogger("fontTools").setLevel(logging.WARNING)
    paths = []
    for fmt in _ACTIVE_FORMATS.get():
        path = out_dir / f"{name}.{fmt}"
        fig.savefig(path, format=fmt, metadata=METADATA[fmt])
        paths.append(path)
        # The first save ran the constrained layout; freeze it so later formats skip that (costly) pass.
        fig.set_layout_engine("none")
    return paths


def new_figure(nrows: int, ncols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    """A figure of nrows x ncols panels, each about width x height inches."""
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def model_title(res: Results, model: str) -> str:
    size = model_size(res.frame, model)
    if math.isnan(size):
        return model
    return f"{model} ({size / 1e9:.2g}B params)" if size >= 1e9 else f"{model} ({size / 1e6:.3g}M params)"


def no_data(ax: Axes, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color=FULL_COLOR)
    ax.set_xticks([])
    ax.set_yticks([])


def log_y(ax: Axes) -> None:
    """Log y axis with plain numbers at 1-2-5 steps (the default 6×10⁰ minor labels are unreadable)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(mpl.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(mpl.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(mpl.ticker.NullFormatter())


def need(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    if frame.empty:
        raise SkipFigure(f"no rows for {what}")
    return frame


def pivot(rows: pd.DataFrame, index: str, columns: str) -> pd.DataFrame:
    """Mean over duplicates (e.g. a row repeated by a rerun), sorted both ways."""
    return rows.pivot_table(index=index, columns=columns, values="value", aggfunc="mean").sort_index()


def heatmap(
    ax: Axes,
    table: pd.DataFrame,
    vmin: float,
    vmax: float,
    fmt: str = "{:.3f}",
    bold: Iterable[tuple[int, int]] = (),
) -> AxesImage:
    """Annotated heatmap; NaN cells left blank; `bold` marks (row, col) cells (e.g. the best)."""
    data = table.to_numpy(dtype=np.float64)
    image = ax.imshow(np.ma.masked_invalid(data), cmap="cividis", vmin=vmin, vmax=vmax, aspect="auto")
    bold = set(bold)
    norm = mpl.colors.Normalize(vmin=vmin, vmax=vmax)
    for (r, c), value in np.ndenumerate(data):
        if np.isfinite(value):
            # Dark text on the light (yellow) end of cividis, white on the dark (blue) end.
            color = "black" if norm(value) > 0.6 else "white"
            ax.text(
                c,
                r,
                fmt.format(value),
                ha="center",
                va="center",
                fontsize=7,
                color=color,
                fontweight="bold" if (r, c) in bold else "normal",
            )
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns])
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index])
    ax.grid(False)
    return image


def eps_annotations(ax: Axes, x: np.ndarray, y: np.ndarray, eps: np.ndarray) -> None:
    for xi, yi, ei in zip(x, y, eps, strict=True):
        ax.annotate(f"{ei:g}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=6)
