"""Confidence-metric figures (the metrics stage): how well each metric separates tokens where a head agrees
with the full model from those where it does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.data import Results, per_head, select, slug
from analysis.plots.style import (
    CORRECT_COLOR,
    INCORRECT_COLOR,
    SkipFigure,
    heatmap,
    model_title,
    new_figure,
    no_data,
    pivot,
    save,
    styled,
)

CONFIDENCE_METRICS = ["entropy", "max_prob", "prob_margin", "logit_margin", "saturation"]
# Columns of the per-token metric table that are not confidence metrics.
TOKEN_META_COLUMNS = {"head", "layer", "correct", "model", "position", "token", "split"}


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
    table = pivot(rows, "confidence", "head_idx")
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
                    no_data(ax, "undefined")
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
        image = heatmap(ax, table, 0.5, 1.0, bold=best)
        ax.set_title(model_title(res, model))
    fig.colorbar(image, ax=axes[0].tolist(), label="AUROC (correct vs incorrect)", shrink=0.9)
    fig.suptitle("How well each confidence metric separates correct from incorrect head predictions")
    return save(fig, out_dir, "confidence_auroc")
