"""Accuracy against compute (early_exit stage) and compute saving / speedup against model size."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from analysis.data import Results, model_size, select, tasks
from analysis.plots.speculative import decoding_point
from analysis.plots.style import (
    CALIBRATIONS,
    FULL_COLOR,
    LINESTYLES,
    MARKERS,
    OKABE_ITO,
    SkipFigure,
    eps_annotations,
    label,
    need,
    new_figure,
    no_data,
    ordered,
    save,
    styled,
)

FILLS = ["lazy", "copy", "recompute"]  # the KV fill policies of token-level early exit, in legend order
TASK_METRICS = ["acc", "acc_norm", "exact_match"]  # a benchmark's headline score, first one present
DECODING_SETTINGS = ["greedy", "early_exit", "layerskip", "dssd"]  # decoding settings compared across sizes


@styled
def accuracy_compute(res: Results, out_dir: Path) -> list[Path]:
    """Benchmark accuracy against the fraction of the full model's compute, one point per ε, per model×task;
    plus token-level agreement vs layer-equivalents per token for each KV-cache strategy."""
    ee = need(select(res.frame, stage="early_exit"), "early_exit rows")
    task_names = sorted({t for name in TASK_METRICS for t in tasks(ee, name)})
    token_level = ee[ee["fill"] != ""]
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
        no_data(ax)
        return
    acc = rows[rows["metric"] == f"{name}/{task}"]
    compute = rows[rows["metric"] == f"compute_frac/{task}"]
    full = acc[acc["setting"] == "full"]["value"]
    if len(full):
        stderr = rows[(rows["setting"] == "full") & (rows["metric"] == f"{name}_stderr/{task}")]["value"]
        ax.axhline(full.mean(), color=FULL_COLOR, linestyle=":", label=label("full"))
        if len(stderr) and np.isfinite(stderr.mean()):
            ax.axhspan(
                full.mean() - stderr.mean(),
                full.mean() + stderr.mean(),
                color=FULL_COLOR,
                alpha=0.15,
                linewidth=0,
            )
    for k, method in enumerate(ordered(acc.loc[acc["setting"] != "full", "calibration"], first=CALIBRATIONS)):
        a = acc[acc["calibration"] == method].groupby("eps")["value"].mean()
        c = compute[compute["calibration"] == method].groupby("eps")["value"].mean()
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
            eps_annotations(
                ax, joined["compute"].to_numpy(), joined["acc"].to_numpy(), joined.index.to_numpy()
            )
    ax.set(xlabel="compute (fraction of full model)", ylabel=name)


def _token_level_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Token-level rows (those with a KV fill) of one calibration method, empirical first, and its name (""
    when the rows name none): mixing methods at one ε would average two exit policies."""
    token = rows[rows["fill"] != ""]
    calibrations = ordered(token["calibration"], first=CALIBRATIONS)
    if not calibrations:
        return token, ""
    return token[token["calibration"] == calibrations[0]], calibrations[0]


def _token_level_panel(ax: Axes, rows: pd.DataFrame) -> None:
    """Agreement vs layer-equivalents per KV fill strategy, with the full model as a reference star."""
    token, _ = _token_level_rows(rows)
    full = rows[(rows["setting"] == "full") & rows["metric"].isin(["agreement", "layer_equiv_per_token"])]
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
    for k, fill in enumerate(f for f in FILLS if f in set(token["fill"])):
        part = token[token["fill"] == fill]
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
            label=label(fill),
        )
        if k == 0:
            eps_annotations(
                ax,
                joined["layer_equiv_per_token"].to_numpy(),
                joined["agreement"].to_numpy(),
                joined.index.to_numpy(),
            )
    if len(ax.lines) <= 1:  # the full-model star alone is not a comparison
        ax.cla()
        no_data(ax)
        return
    ax.set(xlabel="layer-equivalents per token", ylabel="token agreement with full model")


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
        & (ee["setting"] != "full")
    ]
    if not saving.empty:
        method = ordered(saving["calibration"], first=CALIBRATIONS)[0]
        saving = saving[saving["calibration"] == method]
        panels.append(
            (f"early exit, benchmarks ({label(method)})", lambda ax: _saving_by_eps(ax, saving, sizes))
        )
    if not dec.empty:
        if {"greedy"} <= set(dec["setting"]) and (dec["metric"] == "layer_equiv_per_token").any():
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
    for k, setting in enumerate(s for s in DECODING_SETTINGS if s in set(rows["setting"])):
        if what == "layer_equiv_saving" and setting == "greedy":
            continue
        y = []
        for model in models:
            mrows = rows[rows["model"] == model]
            point, _ = decoding_point(mrows, setting)
            if what == "layer_equiv_saving":
                greedy, _ = decoding_point(mrows, "greedy")
                value = 1.0 - point.get("layer_equiv_per_token", np.nan) / greedy.get(
                    "layer_equiv_per_token", np.nan
                )
            else:
                value = point.get(what, np.nan)
            y.append(value)
        ax.plot(
            x, y, marker=MARKERS[k % 6], linestyle=LINESTYLES[k % 4], color=OKABE_ITO[k], label=label(setting)
        )
    if what == "speedup_vs_generate":
        ax.axhline(1.0, color=FULL_COLOR, linestyle=":", linewidth=1.0)
        ax.set_ylabel("speedup (×)")
    else:
        ax.set_ylabel("1 − layer-equivalents / greedy's")
    _name_ticks(ax, sizes, models, x)
