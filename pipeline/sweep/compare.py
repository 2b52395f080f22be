"""Comparing the variants of a sweep: a few key numbers side by side, one column per variant (a model, plus
the other swept values when they distinguish jobs), ordered by model size. Printed after every sweep."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from analysis.data import model_size


def variant_order(summary: pd.DataFrame) -> list[str]:
    """Variants by model size (the backbone stage's n_params, else parsed from the model name; unknown sizes
    last), then by job number."""
    if summary.empty:
        return []
    variants = summary.drop_duplicates("variant")[["variant", "model", "job_num"]]
    keyed = []
    for record in variants.itertuples():
        size = model_size(summary, str(record.model))
        keyed.append((math.isnan(size), 0.0 if math.isnan(size) else size, record.job_num, record.variant))
    return [variant for *_, variant in sorted(keyed)]


@dataclass(frozen=True)
class Selector:
    """One line of the comparison: the rows of a stage and metric whose label columns match, reduced per
    variant. Labels (setting, split, confidence, calibration, fill) are those of
    pipeline/orchestration/results.py; a label left None matches any value."""

    label: str
    stage: str
    metric: str
    setting: str | None = None
    split: str | None = None
    confidence: str | None = None
    calibration: str | None = None
    eps: float | None = None  # None: any ε; otherwise the present ε closest to it
    head: str | None = None  # None: any head
    reduce: str = "mean"  # mean | max | min over the matching rows (heads, tasks, ε)
    metric_prefix: bool = False  # metric is a prefix (acc/<task>: mean over tasks)
    scale: float = 1.0  # shown value = value × scale

    def pick(self, frame: pd.DataFrame) -> pd.Series:
        sel = frame[frame["stage"] == self.stage]
        metric = sel["metric"].astype(str)
        sel = sel[metric.str.startswith(self.metric) if self.metric_prefix else metric == self.metric]
        labels = {
            "setting": self.setting,
            "split": self.split,
            "confidence": self.confidence,
            "calibration": self.calibration,
        }
        for column, wanted in labels.items():
            if wanted is not None:
                sel = sel[sel[column] == wanted]
        if self.head is not None:
            sel = sel[sel["head"] == self.head]
        if self.eps is not None and not sel.empty:
            eps = pd.to_numeric(sel["eps"], errors="coerce")
            if eps.notna().any():
                present = eps.dropna().unique()
                sel = sel[eps == present[abs(present - self.eps).argmin()]]
        if sel.empty:
            return pd.Series(dtype=float)
        return sel.groupby("variant")["value"].agg(self.reduce) * self.scale


# The numbers a reader wants side by side first; stages that have not run simply leave their lines out.
COMPARISON: tuple[Selector, ...] = (
    Selector("parameters (M)", "backbone", "n_params", setting="", scale=1e-6),
    Selector("extraction bytes/token", "extract", "bytes_per_token", split=""),
    Selector("head KL to full model (mean over heads)", "heads", "kl", setting="trained"),
    Selector("head agreement with full model (mean)", "heads", "agree", setting="trained"),
    Selector("AUROC entropy (mean over heads)", "metrics", "auroc", confidence="entropy"),
    Selector("AUROC max_prob (mean over heads)", "metrics", "auroc", confidence="max_prob"),
    Selector(
        "calibrated accuracy @ε≈0.9 (empirical)",
        "calibrate",
        "accuracy",
        calibration="empirical",
        eps=0.9,
        head="all",
        setting="",  # the paper's signal (setting=dssd: the improved DSSD's own)
    ),
    Selector(
        "calibrated coverage @ε≈0.9 (empirical)",
        "calibrate",
        "coverage",
        calibration="empirical",
        eps=0.9,
        head="all",
        setting="",  # the paper's signal (setting=dssd: the improved DSSD's own)
    ),
    Selector(
        "benchmark accuracy, full model (mean over tasks)",
        "early_exit",
        "acc/",
        setting="full",
        metric_prefix=True,
    ),
    Selector(
        "benchmark accuracy @ε≈0.9 (mean over tasks)",
        "early_exit",
        "acc/",
        setting="early_exit",
        calibration="empirical",
        eps=0.9,
        metric_prefix=True,
    ),
    Selector(
        "compute fraction @ε≈0.9 (mean over tasks)",
        "early_exit",
        "compute_frac/",
        setting="early_exit",
        calibration="empirical",
        eps=0.9,
        metric_prefix=True,
    ),
    Selector("DSSD acceptance rate (best ε)", "decoding", "acceptance_rate", setting="dssd", reduce="max"),
    Selector(
        "LayerSkip acceptance rate (tuned)", "decoding", "acceptance_rate", setting="layerskip", reduce="max"
    ),
    Selector(
        "DSSD / LayerSkip acceptance (best ε)",
        "decoding",
        "acceptance_ratio",
        setting="dssd_vs_layerskip",
        reduce="max",
    ),
    Selector(
        "DSSD speedup vs generate (best ε)", "decoding", "speedup_vs_generate", setting="dssd", reduce="max"
    ),
    Selector(
        "LayerSkip speedup vs generate", "decoding", "speedup_vs_generate", setting="layerskip", reduce="max"
    ),
)


def comparison(summary: pd.DataFrame, selectors: Sequence[Selector] = COMPARISON) -> pd.DataFrame:
    """Key numbers, one row per selector, one column per variant (ordered by model size)."""
    order = variant_order(summary)
    rows = {}
    for selector in selectors:
        values = selector.pick(summary)
        if not values.empty:
            rows[selector.label] = values
    if not rows:
        return pd.DataFrame(columns=order)
    return pd.DataFrame(rows).T.reindex(columns=order)


def print_comparison(table: pd.DataFrame, jobs: pd.DataFrame | None = None, title: str = "sweep") -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=200)
    if jobs is not None and not jobs.empty:
        missing = jobs[jobs["status"] != "ok"]
        console.print(
            f"[bold]{escape(title)}[/bold]: {len(jobs)} job(s), {len(jobs) - len(missing)} with results"
            + (f"; missing: {escape(', '.join(missing['job']))}" if len(missing) else "")
        )
    if table.empty:
        console.print("no comparable rows yet")
        return
    out = Table(title=f"{escape(title)}: comparison across models", caption="full table: summary.csv")
    out.add_column("")
    for variant in table.columns:
        out.add_column(escape(str(variant)), justify="right")  # "tiny [heads=mlp]" is not rich markup
    for label, values in table.iterrows():
        out.add_row(escape(str(label)), *("" if pd.isna(v) else f"{v:.4g}" for v in values))
    console.print(out)
