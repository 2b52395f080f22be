"""Plotting helpers: one function per figure, each reading only the results tables (analysis.data.Results).

Every figure function has the signature `fn(res, out_dir) -> list[Path]` and writes `<name>.png` and
`<name>.pdf`. When the data a figure needs is absent it raises `SkipFigure` (per-model figures skip only the
models that lack data, and raise only when no model has any); `analysis.build` turns that into a logged
notice, so a partial run still gets every figure it has data for.

Determinism: figures are drawn on bare `matplotlib.figure.Figure` objects (no pyplot state, no backend
dependence), under the house style applied *after a reset to matplotlib's defaults* (so neither a user's
matplotlibrc nor Jupyter's inline backend changes a pixel), with one bundled font and fixed file metadata (no
timestamps or version strings). The same inputs give byte-identical PNG and PDF files in a notebook kernel
and on the command line.
"""

from __future__ import annotations

import contextlib
import functools
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
from matplotlib.lines import Line2D

from analysis.data import Results, head_labels, model_size, per_head, select, slug, tasks

STYLE = Path(__file__).with_name("style.mplstyle")
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

CONFIDENCE_METRICS = ["entropy", "max_prob", "prob_margin", "logit_margin", "saturation"]
TOKEN_META_COLUMNS = {"head", "layer", "correct", "model", "position", "token", "split"}
DECODING_METHODS = ["greedy", "early_exit", "layerskip", "dssd"]
KV_FILLS = ["lazy", "copy", "recompute"]  # early_exit token-level rows: method = KV-cache fill strategy
TASK_METRICS = ["acc", "acc_norm", "exact_match"]  # a benchmark's headline score, first one present
METHOD_LABELS = {
    "generate": "HF generate",
    "greedy": "greedy (ours)",
    "early_exit": "early exit",
    "layerskip": "LayerSkip (tuned)",
    "dssd": "DSSD",
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


def label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


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


def _no_data(ax: Axes, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color=FULL_COLOR)
    ax.set_xticks([])
    ax.set_yticks([])


def _log_y(ax: Axes) -> None:
    """Log y axis with plain numbers at 1-2-5 steps (the default 6×10⁰ minor labels are unreadable)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(mpl.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(mpl.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(mpl.ticker.NullFormatter())


def _need(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    if frame.empty:
        raise SkipFigure(f"no rows for {what}")
    return frame


def _pivot(rows: pd.DataFrame, index: str, columns: str) -> pd.DataFrame:
    """Mean over duplicates (e.g. a row repeated by a rerun), sorted both ways."""
    return rows.pivot_table(index=index, columns=columns, values="value", aggfunc="mean").sort_index()


# ---------------------------------------------------------------------------------------------------------
# (a) confidence-metric separation


def metric_columns(table: pd.DataFrame) -> list[str]:
    """The confidence metrics present in a token table: the known ones in a fixed order, then any others."""
    numeric = [
        c for c in table.columns if c not in TOKEN_META_COLUMNS and pd.api.types.is_numeric_dtype(table[c])
    ]
    return [m for m in CONFIDENCE_METRICS if m in numeric] + sorted(
        m for m in numeric if m not in CONFIDENCE_METRICS
    )


def _bins(values: np.ndarray, n: int = 40) -> np.ndarray:
    """Shared bins for one metric across heads; the 0.5–99.5 % range keeps one outlier from flattening all."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.linspace(0.0, 1.0, n + 1)
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n + 1)


def auroc_table(res: Results, model: str) -> pd.DataFrame:
    """AUROC (rows: confidence metric, columns: head) from the metrics stage's rows."""
    rows = per_head(select(res.frame, stage="metrics", metric="auroc", model=model))
    if rows.empty:
        return pd.DataFrame()
    table = _pivot(rows, "method", "head_idx")
    order = [m for m in CONFIDENCE_METRICS if m in table.index] + sorted(
        set(table.index) - set(CONFIDENCE_METRICS)
    )
    table = table.loc[order]
    table.columns = [f"head {c}" for c in table.columns]
    table.index.name = "metric"
    return table


@styled
def confidence_histograms(res: Results, out_dir: Path) -> list[Path]:
    """Per model: each metric's distribution for tokens where the head agrees vs disagrees with the full model."""
    paths: list[Path] = []
    for model in res.models:
        table = res.token_tables.get(model)
        if table is None or table.empty or "correct" not in table or "head" not in table:
            continue
        metrics = metric_columns(table)
        heads = sorted(int(h) for h in table["head"].dropna().unique())
        if not metrics or not heads:
            continue
        correct = table["correct"].astype(bool).to_numpy()
        head_of = table["head"].astype(int).to_numpy()
        aurocs = auroc_table(res, model)
        fig, axes = new_figure(len(metrics), len(heads), 2.1, 1.45)
        for i, metric in enumerate(metrics):
            values = table[metric].to_numpy(dtype=np.float64)
            bins = _bins(values)
            for j, head in enumerate(heads):
                ax = axes[i, j]
                if j == 0:
                    ax.set_ylabel(metric)
                if i == 0:
                    layer = table.loc[table["head"] == head, "layer"].dropna() if "layer" in table else []
                    ax.set_title(f"head {head}" + (f" (block {int(layer.iloc[0])})" if len(layer) else ""))
                on_head = head_of == head
                drawn = False
                for mask, color, name in (
                    (on_head & correct, CORRECT_COLOR, "agrees with full model"),
                    (on_head & ~correct, INCORRECT_COLOR, "disagrees"),
                ):
                    sample = values[mask]
                    sample = sample[np.isfinite(sample)]
                    if sample.size == 0:
                        continue
                    counts, _ = np.histogram(np.clip(sample, bins[0], bins[-1]), bins=bins, density=True)
                    ax.stairs(counts, bins, fill=True, color=color, alpha=0.35, label=name)
                    ax.stairs(counts, bins, color=color, linewidth=1.0)
                    drawn = True
                if not drawn:
                    _no_data(ax, "undefined")
                    continue
                score = (
                    aurocs.at[metric, f"head {head}"]
                    if (metric in aurocs.index and f"head {head}" in aurocs.columns)
                    else np.nan
                )
                if np.isfinite(score):
                    ax.text(
                        0.97,
                        0.95,
                        f"AUROC {score:.3f}",
                        ha="right",
                        va="top",
                        transform=ax.transAxes,
                        fontsize=7,
                        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1},
                    )
                ax.set_yticks([])
                ax.grid(False)
        # Only the filled stairs carry labels; take them from the first panel that has both classes.
        handles, names = max((ax.get_legend_handles_labels() for ax in axes.flat), key=lambda hl: len(hl[1]))
        fig.legend(handles, names, loc="outside lower center", ncols=2)
        fig.suptitle(
            f"{model_title(res, model)}: confidence metrics on correct vs incorrect head predictions"
        )
        paths += save(fig, out_dir, f"confidence_hist_{slug(model)}")
    if not paths:
        raise SkipFigure("no per-token metric table (tables/metrics/token_metrics.parquet)")
    return paths


def _heatmap(
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


@styled
def confidence_auroc(res: Results, out_dir: Path) -> list[Path]:
    """AUROC of every confidence metric per head, one panel per model; the best metric per head in bold."""
    tables = {m: auroc_table(res, m) for m in res.models}
    tables = {m: t for m, t in tables.items() if not t.empty}
    if not tables:
        raise SkipFigure("no metrics/auroc rows")
    fig, axes = new_figure(1, len(tables), 3.2, 2.4)
    image = None
    for ax, (model, table) in zip(axes[0], tables.items(), strict=True):
        best = [
            (int(np.nanargmax(table[c].to_numpy())), j)
            for j, c in enumerate(table.columns)
            if table[c].notna().any()
        ]
        image = _heatmap(ax, table, 0.5, 1.0, bold=best)
        ax.set_title(model_title(res, model))
    fig.colorbar(image, ax=axes[0].tolist(), label="AUROC (correct vs incorrect)", shrink=0.9)
    fig.suptitle("How well each confidence metric separates correct from incorrect head predictions")
    return save(fig, out_dir, "confidence_auroc")


# ---------------------------------------------------------------------------------------------------------
# (b) heads vs depth


@styled
def heads_depth(res: Results, out_dir: Path) -> list[Path]:
    """Agreement with the full model and KL(full || head) against depth: trained heads vs the logit lens."""
    rows = per_head(_need(select(res.frame, stage="heads", metric=["agree", "kl"]), "heads/agree,kl"))
    if rows.empty:
        raise SkipFigure("heads rows carry no head index")
    models = [m for m in res.models if m in set(rows["model"])]
    fig, axes = new_figure(2, len(models), 2.8, 2.1)
    for j, model in enumerate(models):
        mrows = rows[rows["model"] == model]
        # The block a head reads is the honest depth axis; fall back to the head index if `layer` is absent.
        has_layer = "layer" in mrows and mrows["layer"].notna().all()
        for i, metric in enumerate(("agree", "kl")):
            ax = axes[i, j]
            sub = mrows[mrows["metric"] == metric]
            if sub.empty:
                _no_data(ax)
                continue
            for k, method in enumerate(sorted(sub["method"].unique(), key=lambda m: (m != "trained", m))):
                part = (
                    sub[sub["method"] == method].groupby("layer" if has_layer else "head_idx")["value"].mean()
                )
                ax.plot(
                    part.index,
                    part.to_numpy(),
                    linestyle=LINESTYLES[k % 4],
                    marker=MARKERS[k % 6],
                    color=OKABE_ITO[k],
                    label=label(method),
                )
            if metric == "agree":
                ax.set_ylim(0, 1.02)
                ax.set_ylabel("agreement with full model" if j == 0 else "")
            else:
                if (sub["value"] > 0).all():
                    _log_y(ax)
                ax.set_ylabel("KL(full ‖ head) (nats)" if j == 0 else "")
            ax.set_xlabel("block the head reads (0-based)" if has_layer else "head index")
            ax.set_xticks(sorted(mrows["layer" if has_layer else "head_idx"].unique()))
            if i == 0:
                ax.set_title(model_title(res, model))
        axes[0, j].legend(loc="lower right")
    fig.suptitle("Early-exit heads vs depth: self-supervised heads against the logit lens")
    return save(fig, out_dir, "heads_depth")


# ---------------------------------------------------------------------------------------------------------
# (c) calibration and (g) exit distribution


def _methods(rows: pd.DataFrame, first: Iterable[str] = ()) -> list[str]:
    present = sorted(set(rows["method"].dropna()))
    first = [m for m in first if m in present]
    return first + [m for m in present if m not in first]


@styled
def calibration(res: Results, out_dir: Path) -> list[Path]:
    """Per model: exit fraction per head vs ε, realized vs target accuracy, and thresholds, empirical vs LTT."""
    cal = select(res.frame, stage="calibrate")
    paths: list[Path] = []
    for model in res.models:
        rows = cal[(cal["model"] == model) & cal["eps"].notna()]
        if rows.empty:
            continue
        methods = _methods(rows, first=("empirical", "ltt"))
        labels = head_labels(rows)
        fig, axes = new_figure(1, 3, 3.0, 2.5)
        ax_cov, ax_acc, ax_thr = axes[0]
        style = {m: LINESTYLES[k % 4] for k, m in enumerate(methods)}
        for method in methods:
            mrows = rows[rows["method"] == method]
            heads = per_head(mrows)
            for idx in labels:
                for ax, metric in ((ax_cov, "exit_frac"), (ax_thr, "threshold")):
                    part = heads[(heads["head_idx"] == idx) & (heads["metric"] == metric)]
                    series = part.groupby("eps")["value"].mean()
                    if series.notna().any():
                        ax.plot(
                            series.index,
                            series.to_numpy(),
                            linestyle=style[method],
                            marker="o",
                            color=OKABE_ITO[idx % len(OKABE_ITO)],
                        )
            policy = select(mrows, head="all")
            coverage = policy[policy["metric"] == "coverage"].groupby("eps")["value"].mean()
            if len(coverage):
                ax_cov.plot(
                    coverage.index, coverage.to_numpy(), linestyle=style[method], color="black", linewidth=2.2
                )
            accuracy = policy[policy["metric"] == "accuracy"].groupby("eps")["value"].mean()
            if len(accuracy):
                ax_acc.plot(
                    accuracy.index,
                    accuracy.to_numpy(),
                    linestyle=style[method],
                    marker="o",
                    color=OKABE_ITO[methods.index(method) % len(OKABE_ITO)],
                    label=label(method),
                )
        lo = float(rows["eps"].min())
        ax_acc.plot([lo, 1.0], [lo, 1.0], color=FULL_COLOR, linewidth=1.0, linestyle=":", label="target = ε")
        ax_cov.set(
            xlabel="ε (target accuracy)",
            ylabel="fraction of tokens exiting",
            ylim=(0, 1.02),
            title="coverage vs ε",
        )
        ax_acc.set(
            xlabel="ε (target accuracy)",
            ylabel="realized accuracy (test split)",
            title="realized vs target accuracy",
        )
        ax_thr.set(
            xlabel="ε (target accuracy)",
            ylabel="entropy threshold (nats)",
            title="thresholds (gaps: head disabled)",
        )
        if ax_acc.lines:
            ax_acc.legend(fontsize=6, loc="upper left")
        # Colour = head and line style = method: one legend entry per head and per method, not per pair.
        proxies = [
            Line2D([], [], color=OKABE_ITO[i % len(OKABE_ITO)], marker="o", label=n)
            for i, n in labels.items()
        ]
        proxies.append(Line2D([], [], color="black", linewidth=2.2, label="all heads (coverage)"))
        proxies += [Line2D([], [], color="gray", linestyle=style[m], label=label(m)) for m in methods]
        ax_cov.legend(handles=proxies, fontsize=6, loc="upper right")
        fig.suptitle(f"{model_title(res, model)}: calibration of ε (line style = method)")
        paths += save(fig, out_dir, f"calibration_{slug(model)}")
    if not paths:
        raise SkipFigure("no calibrate rows with an ε")
    return paths


def exit_fractions(res: Results) -> pd.DataFrame:
    """Fraction of tokens exiting at each head per (model, method, eps): the calibrate stage's `exit_frac` rows
    or, without them, the early_exit stage's `exit_frac/<task>` averaged over tasks."""
    rows = per_head(select(res.frame, stage="calibrate", metric="exit_frac"))
    if rows.empty:
        ee = select(res.frame, stage="early_exit")
        ee = ee[ee["metric"].str.startswith("exit_frac/").fillna(False)]
        rows = per_head(ee)
    rows = rows[rows["eps"].notna()]
    if rows.empty:
        return pd.DataFrame(columns=["model", "method", "eps", "head_idx", "value"])
    return rows.groupby(["model", "method", "eps", "head_idx"], as_index=False)["value"].mean()


@styled
def exit_distribution(res: Results, out_dir: Path) -> list[Path]:
    """Where tokens exit as ε varies: stacked fractions per head, the rest reaching the full model."""
    fractions = exit_fractions(res)
    if fractions.empty:
        raise SkipFigure("no exit_frac rows (calibrate or early_exit)")
    models = [m for m in res.models if m in set(fractions["model"])]
    methods = _methods(fractions, first=("empirical", "ltt"))
    fig, axes = new_figure(len(methods), len(models), 2.9, 2.2)
    heads = sorted(fractions["head_idx"].unique())
    for i, method in enumerate(methods):
        for j, model in enumerate(models):
            ax = axes[i, j]
            part = fractions[(fractions["model"] == model) & (fractions["method"] == method)]
            if part.empty:
                _no_data(ax)
                continue
            table = part.pivot_table(index="eps", columns="head_idx", values="value", aggfunc="mean").fillna(
                0.0
            )
            x = np.arange(len(table))
            bottom = np.zeros(len(table))
            for idx in heads:
                share = table[idx].to_numpy() if idx in table else np.zeros(len(table))
                ax.bar(
                    x,
                    share,
                    bottom=bottom,
                    color=OKABE_ITO[idx % len(OKABE_ITO)],
                    width=0.8,
                    label=f"head {idx}",
                )
                bottom += share
            # What no head took goes through every layer; clipped at 0 in case fractions overlap.
            ax.bar(
                x,
                np.clip(1.0 - bottom, 0.0, None),
                bottom=bottom,
                color=FULL_COLOR,
                width=0.8,
                label="full model",
            )
            ax.set_xticks(x, [f"{e:g}" for e in table.index])
            ax.set(ylim=(0, 1), xlabel="ε", ylabel=f"{label(method)}\nfraction of tokens" if j == 0 else "")
            ax.grid(False, axis="x")
            if i == 0:
                ax.set_title(model_title(res, model))
    handles, names = next((ax.get_legend_handles_labels() for ax in axes.flat if ax.patches), ([], []))
    fig.legend(handles, names, loc="outside right upper")
    fig.suptitle("Exit distribution per head as ε varies")
    return save(fig, out_dir, "exit_distribution")


# ---------------------------------------------------------------------------------------------------------
# (d) accuracy vs compute and (e) scaling with model size


def _eps_annotations(ax: Axes, x: np.ndarray, y: np.ndarray, eps: np.ndarray) -> None:
    for xi, yi, ei in zip(x, y, eps, strict=True):
        ax.annotate(f"{ei:g}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=6)


@styled
def accuracy_compute(res: Results, out_dir: Path) -> list[Path]:
    """Benchmark accuracy against the fraction of the full model's compute, one point per ε, per model×task;
    plus token-level agreement vs layer-equivalents per token for each KV-cache strategy."""
    ee = _need(select(res.frame, stage="early_exit"), "early_exit rows")
    task_names = sorted({t for name in TASK_METRICS for t in tasks(ee, name)})
    token_level = ee[ee["method"].isin(KV_FILLS)]
    columns = task_names + (["token level"] if not token_level.empty else [])
    if not columns:
        raise SkipFigure("no early_exit acc/<task> or token-level rows")
    models = [m for m in res.models if m in set(ee["model"])]
    fig, axes = new_figure(len(models), len(columns), 2.8, 2.3)
    for i, model in enumerate(models):
        mrows = ee[ee["model"] == model]
        for j, column in enumerate(columns):
            ax = axes[i, j]
            if column == "token level":
                _token_level_panel(ax, mrows)
            else:
                _task_panel(ax, mrows, column)
            if i == 0:
                ax.set_title(column)
            if j == 0:
                ax.set_ylabel(f"{model}\n{ax.get_ylabel()}")
            if ax.lines:
                ax.legend(fontsize=6, loc="lower right")
    _, calibration = _token_level_rows(ee)
    fig.suptitle(
        "Accuracy vs compute as ε varies (labels: ε)"
        + (f"; token level with {label(calibration)} thresholds" if calibration else "")
    )
    return save(fig, out_dir, "accuracy_compute")


def _task_panel(ax: Axes, rows: pd.DataFrame, task: str) -> None:
    # lm-eval names the score per task type: the first of TASK_METRICS the task reports is its headline.
    name = next((n for n in TASK_METRICS if (rows["metric"] == f"{n}/{task}").any()), None)
    if name is None:
        _no_data(ax)
        return
    acc = rows[rows["metric"] == f"{name}/{task}"]
    compute = rows[rows["metric"] == f"compute_frac/{task}"]
    full = acc[acc["method"] == "full"]["value"]
    if len(full):
        stderr = rows[(rows["method"] == "full") & (rows["metric"] == f"{name}_stderr/{task}")]["value"]
        ax.axhline(full.mean(), color=FULL_COLOR, linestyle=":", label=label("full"))
        if len(stderr) and np.isfinite(stderr.mean()):
            ax.axhspan(
                full.mean() - stderr.mean(),
                full.mean() + stderr.mean(),
                color=FULL_COLOR,
                alpha=0.15,
                linewidth=0,
            )
    for k, method in enumerate(_methods(acc[acc["method"] != "full"], first=("empirical", "ltt"))):
        a = acc[acc["method"] == method].groupby("eps")["value"].mean()
        c = compute[compute["method"] == method].groupby("eps")["value"].mean()
        joined = pd.concat({"acc": a, "compute": c}, axis=1).dropna()
        if joined.empty:
            continue
        ax.plot(
            joined["compute"],
            joined["acc"],
            marker=MARKERS[k % 6],
            linestyle=LINESTYLES[k % 4],
            color=OKABE_ITO[k],
            label=label(method),
        )
        if k == 0:
            _eps_annotations(
                ax, joined["compute"].to_numpy(), joined["acc"].to_numpy(), joined.index.to_numpy()
            )
    ax.set(xlabel="compute (fraction of full model)", ylabel=name)


def _token_level_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Token-level rows (method = KV fill) of one calibration method, empirical first, and its name ("" when
    the rows carry no `calibration` column): mixing methods at one ε would average two exit policies."""
    token = rows[rows["method"].isin(KV_FILLS)]
    if "calibration" not in token or token["calibration"].isna().all():
        return token, ""
    calibration = token["calibration"].astype("string").fillna("")
    chosen = _methods(pd.DataFrame({"method": calibration[calibration != ""]}), first=("empirical", "ltt"))[0]
    return token[calibration == chosen], chosen


def _token_level_panel(ax: Axes, rows: pd.DataFrame) -> None:
    """Agreement vs layer-equivalents per KV fill strategy, with the full model as a reference star."""
    token, _ = _token_level_rows(rows)
    full = rows[(rows["method"] == "full") & rows["metric"].isin(["agreement", "layer_equiv_per_token"])]
    full = full.groupby("metric")["value"].mean()
    if {"agreement", "layer_equiv_per_token"} <= set(full.index):
        ax.plot(
            [full["layer_equiv_per_token"]],
            [full["agreement"]],
            marker="*",
            markersize=9,
            linestyle="none",
            color=FULL_COLOR,
            label=label("full"),
        )
    for k, method in enumerate(m for m in KV_FILLS if m in set(token["method"])):
        part = token[token["method"] == method]
        joined = part.pivot_table(index="eps", columns="metric", values="value", aggfunc="mean")
        if not {"agreement", "layer_equiv_per_token"} <= set(joined.columns):
            continue
        joined = joined[["layer_equiv_per_token", "agreement"]].dropna()
        ax.plot(
            joined["layer_equiv_per_token"],
            joined["agreement"],
            marker=MARKERS[k % 6],
            linestyle=LINESTYLES[k % 4],
            color=OKABE_ITO[k],
            label=label(method),
        )
        if k == 0:
            _eps_annotations(
                ax,
                joined["layer_equiv_per_token"].to_numpy(),
                joined["agreement"].to_numpy(),
                joined.index.to_numpy(),
            )
    if len(ax.lines) <= 1:  # the full-model star alone is not a comparison
        ax.cla()
        _no_data(ax)
        return
    ax.set(xlabel="layer-equivalents per token", ylabel="token agreement with full model")


def pick_eps(rows: pd.DataFrame) -> float:
    """The ε a method would be deployed at: the fastest (speedup_vs_generate), else the most accepted tokens
    per verification, else the largest ε; NaN when the rows have no ε."""
    with_eps = rows[rows["eps"].notna()]
    if with_eps.empty:
        return float("nan")
    for metric in ("speedup_vs_generate", "accepted_per_verification"):
        scored = with_eps[with_eps["metric"] == metric].groupby("eps")["value"].mean().dropna()
        if len(scored):
            return float(scored.idxmax())
    return float(with_eps["eps"].max())


def decoding_point(rows: pd.DataFrame, method: str) -> tuple[pd.Series, float]:
    """One method's decoding metrics (metric -> value), at `pick_eps` when it was run at several ε."""
    part = rows[rows["method"] == method]
    eps = pick_eps(part)
    if not math.isnan(eps):
        part = part[part["eps"] == eps]
    return part.groupby("metric")["value"].mean(), eps


@styled
def size_scaling(res: Results, out_dir: Path) -> list[Path]:
    """Compute saving and speedup against model size."""
    sizes = {m: model_size(res.frame, m) for m in res.models}
    ee = select(res.frame, stage="early_exit")
    dec = select(res.frame, stage="decoding")
    panels: list[tuple[str, Callable[[Axes], None]]] = []

    saving = ee[
        ee["metric"].str.startswith("compute_frac/").fillna(False)
        & ee["eps"].notna()
        & (ee["method"] != "full")
    ]
    if not saving.empty:
        method = _methods(saving, first=("empirical", "ltt"))[0]
        saving = saving[saving["method"] == method]
        panels.append(
            (f"early exit, benchmarks ({label(method)})", lambda ax: _saving_by_eps(ax, saving, sizes))
        )
    if not dec.empty:
        if {"greedy"} <= set(dec["method"]) and (dec["metric"] == "layer_equiv_per_token").any():
            panels.append(
                (
                    "decoding: compute saving vs greedy",
                    lambda ax: _decoding_vs_size(ax, dec, sizes, "layer_equiv_saving"),
                )
            )
        if (dec["metric"] == "speedup_vs_generate").any():
            panels.append(
                (
                    "decoding: speedup vs HF generate",
                    lambda ax: _decoding_vs_size(ax, dec, sizes, "speedup_vs_generate"),
                )
            )
    if not panels:
        raise SkipFigure("no early_exit compute_frac or decoding rows")
    fig, axes = new_figure(1, len(panels), 3.3, 2.6)
    for ax, (title, draw) in zip(axes[0], panels, strict=True):
        draw(ax)
        ax.set_title(title)
        if all(np.isfinite(list(sizes.values()))):
            # Log scale, but ticks only at the models themselves: a sweep has few, unevenly spaced sizes.
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(mpl.ticker.FixedLocator(list(sizes.values())))
            ax.xaxis.set_major_formatter(mpl.ticker.FixedFormatter([_short_size(v) for v in sizes.values()]))
            ax.xaxis.set_minor_locator(mpl.ticker.NullLocator())
            ax.set_xlabel("parameters")
            ax.margins(x=0.15)
        else:
            ax.set_xlabel("model (by size)")
        if ax.lines:
            ax.legend(fontsize=6, loc="best")
    fig.suptitle("Compute saving and speedup vs model size (decoding: each method at its fastest ε)")
    return save(fig, out_dir, "size_scaling")


def _short_size(n_params: float) -> str:
    return f"{n_params / 1e9:.2g}B" if n_params >= 1e9 else f"{n_params / 1e6:.3g}M"


def _size_axis(sizes: dict[str, float], models: Iterable[str]) -> tuple[list[str], np.ndarray]:
    """x positions: parameter counts when every size is known, else the models' rank (ticks named)."""
    models = [m for m in sizes if m in set(models)]
    if all(np.isfinite(list(sizes.values()))):
        return models, np.array([sizes[m] for m in models])
    return models, np.array([list(sizes).index(m) for m in models], dtype=float)


def _name_ticks(ax: Axes, sizes: dict[str, float], models: list[str], x: np.ndarray) -> None:
    if not all(np.isfinite(list(sizes.values()))):
        ax.set_xticks(x, models, rotation=30, ha="right")


def _saving_by_eps(ax: Axes, rows: pd.DataFrame, sizes: dict[str, float]) -> None:
    """1 − compute fraction (mean over benchmarks), one line per ε (at most five, spread over the grid)."""
    eps_values = sorted(rows["eps"].unique())
    if len(eps_values) > 5:
        eps_values = [eps_values[i] for i in np.linspace(0, len(eps_values) - 1, 5).round().astype(int)]
    models, x = _size_axis(sizes, rows["model"])
    for k, eps in enumerate(eps_values):
        per_model = rows[rows["eps"] == eps].groupby("model")["value"].mean()
        y = np.array([1.0 - per_model.get(m, np.nan) for m in models])
        ax.plot(x, y, marker=MARKERS[k % 6], color=OKABE_ITO[k], label=f"ε={eps:g}")
    _name_ticks(ax, sizes, models, x)
    ax.set_ylabel("compute saving (1 − fraction of full)")


def _decoding_vs_size(ax: Axes, rows: pd.DataFrame, sizes: dict[str, float], what: str) -> None:
    models, x = _size_axis(sizes, rows["model"])
    for k, method in enumerate(m for m in DECODING_METHODS if m in set(rows["method"])):
        if what == "layer_equiv_saving" and method == "greedy":
            continue
        y = []
        for model in models:
            mrows = rows[rows["model"] == model]
            point, _ = decoding_point(mrows, method)
            if what == "layer_equiv_saving":
                greedy, _ = decoding_point(mrows, "greedy")
                value = 1.0 - point.get("layer_equiv_per_token", np.nan) / greedy.get(
                    "layer_equiv_per_token", np.nan
                )
            else:
                value = point.get(what, np.nan)
            y.append(value)
        ax.plot(
            x, y, marker=MARKERS[k % 6], linestyle=LINESTYLES[k % 4], color=OKABE_ITO[k], label=label(method)
        )
    if what == "speedup_vs_generate":
        ax.axhline(1.0, color=FULL_COLOR, linestyle=":", linewidth=1.0)
        ax.set_ylabel("speedup (×)")
    else:
        ax.set_ylabel("1 − layer-equivalents / greedy's")
    _name_ticks(ax, sizes, models, x)


# ---------------------------------------------------------------------------------------------------------
# (f) DSSD vs LayerSkip


def layerskip_grid(res: Results, model: str, metric: str) -> pd.DataFrame:
    """The LayerSkip tuning grid for one metric: rows = draft head, columns = draft length."""
    rows = per_head(select(res.frame, stage="decoding", method="layerskip_grid", metric=metric, model=model))
    if rows.empty or "draft_len" not in rows or rows["draft_len"].isna().all():
        return pd.DataFrame()
    rows = rows[rows["draft_len"].notna()].assign(draft_len=lambda f: f["draft_len"].astype(int))
    table = rows.pivot_table(
        index="head_idx", columns="draft_len", values="value", aggfunc="mean"
    ).sort_index()
    labels = head_labels(rows)
    table.index = [labels.get(i, f"head {i}") for i in table.index]
    return table


@styled
def decoding(res: Results, out_dir: Path) -> list[Path]:
    """Per model: the LayerSkip (head × draft length) grid as heatmaps, and DSSD vs ε against the tuned
    LayerSkip and the oracle bound, for acceptance rate and accepted tokens per verification."""
    dec = select(res.frame, stage="decoding")
    metrics = (
        ("acceptance_rate", "acceptance rate", "acceptance rate"),
        ("accepted_per_verification", "accepted tokens / verification", "accepted / verification"),
    )
    paths: list[Path] = []
    for model in res.models:
        mrows = dec[dec["model"] == model]
        if mrows.empty or not mrows["metric"].isin([m for m, _, _ in metrics]).any():
            continue
        fig, axes = new_figure(2, 2, 3.3, 2.5)
        for j, (metric, title, short) in enumerate(metrics):
            grid = layerskip_grid(res, model, metric)
            ax = axes[0, j]
            if grid.empty:
                _no_data(ax, "no LayerSkip grid")
            else:
                values = grid.to_numpy(dtype=np.float64)
                best = (
                    [np.unravel_index(np.nanargmax(values), values.shape)]
                    if np.isfinite(values).any()
                    else []
                )
                image = _heatmap(
                    ax,
                    grid,
                    float(np.nanmin(values)),
                    float(np.nanmax(values)),
                    fmt="{:.2f}",
                    bold=[(int(r), int(c)) for r, c in best],
                )
                fig.colorbar(image, ax=ax, shrink=0.85)
                ax.set(xlabel="draft length d", title=f"LayerSkip: {short}")
            _dssd_vs_eps(axes[1, j], mrows, metric, title)
        fig.suptitle(f"{model_title(res, model)}: DSSD vs LayerSkip (grid best in bold)")
        paths += save(fig, out_dir, f"decoding_{slug(model)}")
    if not paths:
        raise SkipFigure("no decoding acceptance rows")
    return paths


def _dssd_vs_eps(ax: Axes, rows: pd.DataFrame, metric: str, title: str) -> None:
    part = rows[rows["metric"] == metric]
    for k, method in enumerate(("dssd", "oracle", "layerskip")):
        series = part[part["method"] == method]
        if series.empty:
            continue
        color = OKABE_ITO[k]
        by_eps = series[series["eps"].notna()].groupby("eps")["value"].mean()
        if len(by_eps) > 1 or (len(by_eps) == 1 and method == "dssd"):
            ax.plot(
                by_eps.index,
                by_eps.to_numpy(),
                marker=MARKERS[k],
                linestyle=LINESTYLES[k],
                color=color,
                label=label(method),
            )
        else:  # a single tuned configuration (LayerSkip) or an ε-free bound: a reference line
            ax.axhline(series["value"].mean(), color=color, linestyle=LINESTYLES[k], label=label(method))
    if not ax.lines:
        _no_data(ax)
        return
    ax.set(xlabel="ε (DSSD's one knob)", ylabel=title, title=f"{title} vs ε")
    ax.legend(fontsize=6, loc="best")


@styled
def decoding_summary(res: Results, out_dir: Path) -> list[Path]:
    """Across models: DSSD (at its deployed ε) vs tuned LayerSkip vs the oracle bound."""
    dec = _need(
        select(
            res.frame,
            stage="decoding",
            method=["dssd", "layerskip", "oracle"],
            metric=["acceptance_rate", "accepted_per_verification"],
        ),
        "decoding dssd/layerskip rows",
    )
    models = [m for m in res.models if m in set(dec["model"])]
    methods = [m for m in ("dssd", "layerskip", "oracle") if m in set(dec["method"])]
    fig, axes = new_figure(1, 2, max(3.0, 0.9 * len(models) + 1.5), 2.6)
    width = 0.8 / len(methods)
    x = np.arange(len(models))
    for ax, (metric, title) in zip(
        axes[0],
        (
            ("acceptance_rate", "acceptance rate"),
            ("accepted_per_verification", "accepted tokens / verification"),
        ),
        strict=True,
    ):
        values = {
            m: [decoding_point(dec[dec["model"] == model], m)[0].get(metric, np.nan) for model in models]
            for m in methods
        }
        for k, method in enumerate(methods):
            ax.bar(
                x + (k - (len(methods) - 1) / 2) * width,
                values[method],
                width=width,
                color=OKABE_ITO[k],
                label=label(method),
            )
        if "dssd" in values and "layerskip" in values:
            # The paper's headline number: DSSD's gain over the best manually tuned LayerSkip.
            for xi, d, ls in zip(x, values["dssd"], values["layerskip"], strict=True):
                if np.isfinite(d) and np.isfinite(ls) and ls > 0:
                    ax.annotate(
                        f"{d / ls:.2f}×",
                        (xi, max(d, ls)),
                        textcoords="offset points",
                        xytext=(0, 3),
                        ha="center",
                        fontsize=7,
                    )
        ax.set_xticks(x, models, rotation=20 if len(models) > 3 else 0)
        ax.set(ylabel=title, title=title)
        ax.grid(False, axis="x")
        ax.margins(y=0.15)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=len(methods))
    fig.suptitle("DSSD (at its fastest ε) vs tuned LayerSkip; labels: DSSD ÷ LayerSkip")
    return save(fig, out_dir, "decoding_summary")


# Every figure, in report order: name -> function. `analysis.build` runs them; notebooks pick theirs by name.
FIGURES: dict[str, Callable[[Results, Path], list[Path]]] = {
    "confidence_histograms": confidence_histograms,
    "confidence_auroc": confidence_auroc,
    "heads_depth": heads_depth,
    "calibration": calibration,
    "exit_distribution": exit_distribution,
    "accuracy_compute": accuracy_compute,
    "size_scaling": size_scaling,
    "decoding": decoding,
    "decoding_summary": decoding_summary,
}
