"""The results table: one long table that every stage adds rows to, that each run writes as `results.csv`, and
that sweeps, reports and the analysis notebooks read. This module is its only definition (columns, row
builder, reading, normalising); it needs pandas only, so the torch-free `analysis` package imports it too.

Columns: model, stage, setting, split, confidence, calibration, fill, eps, head, metric, value (then any
stage-specific extra columns, e.g. `layer`, `draft_len`, `best`). `model` and `stage` are filled in by the
runner. The five *label* columns say what a number is about; each has one meaning, "" where it does not apply:

  setting      what was measured in the stage: backbone pretrain; heads trained|logit_lens; early_exit
               full|early_exit; decoding generate|greedy|early_exit|layerskip|layerskip_nobonus|
               dssd_paper (the paper's DSSD rule)|dssd (the improved DSSD: calibrated exit set and adaptive
               draft length)|dssd_tuned|oracle|layerskip_grid|dssd_vs_layerskip
  split        the data split of an extract row: train|validation|test
  confidence   the confidence metric (entropy, max_prob, prob_margin, logit_margin, saturation): the metric
               scored (metrics rows) or the one the exit thresholds are set on (calibrate, early_exit rows)
  calibration  how the exit thresholds were calibrated: empirical|ltt (calibrate and early_exit rows;
               decoding's dssd/early_exit rows where the decoding stage records it)
  fill         the KV-cache fill policy of a token-level early exit: lazy|copy|recompute

`eps` is the target accuracy ε of an exit policy (empty where none). `head` is the head index ("0", "1", ...;
the `layer` column gives the block it reads), "all" for a whole exit policy, empty when not per head.

  stage       labels                                  eps  head  metric
  backbone    setting=pretrain                        -    -     val_ppl, train_seconds, tokens_per_s, ...
  backbone    (none)                                  -    -     n_params
  extract     split=train|validation|test             -    -     tokens, tokens_per_s
  extract     (none)                                  -    -     bytes_per_token
  heads       setting=trained|logit_lens              -    i     kl, agree
  heads       setting=trained                         -    -     train_tokens_per_s, train_seconds
  metrics     confidence=<metric>                     -    i     auroc, aurc (extra column `best`)
  calibrate   calibration, confidence                 e    i     threshold (NaN = head disabled), exit_frac
  calibrate   calibration, confidence                 e    all   accuracy, coverage (test split, whole policy)
              (+ setting=dssd: the improved DSSD's own signal, calibrate.dssd.metric, where it differs)
  early_exit  setting=full                            -    -     acc/<task>, acc_stderr/<task>, ... (lm-eval),
                                                                 compute_frac/<task>; token level: ppl,
                                                                 agreement, layer_equiv_per_token
  early_exit  setting=early_exit, calibration,        e    -     the same benchmark metrics
              confidence                              e    i     exit_frac/<task>
  early_exit  setting=early_exit, calibration,        e    -     agreement, ppl, layer_equiv_per_token,
              confidence, fill                                   compute_frac (token level)
                                                      e    i     exit_frac
  decoding    setting=generate|greedy|early_exit|     e    -     tokens_per_s, speedup_vs_generate,
              layerskip|layerskip_nobonus|dssd_paper|            layer_equiv_per_token, latency_equiv_per_token,
              dssd|dssd_tuned|oracle                             acceptance_rate (accepted / drafted: the paper
                                                                 author's), accepted_per_verification (ours),
                                                                 identical, ...
  decoding    setting=dssd|dssd_tuned                 e    -/i   max_draft, min_chain_prob (γ), tuned_eps
                                                                 (dssd_tuned); consulted (per head)
  decoding    setting=layerskip_grid                  -    i     (extra column `draft_len`) the same metrics,
                                                                 on the tuning prompts
  decoding    setting=dssd_vs_layerskip               e    -     acceptance_ratio, accepted_per_verification_ratio,
                                                                 layer_equiv_ratio, latency_equiv_ratio, speed_ratio
  decoding    setting=sampled_<method> (greedy|       e    -/i   decoding.sampling, T > 0 (extra column
              layerskip|layerskip_nobonus|dssd_paper|            `temperature`): the same metrics without
              dssd|layerskip_grid|dssd_vs_layerskip)             `identical` (exact in distribution, not per token),
                                                                 speedup_vs_greedy instead of speedup_vs_generate

The greedy rows (T = 0) carry no `temperature` (empty); sampled rows carry it and a `sampled_` setting, so a
reader that picks today's settings by name never mixes temperatures.

Tables written before these columns existed (cached stage outputs in the store, old runs and sweep summaries)
carry a single `method` column; `normalize` spreads it over the label columns stage by stage (`from_legacy`),
renaming the settings renamed since (`RENAMED_SETTINGS`: their `dssd` was the paper's rule, `dssd_paper` now).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

LABELS = ["setting", "split", "confidence", "calibration", "fill"]
COLUMNS = ["model", "stage", *LABELS, "eps", "head", "metric", "value"]
RESULTS_FILE = "results.csv"
FILLS = ("lazy", "copy", "recompute")
# Extra columns that hold numbers (written as floats when a stage mixes them with empty cells).
NUMERIC_EXTRAS = ("layer", "draft_len", "temperature")


def row(
    metric: str,
    value: float,
    *,
    setting: str = "",
    split: str = "",
    confidence: str = "",
    calibration: str = "",
    fill: str = "",
    eps: float | None = None,
    head: int | str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result row; `model` and `stage` are filled in by the runner. Labels: see the module docstring."""
    labels = {"setting": setting, "split": split, "confidence": confidence, "calibration": calibration}
    return {
        **labels,
        "fill": fill,
        "eps": eps,
        "head": head,
        "metric": metric,
        "value": float(value),
        **extra,
    }


def head_label(value: Any) -> str | None:
    """Head indices as "0", "1", ... (never "0.0", which a float column or a CSV round trip with empty cells
    makes of them), "all" for a whole policy, None when not per head."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if text in ("", "nan", "<NA>", "None"):
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


# The stages whose old `method` column had a single meaning, and the label column it became.
LEGACY_METHOD_COLUMN = {
    "backbone": "setting",
    "extract": "split",
    "heads": "setting",
    "metrics": "confidence",
    "calibrate": "calibration",
    "decoding": "setting",
}


# Settings renamed since the `method` format, per stage: old name -> current name. Issue 14 made `dssd` the
# improved DSSD; the paper's rule, which old tables call `dssd`, is `dssd_paper`.
RENAMED_SETTINGS = {"decoding": {"dssd": "dssd_paper"}}


def from_legacy(frame: pd.DataFrame) -> pd.DataFrame:
    """A table in the format before the label columns (one `method` column) in the current format. Its
    early_exit rows are the only ones whose `method` meant three things: `full`, a KV fill (those rows also
    carried a `calibration` column), or a calibration method."""
    if "method" not in frame:
        return frame
    frame = frame.copy()
    method = frame.pop("method").astype("string").fillna("")
    for column in LABELS:
        frame[column] = frame[column].astype("string").fillna("") if column in frame else ""
    stage = (
        frame["stage"].astype("string").fillna("") if "stage" in frame else pd.Series("", index=frame.index)
    )
    for name in stage.unique():
        rows = stage == name
        if name == "early_exit":
            fill, full = rows & method.isin(FILLS), rows & (method == "full")
            calibrated = rows & ~fill & ~full & (method != "")
            frame.loc[fill, "fill"] = method[fill]
            frame.loc[full, "setting"] = "full"
            frame.loc[calibrated, "calibration"] = method[calibrated]
            frame.loc[fill | calibrated, "setting"] = "early_exit"
        else:
            column = LEGACY_METHOD_COLUMN.get(name, "setting")
            frame.loc[rows, column] = method[rows].replace(RENAMED_SETTINGS.get(name, {}))
    return frame


def normalize(frame: pd.DataFrame) -> pd.DataFrame:
    """One schema whatever the table came from (rows, results.csv, a summary's CSV or parquet, an old-format
    file): string model/stage/metric, labels as strings ("" when not applicable), heads as `head_label`,
    float eps/value. Columns in front of the results columns (a summary's job columns) stay in front."""
    frame = from_legacy(frame)
    leading = []
    for column in frame.columns:
        if column in COLUMNS:
            break
        leading.append(column)
    frame = frame.copy()
    for column in COLUMNS:
        if column not in frame:
            frame[column] = pd.NA
    for column in ("model", "stage", "metric"):
        frame[column] = frame[column].astype("string")
    for column in LABELS:
        frame[column] = frame[column].astype("string").fillna("")
    frame["head"] = frame["head"].map(head_label).astype("string")
    for column in ("eps", "value", *NUMERIC_EXTRAS):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    rest = [c for c in frame.columns if c not in COLUMNS and c not in leading]
    return frame[leading + COLUMNS + rest].reset_index(drop=True)


def to_frame(
    rows: Iterable[dict[str, Any]], model: str | None = None, stage: str | None = None
) -> pd.DataFrame:
    """A stage's rows as a results table (`model` and `stage` set when given)."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return normalize(pd.DataFrame(columns=COLUMNS))
    if model is not None:
        frame["model"] = model
    if stage is not None:
        frame["stage"] = stage
    if "method" in frame:
        log.warning(
            "stage %s: rows use the old `method` keyword; pass setting/split/confidence/calibration/fill "
            "instead (pipeline/orchestration/results.py). Converted by stage for now.",
            stage,
        )
    return normalize(frame)


def read_results(path: str | Path) -> pd.DataFrame:
    """A `results.csv` (or a summary CSV/parquet), normalised."""
    path = Path(path)
    return normalize(pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path))


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(frame: pd.DataFrame, title: str = "results", max_rows: int = 80) -> None:
    """A compact summary: one line per (model, stage, labels, metric) with the value, or the range over
    eps/head when there are several. Only the label columns some row uses are shown."""
    from rich.console import Console
    from rich.table import Table

    if frame.empty:
        Console().print(f"[bold]{title}[/bold]: no rows")
        return
    frame = normalize(frame)
    labels = [c for c in LABELS if (frame[c] != "").any()]
    keys = ["model", "stage", *labels, "metric"]
    grouped = frame.groupby(keys, sort=False)["value"].agg(["count", "min", "median", "max"]).reset_index()
    table = Table(title=f"{title} ({len(frame)} rows; full table in results.csv)")
    numbers = ["n", "value (median)", "min", "max"]
    for column in keys + numbers:
        table.add_column(column, justify="right" if column in numbers else "left")
    for record in grouped.head(max_rows).to_dict("records"):
        single = record["count"] == 1
        table.add_row(
            *(_fmt(record[k]) for k in keys),
            str(record["count"]),
            _fmt(record["median"]),
            "" if single else _fmt(record["min"]),
            "" if single else _fmt(record["max"]),
        )
    if len(grouped) > max_rows:
        table.caption = f"... {len(grouped) - max_rows} more groups in results.csv"
    Console(width=160).print(table)
