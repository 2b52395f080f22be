"""Stage `calibrate`: exit thresholds[method][ε][head] on the validation split, then the realized accuracy and
coverage of the whole exit policy per method and ε on the test split (disjoint).

Two signals (docs/design.md §1.6): `calibrate.metric`, the paper's (entropy by default: early exit and the
paper's DSSD, `dssd_paper`), is calibrated into `thresholds.json`; `calibrate.dssd.metric`, the improved DSSD's
(a cheap pruned signal by default: rows `dssd`, `dssd_tuned`), into `dssd_thresholds.json` with DSSD's
per-draft accuracy and exit sets. When both name the same signal there is one file, `thresholds.json`, holding
both. `load_calibration(entry)` reads either layout. Both signals' rows are reported (`confidence` = the
signal); the improved DSSD's own signal's rows also carry `setting=dssd`, so readers of the paper's
calibration (figures, sweep comparison) select `setting=""`.

A pruned signal (`logit_margin@top512`, or `logit_margin@top12.5%` of the vocabulary) is calibrated on the
heads' view over the K most frequent train tokens; that candidate set is saved with its thresholds, so
decoding uses exactly it."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from pipeline.exits.calibration import add_dssd_choices, apply_exit_policy, calibrate, evaluate_thresholds
from pipeline.exits.confidence import get_metric
from pipeline.exits.cost import CostModel
from pipeline.exits.thresholds import ExitThresholds
from pipeline.exits.token_metrics import wide
from pipeline.exits.vocab_pruning import TokenRanking, resolve_signal
from pipeline.models.backbone import num_layers_of
from pipeline.orchestration.results import row
from pipeline.orchestration.validation import ConfigError
from pipeline.stages.base import Stage, StageContext, StageOutput, seed_fact
from pipeline.stages.metrics import load_backbone_and_heads, split_metrics, train_ranking

log = logging.getLogger(__name__)
THRESHOLDS_FILE = "thresholds.json"  # the paper's signal (calibrate.metric)
DSSD_THRESHOLDS_FILE = "dssd_thresholds.json"  # the improved DSSD's, when calibrate.dssd.metric differs


class Calibration(NamedTuple):
    """A calibrate entry's thresholds: the paper's signal's and the improved DSSD's (the same object when
    one signal serves both)."""

    paper: ExitThresholds
    dssd: ExitThresholds


def load_calibration(entry: str | Path) -> Calibration:
    """The thresholds a calibrate stage entry holds: `thresholds.json`, and `dssd_thresholds.json` where the
    improved DSSD has a signal of its own (else it reads `thresholds.json` too)."""
    entry = Path(entry)
    paper = ExitThresholds.load(entry / THRESHOLDS_FILE)
    dssd_path = entry / DSSD_THRESHOLDS_FILE
    return Calibration(paper, ExitThresholds.load(dssd_path) if dssd_path.is_file() else paper)


def signal_for_model(key: str, name: str, vocab_size: int) -> str:
    """`name` with its candidate count made concrete for this vocabulary; a K beyond it is a config error."""
    resolved = resolve_signal(name, vocab_size)
    k = get_metric(resolved).candidates
    if k is not None and k > vocab_size:
        raise ConfigError(
            f"{key}={name}: {k} candidate tokens, but the model's vocabulary has {vocab_size}; choose "
            f"K <= {vocab_size}, or a share of the vocabulary, e.g. {resolved.partition('@')[0]}@top12.5%"
        )
    return resolved


@torch.no_grad()
def run(ctx: StageContext) -> StageOutput:
    c = ctx.cfg.calibrate
    backbone, heads = load_backbone_and_heads(ctx)
    vocab = heads.spec.vocab_size
    paper_metric = signal_for_model("calibrate.metric", str(c.metric), vocab)
    dssd_metric = signal_for_model("calibrate.dssd.metric", str(c.dssd.metric), vocab)
    signals = list(dict.fromkeys([paper_metric, dssd_metric]))
    ranking = train_ranking(ctx, heads) if any(get_metric(m).candidates for m in signals) else None
    val = split_metrics(ctx, backbone, heads, "validation", signals, c, ranking)
    test = split_metrics(ctx, backbone, heads, "test", signals, c, ranking)
    layers = [int(x) for x in val.groupby("head")["layer"].first().sort_index()]
    calibrated = {m: _calibrate(ctx, val, m, layers, ranking) for m in signals}
    paper, dssd = calibrated[paper_metric], calibrated[dssd_metric]
    add_dssd_choices(  # DSSD's per-draft accuracy, consulted heads and γ per method × ε (docs/design.md §1.6)
        dssd,
        wide(val, dssd_metric),
        wide(val, "correct"),
        CostModel.for_model(backbone),
        num_layers_of(backbone),
        max_draft=int(c.dssd.max_draft),
        gammas=[float(g) for g in c.dssd.gamma],
        flop_budget=None if c.dssd.flop_budget is None else float(c.dssd.flop_budget),
        accuracy_bins=int(c.dssd.accuracy_bins),
        max_tokens=None if c.dssd.max_tokens is None else int(c.dssd.max_tokens),
    )
    paper.save(ctx.out_dir / THRESHOLDS_FILE)
    if dssd is not paper:
        dssd.save(ctx.out_dir / DSSD_THRESHOLDS_FILE)

    rows, policies = [], {}
    for metric, thresholds in calibrated.items():
        setting = "dssd" if metric != paper_metric else None  # the improved DSSD's own signal
        signal_rows, policies[metric] = _report(thresholds, test, layers, setting)
        rows += signal_rows
    summary = {
        "validation_tokens": int(val["token"].nunique()),
        "test_tokens": int(len(wide(test, paper_metric))),
        "violations": _violations(policies[paper_metric], paper.methods),
    }
    tracker_summary = {f"violations/{m}": v for m, v in summary["violations"].items()}
    tables = {"policy": policies[paper_metric]}
    if dssd is not paper:
        summary["dssd_metric"] = dssd_metric
        summary["dssd_violations"] = _violations(policies[dssd_metric], dssd.methods)
        tracker_summary |= {f"dssd_violations/{m}": v for m, v in summary["dssd_violations"].items()}
        tables["dssd_policy"] = policies[dssd_metric]
    for name, table in tables.items():
        ctx.tracker.log_table(name, table)
    ctx.tracker.summary(tracker_summary)
    return StageOutput(rows=rows, metrics=summary, tables=tables)


def _calibrate(
    ctx: StageContext, val: pd.DataFrame, metric: str, layers: list[int], ranking: TokenRanking | None
) -> ExitThresholds:
    """Thresholds of one signal per method × ε on the validation tokens (with its candidate set if pruned)."""
    c: DictConfig = ctx.cfg.calibrate
    k = get_metric(metric).candidates
    return calibrate(
        wide(val, metric),
        wide(val, "correct"),
        metric,
        [float(e) for e in c.eps],
        methods=list(c.methods),
        delta=float(c.delta),
        cascade=bool(c.cascade),
        layers=layers,
        grid_fraction=float(c.ltt.grid_fraction),
        grid_points=int(c.ltt.grid_points),
        seed=int(ctx.cfg.seed),
        candidates=ranking.top(k) if k else None,
    )


def _report(
    thresholds: ExitThresholds, test: pd.DataFrame, layers: list[int], setting: str | None
) -> tuple[list, pd.DataFrame]:
    """One signal's rows (threshold and exit share per head, accuracy and coverage of the whole policy per
    method × ε on the test tokens; `confidence` = the signal, `setting` if given) and its policy table."""
    metric = thresholds.metric
    test_values, test_correct = wide(test, metric), wide(test, "correct")
    rows = []
    for method in thresholds.methods:
        labels = {"calibration": method, "confidence": metric} | ({"setting": setting} if setting else {})
        for eps in thresholds.eps:
            thr = thresholds.for_eps(method, eps)
            out = apply_exit_policy(test_values, test_correct, thr)
            for head, (t, frac) in enumerate(zip(thr.thresholds, out.coverage, strict=True)):
                at = {**labels, "eps": eps, "head": head, "layer": layers[head]}
                rows.append(row("threshold", math.nan if t is None else t, **at))
                rows.append(row("exit_frac", frac, **at))
            rows.append(row("accuracy", out.accuracy, **labels, eps=eps, head="all"))
            rows.append(row("coverage", out.total_coverage, **labels, eps=eps, head="all"))
            log.info(
                "%s %s ε=%.2f: test accuracy %.4f, coverage %.3f, per head %s",
                metric,
                method,
                eps,
                out.accuracy,
                out.total_coverage,
                np.round(out.coverage, 3).tolist(),
            )
    return rows, evaluate_thresholds(test_values, test_correct, thresholds)


def _violations(policy: pd.DataFrame, methods: list[str]) -> dict[str, int]:
    """Per calibration method, the ε levels whose test accuracy misses ε."""
    return {m: int((~policy[policy["method"] == m]["meets_eps"]).sum()) for m in methods}


STAGE = Stage(
    name="calibrate",
    upstream=("backbone", "extract", "heads"),
    run=run,
    group="calibrate",
    key_facts=seed_fact,
)
