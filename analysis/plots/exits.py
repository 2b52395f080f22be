"""Exit-policy figures: the calibration of ε (calibrate stage) and where tokens exit as ε varies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from analysis.data import Results, head_labels, per_head, select, slug
from analysis.plots.style import (
    CALIBRATIONS,
    FULL_COLOR,
    LINESTYLES,
    OKABE_ITO,
    SkipFigure,
    label,
    model_title,
    new_figure,
    no_data,
    ordered,
    save,
    styled,
)


@styled
def calibration(res: Results, out_dir: Path) -> list[Path]:
    """Per model: exit fraction per head vs ε, realized vs target accuracy, and thresholds, empirical vs LTT."""
    cal = select(res.frame, stage="calibrate", setting="")  # the paper's signal (setting=dssd: DSSD's own)
    paths: list[Path] = []
    for model in res.models:
        rows = cal[(cal["model"] == model) & cal["eps"].notna()]
        if rows.empty:
            continue
        methods = ordered(rows["calibration"], first=CALIBRATIONS)
        labels = head_labels(rows)
        fig, axes = new_figure(1, 3, 3.0, 2.5)
        ax_cov, ax_acc, ax_thr = axes[0]
        style = {m: LINESTYLES[k % 4] for k, m in enumerate(methods)}
        for method in methods:
            mrows = rows[rows["calibration"] == method]
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
        # Colour = head and line style = calibration method: one legend entry per head and per method.
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
    """Fraction of tokens exiting at each head per (model, calibration, eps): the calibrate stage's `exit_frac` rows
    or, without them, the early_exit stage's `exit_frac/<task>` averaged over tasks."""
    rows = per_head(
        select(res.frame, stage="calibrate", metric="exit_frac", setting="")
    )  # the paper's signal
    if rows.empty:
        ee = select(res.frame, stage="early_exit")
        ee = ee[ee["metric"].str.startswith("exit_frac/").fillna(False)]
        rows = per_head(ee)
    rows = rows[rows["eps"].notna()]
    if rows.empty:
        return pd.DataFrame(columns=["model", "calibration", "eps", "head_idx", "value"])
    return rows.groupby(["model", "calibration", "eps", "head_idx"], as_index=False)["value"].mean()


@styled
def exit_distribution(res: Results, out_dir: Path) -> list[Path]:
    """Where tokens exit as ε varies: stacked fractions per head, the rest reaching the full model."""
    fractions = exit_fractions(res)
    if fractions.empty:
        raise SkipFigure("no exit_frac rows (calibrate or early_exit)")
    models = [m for m in res.models if m in set(fractions["model"])]
    methods = ordered(fractions["calibration"], first=CALIBRATIONS)
    fig, axes = new_figure(len(methods), len(models), 2.9, 2.2)
    heads = sorted(fractions["head_idx"].unique())
    for i, method in enumerate(methods):
        for j, model in enumerate(models):
            ax = axes[i, j]
            part = fractions[(fractions["model"] == model) & (fractions["calibration"] == method)]
            if part.empty:
                no_data(ax)
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
