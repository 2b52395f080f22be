"""The sampling figure (decoding stage, `decoding.sampling` with a temperature > 0): acceptance and speed-up
against temperature, DSSD against LayerSkip, per model.

T = 0 is the greedy run (settings `greedy`, `dssd_paper`, ...); T > 0 the sampled runs (settings
`sampled_<method>`, column `temperature`: pipeline/evaluation/decoding_sampled.py). LayerSkip is the (head, d)
tuned at each temperature; each DSSD row stays at one ε, the one `pick_eps` deploys at T = 0, so that only the
temperature changes along a line. Speed-up is over greedy decoding at the same temperature (ancestral
sampling from the full model at T > 0): solid, latency-equivalents per token (deterministic; docs/design.md
§2); dashed, measured tokens/s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.data import Results, select, slug
from analysis.plots.speculative import pick_eps
from analysis.plots.style import MARKERS, OKABE_ITO, SkipFigure, label, model_title, new_figure, save, styled

SAMPLED = "sampled_"  # pipeline.evaluation.decoding_rows.SAMPLED_PREFIX (analysis imports no torch code)
METHODS = ("dssd_paper", "dssd", "layerskip")  # DSSD against the LayerSkip tuned per temperature
# What the figure reads, and what `pick_eps` chooses the deployed ε by.
METRICS = [
    "acceptance_rate",
    "latency_equiv_per_token",
    "tokens_per_s",
    "speedup_vs_generate",
    "accepted_per_verification",
]


def temperature_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One model's decoding rows -> one line per method × temperature: acceptance_rate and the speed-ups over
    greedy at the same temperature (`latency_speedup`, `measured_speedup`) and the ε (NaN for LayerSkip)."""
    rows = rows[rows["head"].isna()]
    temperature = rows["temperature"] if "temperature" in rows else pd.Series(np.nan, index=rows.index)
    out = []
    for method in METHODS:
        eps = pick_eps(rows[rows["setting"] == method])
        for t, part in rows.groupby(temperature.fillna(0.0)):
            sampled = t > 0
            mine = part[part["setting"] == (SAMPLED + method if sampled else method)]
            greedy = part[part["setting"] == (SAMPLED + "greedy" if sampled else "greedy")]
            if not np.isnan(eps):
                mine = mine[(mine["eps"] - eps).abs() < 1e-9]
            if mine.empty or greedy.empty:
                continue
            m = mine.groupby("metric")["value"].mean()
            g = greedy.groupby("metric")["value"].mean()
            out.append(
                {
                    "method": method,
                    "eps": eps,
                    "temperature": float(t),
                    "acceptance_rate": m.get("acceptance_rate", np.nan),
                    "latency_speedup": g.get("latency_equiv_per_token", np.nan)
                    / m.get("latency_equiv_per_token", np.nan),
                    "measured_speedup": m.get("tokens_per_s", np.nan) / g.get("tokens_per_s", np.nan),
                }
            )
    columns = ["method", "eps", "temperature", "acceptance_rate", "latency_speedup", "measured_speedup"]
    return pd.DataFrame(out, columns=columns).sort_values(["method", "temperature"]).reset_index(drop=True)


@styled
def decoding_sampling(res: Results, out_dir: Path) -> list[Path]:
    """Per model with sampled rows: acceptance rate (left) and speed-up over greedy (right) vs temperature."""
    frame = res.frame
    if "temperature" not in frame or not (frame["temperature"] > 0).any():
        raise SkipFigure("no sampled decoding rows (decoding.sampling lists no temperature > 0)")
    settings = [*METHODS, "greedy"]
    dec = select(frame, stage="decoding", setting=settings + [SAMPLED + s for s in settings], metric=METRICS)
    paths: list[Path] = []
    for model in res.models:
        table = temperature_table(dec[dec["model"] == model])
        if table.empty or not (table["temperature"] > 0).any():
            continue
        fig, axes = new_figure(1, 2, 3.4, 2.6)
        for k, (method, part) in enumerate(table.groupby("method", sort=False)):
            color, marker = OKABE_ITO[k % len(OKABE_ITO)], MARKERS[k % len(MARKERS)]
            eps = part["eps"].iloc[0]
            name = label(method) + (f" ε={eps:g}" if np.isfinite(eps) else "")
            t = part["temperature"].to_numpy(np.float64)
            axes[0, 0].plot(t, part["acceptance_rate"], color=color, marker=marker, label=name)
            axes[0, 1].plot(t, part["latency_speedup"], color=color, marker=marker, label=name)
            axes[0, 1].plot(
                t, part["measured_speedup"], color=color, marker=marker, linestyle="--", alpha=0.6
            )
        axes[0, 0].set(xlabel="temperature", title="acceptance rate (accepted / drafted)", ylim=(0, 1.05))
        axes[0, 1].axhline(1.0, color="grey", linewidth=0.8)
        axes[0, 1].set(
            xlabel="temperature",
            title="speed-up over greedy at T\n(solid: latency-eq per token; dashed: tokens/s)",
        )
        axes[0, 0].legend(fontsize=6, loc="best")
        fig.suptitle(f"{model_title(res, model)}: speculative sampling, LayerSkip re-tuned per T")
        paths += save(fig, out_dir, f"decoding_sampling_{slug(model)}")
    if not paths:
        raise SkipFigure("no model has sampled decoding rows with a greedy reference")
    return paths
