"""The results table: one long table (model, stage, method, eps, head, metric, value) that every stage adds
rows to, that each run writes as `results.csv`, and that sweeps, reports and notebooks read.

Row vocabulary (the contract between stages, the sweep summary, the report and the notebooks). `head` is the
head index (0..n_heads-1, the `layer` column gives its block index) or "all" for a whole exit policy:

  stage       method                              eps   head   metric
  backbone    pretrain                            -     -      val_ppl, train_seconds, tokens_per_s, ...
  backbone    ""                                  -     -      n_params
  extract     train|validation|test               -     -      tokens, tokens_per_s
  extract     ""                                  -     -      bytes_per_token
  heads       trained|logit_lens                  -     i      kl, agree
  heads       trained                             -     -      train_tokens_per_s, train_seconds
  metrics     <metric name> (entropy, ...)        -     i      auroc
  calibrate   empirical|ltt                       e     i      threshold (NaN = head disabled), exit_frac
  calibrate   empirical|ltt                       e     all    accuracy, coverage (test split, whole policy)
  early_exit  full|<calibration method>           e     -      acc/<task>, acc_stderr/<task>,
                                                               compute_frac/<task>
  early_exit  full|<calibration method>           e     i      exit_frac/<task>
  early_exit  lazy|copy|recompute                 e     -      agreement, ppl, layer_equiv_per_token (token level)
  decoding    generate|greedy|dssd|early_exit     e     -      tokens_per_s, speedup_vs_generate,
              |layerskip|oracle                                layer_equiv_per_token, acceptance_rate,
                                                               accepted_per_verification, identical
  decoding    layerskip_grid                      -     i      (extra column `draft_len`) same metrics, on the
                                                               tuning prompts
  decoding    dssd_vs_layerskip                   e     -      acceptance_ratio, accepted_per_verification_ratio
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

COLUMNS = ["model", "stage", "method", "eps", "head", "metric", "value"]
RESULTS_FILE = "results.csv"


def row(
    metric: str,
    value: float,
    *,
    method: str = "",
    eps: float | None = None,
    head: int | str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result row; `model` and `stage` are filled in by the runner."""
    return {"method": method, "eps": eps, "head": head, "metric": metric, "value": float(value), **extra}


def to_frame(
    rows: Iterable[dict[str, Any]], model: str | None = None, stage: str | None = None
) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    if model is not None:
        frame["model"] = model
    if stage is not None:
        frame["stage"] = stage
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    frame["head"] = frame["head"].map(_head_label)
    extra = [c for c in frame.columns if c not in COLUMNS]
    return frame[COLUMNS + extra]


def _head_label(head: Any) -> str | None:
    """Head indices as "0", "1", ... (never "0.0"), "all" for a whole policy, None when not per head."""
    if head is None or (isinstance(head, float) and math.isnan(head)):
        return None
    if isinstance(head, int | float) and not isinstance(head, bool):
        return str(int(head))
    return str(head)


def read_results(path: str | Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    for column in ("method", "head"):
        if column in frame:
            frame[column] = frame[column].astype("string")
    return frame


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(frame: pd.DataFrame, title: str = "results", max_rows: int = 80) -> None:
    """A compact summary: one line per (model, stage, method, metric) with the value, or the range over
    eps/head when there are several."""
    from rich.console import Console
    from rich.table import Table

    if frame.empty:
        Console().print(f"[bold]{title}[/bold]: no rows")
        return
    grouped = (
        frame.fillna({"method": ""})
        .groupby(["model", "stage", "method", "metric"], sort=False)["value"]
        .agg(["count", "min", "median", "max"])
        .reset_index()
    )
    table = Table(title=f"{title} ({len(frame)} rows; full table in results.csv)")
    for column in ["model", "stage", "method", "metric", "n", "value (median)", "min", "max"]:
        table.add_column(
            column, justify="right" if column in ("n", "value (median)", "min", "max") else "left"
        )
    for record in grouped.head(max_rows).itertuples(index=False):
        single = record.count == 1
        table.add_row(
            record.model,
            record.stage,
            _fmt(record.method),
            record.metric,
            str(record.count),
            _fmt(record.median),
            "" if single else _fmt(record.min),
            "" if single else _fmt(record.max),
        )
    if len(grouped) > max_rows:
        table.caption = f"... {len(grouped) - max_rows} more groups in results.csv"
    Console(width=160).print(table)
