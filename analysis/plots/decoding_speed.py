"""The decoding speed figure (decoding stage): every lossless method's tokens/s relative to our greedy decoding
(= 1), next to its compute per token relative to greedy's, per model.

Methods: `dssd_paper` (the paper's rule) and `dssd` (the improved DSSD: calibrated exit set and adaptive
draft length), each at its fastest ε; `dssd_tuned`; the tuned LayerSkip; LayerSkip without the bonus token
(the paper author's baseline); DSSD with a perfect confidence gate (an analysis bound: what any signal could
reach with these heads). The right panel's dashed line is the issue-14 waste bound: FLOP
layer-equivalents per token at most 1.15 × greedy's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.data import Results, select, slug
from analysis.plots.speculative import decoding_point
from analysis.plots.style import (
    FULL_COLOR,
    OKABE_ITO,
    SkipFigure,
    model_title,
    need,
    new_figure,
    save,
    styled,
)

METHODS = {  # setting -> display name
    "dssd_paper": "DSSD, paper's rule",
    "dssd": "DSSD (exit set + γ)",
    "dssd_tuned": "DSSD tuned",
    "layerskip": "LayerSkip tuned",
    "layerskip_nobonus": "LayerSkip, no bonus",
    "dssd_perfect_gate": "DSSD, perfect gate\n(bound)",
}
WASTE_BOUND = 1.15  # FLOP layer-equivalents per token, × greedy's (issue 14's bound)


def speed_ratios(rows: pd.DataFrame) -> pd.DataFrame:
    """One model's decoding rows -> per method: tokens/s and FLOP layer-equivalents per token over greedy's,
    and the ε the method ran at (NaN for methods without one); methods without rows are left out."""
    greedy, _ = decoding_point(rows, "greedy")
    base_speed, base_cost = greedy.get("tokens_per_s", np.nan), greedy.get("layer_equiv_per_token", np.nan)
    out = []
    for method in METHODS:
        if not (rows["setting"] == method).any():
            continue
        point, eps = decoding_point(rows, method)
        out.append(
            {
                "method": method,
                "eps": eps,
                "speed_ratio": point.get("tokens_per_s", np.nan) / base_speed,
                "layer_equiv_ratio": point.get("layer_equiv_per_token", np.nan) / base_cost,
            }
        )
    return pd.DataFrame(out, columns=["method", "eps", "speed_ratio", "layer_equiv_ratio"])


@styled
def decoding_speed(res: Results, out_dir: Path) -> list[Path]:
    """Per model: tokens/s ÷ greedy's (left) and FLOP layer-equivalents per token ÷ greedy's (right)."""
    dec = need(
        select(
            res.frame,
            stage="decoding",
            setting=["greedy", *METHODS],
            metric=[
                "tokens_per_s",
                "speedup_vs_generate",
                "layer_equiv_per_token",
                "accepted_per_verification",
            ],
        ),
        "decoding speed rows",
    )
    paths: list[Path] = []
    for model in res.models:
        table = speed_ratios(dec[dec["model"] == model])
        if table.empty or not (dec[dec["model"] == model]["setting"] == "greedy").any():
            continue
        fig, axes = new_figure(1, 2, max(3.2, 0.55 * len(table) + 1.4), 2.8)
        x = np.arange(len(table))
        names = [
            METHODS[m] + (f"\nε={e:g}" if np.isfinite(e) and m != "dssd_tuned" else "")
            for m, e in zip(table["method"], table["eps"], strict=True)
        ]
        for ax, column, title, bound in (
            (axes[0, 0], "speed_ratio", "tokens/s ÷ greedy's", None),
            (axes[0, 1], "layer_equiv_ratio", "FLOP layer-eq / token ÷ greedy's", WASTE_BOUND),
        ):
            values = table[column].to_numpy(dtype=np.float64)
            ax.bar(x, values, color=[OKABE_ITO[k % len(OKABE_ITO)] for k in range(len(table))], width=0.7)
            for xi, v in zip(x, values, strict=True):
                if np.isfinite(v):
                    ax.annotate(
                        f"{v:.2f}",
                        (xi, v),
                        textcoords="offset points",
                        xytext=(0, 2),
                        ha="center",
                        fontsize=6,
                    )
            ax.axhline(1.0, color=FULL_COLOR, linewidth=0.8, label="greedy = 1")
            if bound is not None:
                ax.axhline(
                    bound, color=FULL_COLOR, linestyle="--", linewidth=0.8, label=f"{bound:g} × greedy"
                )
            ax.set_xticks(x, names, rotation=30, ha="right", fontsize=6)
            ax.set(title=title)
            ax.grid(False, axis="x")
            ax.margins(y=0.15)
            ax.legend(fontsize=6, loc="best")
        fig.suptitle(
            f"{model_title(res, model)}: lossless decoding against greedy (DSSD rows at their fastest ε)"
        )
        paths += save(fig, out_dir, f"decoding_speed_{slug(model)}")
    if not paths:
        raise SkipFigure("no decoding speed rows with a greedy reference")
    return paths
