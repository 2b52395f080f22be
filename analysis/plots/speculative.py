"""Speculative decoding figures (decoding stage): the LayerSkip tuning grid, DSSD against ε, and DSSD vs the
tuned LayerSkip vs the oracle bound across models. Decoding settings are the `setting` column's values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from analysis.data import Results, head_labels, per_head, select, slug
from analysis.plots.style import (
    LINESTYLES,
    MARKERS,
    OKABE_ITO,
    SkipFigure,
    heatmap,
    label,
    model_title,
    need,
    new_figure,
    no_data,
    save,
    styled,
)


def pick_eps(rows: pd.DataFrame) -> float:
    """The ε a method would be deployed at: the fastest (speedup_vs_generate), else the most accepted tokens
    per verification, else the largest ε; NaN when the rows have no ε. Only ε at which the method drafts count
    when there are any (at an ε where no head is consulted the method is greedy under another name)."""
    with_eps = rows[rows["eps"].notna()]
    if with_eps.empty:
        return float("nan")
    acceptance = with_eps[(with_eps["metric"] == "acceptance_rate") & with_eps["value"].notna()]
    if len(acceptance):
        with_eps = with_eps[with_eps["eps"].isin(acceptance["eps"].unique())]
    for metric in ("speedup_vs_generate", "accepted_per_verification"):
        scored = with_eps[with_eps["metric"] == metric].groupby("eps")["value"].mean().dropna()
        if len(scored):
            return float(scored.idxmax())
    return float(with_eps["eps"].max())


def decoding_point(rows: pd.DataFrame, setting: str) -> tuple[pd.Series, float]:
    """One decoding setting's metrics (metric -> value), at `pick_eps` when it was run at several ε."""
    part = rows[rows["setting"] == setting]
    eps = pick_eps(part)
    if not math.isnan(eps):
        part = part[part["eps"] == eps]
    return part.groupby("metric")["value"].mean(), eps


def layerskip_grid(res: Results, model: str, metric: str) -> pd.DataFrame:
    """The LayerSkip tuning grid for one metric: rows = draft head, columns = draft length."""
    rows = per_head(select(res.frame, stage="decoding", setting="layerskip_grid", metric=metric, model=model))
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
    metrics = (  # metric, title, short title, cell label format (few digits: cells stay readable)
        ("acceptance_rate", "acceptance rate", "acceptance rate", "{:.2f}"),
        ("accepted_per_verification", "accepted tokens / verification", "accepted / verification", "{:.1f}"),
    )
    paths: list[Path] = []
    for model in res.models:
        mrows = dec[dec["model"] == model]
        if mrows.empty or not mrows["metric"].isin([m for m, *_ in metrics]).any():
            continue
        # A heat-map cell must be wide enough for its label (7 pt, 3-4 characters): ~0.42 in per draft length.
        n_lengths = (
            mrows.loc[mrows["setting"] == "layerskip_grid", "draft_len"].nunique()
            if "draft_len" in mrows
            else 0
        )
        fig, axes = new_figure(2, 2, max(3.3, 0.42 * n_lengths + 1.6), 2.5)
        for j, (metric, title, short, fmt) in enumerate(metrics):
            grid = layerskip_grid(res, model, metric)
            ax = axes[0, j]
            if grid.empty:
                no_data(ax, "no LayerSkip grid")
            else:
                values = grid.to_numpy(dtype=np.float64)
                best = (
                    [np.unravel_index(np.nanargmax(values), values.shape)]
                    if np.isfinite(values).any()
                    else []
                )
                image = heatmap(
                    ax,
                    grid,
                    float(np.nanmin(values)),
                    float(np.nanmax(values)),
                    fmt=fmt,
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
    for k, method in enumerate(("dssd_paper", "dssd", "oracle", "layerskip")):
        series = part[part["setting"] == method]
        if series.empty:
            continue
        color = OKABE_ITO[k]
        by_eps = series[series["eps"].notna()].groupby("eps")["value"].mean()
        if len(by_eps) > 1 or (len(by_eps) == 1 and method.startswith("dssd")):
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
        no_data(ax)
        return
    ax.set(xlabel="ε (DSSD's one knob)", ylabel=title, title=f"{title} vs ε")
    ax.legend(fontsize=6, loc="best")


@styled
def decoding_summary(res: Results, out_dir: Path) -> list[Path]:
    """Across models: DSSD (at its deployed ε) vs tuned LayerSkip vs the oracle bound."""
    dec = need(
        select(
            res.frame,
            stage="decoding",
            setting=["dssd_paper", "dssd", "layerskip", "oracle"],
            metric=["acceptance_rate", "accepted_per_verification"],
        ),
        "decoding dssd/layerskip rows",
    )
    models = [m for m in res.models if m in set(dec["model"])]
    methods = [m for m in ("dssd_paper", "dssd", "layerskip", "oracle") if m in set(dec["setting"])]
    # The paper's headline compares its own DSSD rule with LayerSkip (results from before the rename: `dssd`).
    paper = "dssd_paper" if "dssd_paper" in methods else "dssd"
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
        if paper in values and "layerskip" in values:
            # The paper's headline number: DSSD's gain over the best manually tuned LayerSkip.
            for xi, d, ls in zip(x, values[paper], values["layerskip"], strict=True):
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
    fig.suptitle("DSSD (at its fastest ε) vs tuned LayerSkip; labels: the paper's DSSD rule ÷ LayerSkip")
    return save(fig, out_dir, "decoding_summary")


# Every figure, in report order: name -> function. `analysis.build` runs them; notebooks pick theirs by name.
