"""The four panels of the sweep report, as tables computed from a sweep's summary (one row or curve per
variant), each naming the analysis figure that draws it, plus the numbers W&B report runs carry:

  1. AUROC of each confidence metric, by model (does entropy separate correct from incorrect exits best?)
  2. Accuracy vs compute for each ε, by model (benchmarks; falls back to token-level agreement)
  3. DSSD vs tuned LayerSkip token acceptance, by model
  4. Compute saving and speedup over `generate` vs model size
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from analysis.data import model_size
from pipeline.orchestration.results import LABELS, normalize
from pipeline.sweep.compare import variant_order


@dataclass
class Panel:
    key: str  # W&B key prefix
    title: str
    description: str
    table: pd.DataFrame  # what the Markdown/HTML report shows (empty: stage not run yet)
    figure: str  # the analysis figure (analysis.plots.FIGURES) drawn for this panel
    wandb_keys: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> {summary key: value}
    wandb_history: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # variant -> rows


def _rows(
    summary: pd.DataFrame, stage: str, metric: str | None = None, prefix: str | None = None
) -> pd.DataFrame:
    sel = summary[summary["stage"] == stage]
    metric_col = sel["metric"].astype(str)
    if metric is not None:
        sel = sel[metric_col == metric]
    if prefix is not None:
        sel = sel[metric_col.str.startswith(prefix)]
    return sel


def params_by_variant(summary: pd.DataFrame) -> dict[str, float]:
    """Parameters per variant: the backbone stage's n_params, else parsed from the model name (NaN)."""
    models = summary.drop_duplicates("variant").set_index("variant")["model"].to_dict()
    return {v: model_size(summary, str(models.get(v, v))) for v in variant_order(summary)}


def _drop_unused_labels(table: pd.DataFrame) -> pd.DataFrame:
    """Label columns that are empty on every line say nothing: leave them out of a panel's table."""
    unused = [c for c in LABELS if c in table and (table[c] == "").all()]
    return table.drop(columns=unused)


# --- panels -----------------------------------------------------------------------------------------------


def auroc_panel(summary: pd.DataFrame) -> Panel:
    rows = _rows(summary, "metrics", "auroc")
    order = variant_order(summary)
    table = pd.DataFrame()
    if not rows.empty:
        table = rows.pivot_table(index="variant", columns="confidence", values="value", aggfunc="mean")
        table = table.reindex([v for v in order if v in table.index])
        table.columns.name = None
    panel = Panel(
        "auroc",
        "AUROC of each confidence metric, by model",
        "Mean over heads of the AUROC separating tokens where the head agrees with the full model "
        "from those where it does not (metrics stage, held-out split). Higher is better. Figure: per "
        "head (the best metric per head in bold).",
        table,
        "confidence_auroc",
    )
    if not table.empty:
        panel.wandb_keys = {
            v: {f"auroc/{m}": float(table.loc[v, m]) for m in table.columns if pd.notna(table.loc[v, m])}
            for v in table.index
        }
    return panel


def accuracy_compute_panel(summary: pd.DataFrame) -> Panel:
    """Benchmark accuracy vs compute fraction per ε (mean over tasks); token-level agreement vs
    layer-equivalents where no benchmark rows exist; calibration accuracy vs coverage as the last resort."""
    acc = _rows(summary, "early_exit", prefix="acc/")
    acc = acc[~acc["metric"].str.startswith("acc_stderr/")]
    compute = _rows(summary, "early_exit", prefix="compute_frac/")
    source, x_label, y_label = "benchmarks (mean over tasks)", "compute fraction", "accuracy"
    if not acc.empty and not compute.empty:
        table = _joined(acc, compute, y_label, x_label)
        full = table["setting"] == "full"
        table.loc[full, x_label] = table.loc[full, x_label].fillna(1.0)
    else:
        token = _rows(summary, "early_exit")
        agree = token[token["metric"] == "agreement"]
        layers = token[token["metric"] == "layer_equiv_per_token"]
        if not agree.empty:
            source, x_label, y_label = (
                "token level (agreement with the full model)",
                "layer-equivalents/token",
                "agreement",
            )
            a, c = agree, layers
        else:
            source, x_label, y_label = (
                "calibration test split (whole exit policy)",
                "coverage (exit fraction)",
                "accuracy",
            )
            cal = _rows(summary, "calibrate")
            cal = cal[
                (cal["head"].astype(str) == "all") & (cal["setting"].fillna("") == "")
            ]  # paper's signal
            a, c = cal[cal["metric"] == "accuracy"], cal[cal["metric"] == "coverage"]
        table = _joined(a, c, y_label, x_label)
    panel = Panel(
        "accuracy_vs_compute",
        "Accuracy vs compute for each ε, by model",
        f"Source: {source}. One point per (model, calibration method, ε); the full model is the reference. "
        "Figure: per benchmark, and token level per KV fill policy.",
        table,
        "accuracy_compute",
    )
    if table.empty:
        return panel
    order = [v for v in variant_order(summary) if v in set(table["variant"])]
    table["variant"] = pd.Categorical(table["variant"], order, ordered=True)
    keys = [c for c in ("variant", *LABELS, "eps") if c in table]
    panel.table = _drop_unused_labels(table.sort_values(keys).reset_index(drop=True))
    curves = panel.table[panel.table["eps"].notna() & panel.table[x_label].notna()]
    y_key = f"{panel.key}/{y_label.replace(' ', '_')}"
    panel.wandb_history = {
        str(variant): [
            {"eps": float(r["eps"]), y_key: float(r[y_label]), f"{panel.key}/x": float(r[x_label])}
            for r in group.sort_values(x_label).to_dict("records")
        ]
        for variant, group in curves.groupby("variant", observed=True)
    }
    return panel


def _joined(y_rows: pd.DataFrame, x_rows: pd.DataFrame, y_label: str, x_label: str) -> pd.DataFrame:
    """Mean y and x per (variant, labels, ε): one line per point of an accuracy-vs-compute curve."""
    keys = ["variant", *LABELS, "eps"]
    y = y_rows.groupby(keys, dropna=False)["value"].mean().rename(y_label)
    x = x_rows.groupby(keys, dropna=False)["value"].mean().rename(x_label)
    return y.to_frame().join(x, how="left").reset_index()


def acceptance_panel(summary: pd.DataFrame) -> Panel:
    rows = _rows(summary, "decoding", "acceptance_rate")
    ratio = _rows(summary, "decoding", "acceptance_ratio")
    table = pd.DataFrame()
    if not rows.empty:
        order = [v for v in variant_order(summary) if v in set(rows["variant"])]
        # The paper's comparison: its own DSSD rule (`dssd_paper`; summaries from before the rename: `dssd`).
        dssd = rows[rows["setting"] == "dssd_paper"]
        dssd = rows[rows["setting"] == "dssd"] if dssd.empty else dssd
        best = dssd.loc[dssd.groupby("variant")["value"].idxmax()] if not dssd.empty else dssd
        table = pd.DataFrame(index=order)
        table["DSSD acceptance (best ε)"] = best.set_index("variant")["value"]
        table["DSSD ε"] = best.set_index("variant")["eps"]
        layerskip = rows[rows["setting"] == "layerskip"].groupby("variant")["value"].max()
        table["LayerSkip acceptance (tuned)"] = layerskip
        if not ratio.empty:
            table["DSSD / LayerSkip (best ε)"] = ratio.groupby("variant")["value"].max()
        table = table.dropna(how="all")
    panel = Panel(
        "acceptance",
        "DSSD vs LayerSkip acceptance, by model size",
        "Accepted / drafted tokens on the evaluation prompts. LayerSkip uses its best (head, draft "
        "length) from the grid on the tuning prompts; DSSD (the paper's rule, `dssd_paper`: every head, "
        "no early stop) is shown at its best ε. The paper reports "
        "1.66× on Pythia 70M–2.8B. Figure: acceptance and accepted tokens per verification, with the "
        "oracle bound.",
        table,
        "decoding_summary",
    )
    if not table.empty:
        panel.wandb_keys = {
            v: {
                k: float(val)
                for k, val in {
                    "acceptance/dssd": table.loc[v].get("DSSD acceptance (best ε)"),
                    "acceptance/layerskip": table.loc[v].get("LayerSkip acceptance (tuned)"),
                    "acceptance/ratio": table.loc[v].get("DSSD / LayerSkip (best ε)"),
                }.items()
                if val is not None and pd.notna(val)
            }
            for v in table.index
        }
    return panel


def speedup_panel(summary: pd.DataFrame) -> Panel:
    rows = _rows(summary, "decoding", "speedup_vs_generate")
    table = pd.DataFrame()
    if not rows.empty:
        params = params_by_variant(summary)
        table = rows.pivot_table(index="variant", columns="setting", values="value", aggfunc="max")
        table.columns.name = None
        table.insert(0, "parameters (M)", [params.get(v, 0.0) / 1e6 for v in table.index])
        table = table.sort_values("parameters (M)")
    panel = Panel(
        "speedup",
        "Speedup over generate vs model size",
        "Wall-clock tokens/s relative to HF `generate` (greedy), best ε for ε-dependent methods. DSSD "
        "and LayerSkip are lossless; early exit is not. Figure: also the compute saving of early exit on "
        "the benchmarks, against model size.",
        table,
        "size_scaling",
    )
    if not table.empty:
        settings = [c for c in table.columns if c != "parameters (M)"]
        panel.wandb_keys = {
            v: {f"speedup/{s}": float(table.loc[v, s]) for s in settings if pd.notna(table.loc[v, s])}
            for v in table.index
        }
    return panel


PANELS: tuple[Callable[[pd.DataFrame], Panel], ...] = (
    auroc_panel,
    accuracy_compute_panel,
    acceptance_panel,
    speedup_panel,
)


def build_panels(summary: pd.DataFrame) -> list[Panel]:
    if summary.empty:
        return [make(normalize(pd.DataFrame(columns=["variant", "job_num"]))) for make in PANELS]
    return [make(summary) for make in PANELS]
