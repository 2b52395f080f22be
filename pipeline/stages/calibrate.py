"""Stage `calibrate`: exit thresholds[method][ε][head] on the validation split (`thresholds.json`), then the
realized accuracy and coverage of the whole exit policy per method and ε on the test split (disjoint).

A pruned signal (`calibrate.metric: logit_margin@top512`) is calibrated on the heads' view over the K most
frequent train tokens; that candidate set is saved in `thresholds.json`, so decoding uses exactly it."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from pipeline.exits.calibration import add_dssd_choices, apply_exit_policy, calibrate, evaluate_thresholds
from pipeline.exits.confidence import get_metric
from pipeline.exits.cost import CostModel
from pipeline.exits.token_metrics import wide
from pipeline.models.backbone import num_layers_of
from pipeline.orchestration.results import row
from pipeline.stages.base import Stage, StageContext, StageOutput, seed_fact
from pipeline.stages.metrics import load_backbone_and_heads, split_metrics, train_ranking

log = logging.getLogger(__name__)
THRESHOLDS_FILE = "thresholds.json"


@torch.no_grad()
def run(ctx: StageContext) -> StageOutput:
    c = ctx.cfg.calibrate
    metric = str(c.metric)
    backbone, heads = load_backbone_and_heads(ctx)
    k = get_metric(metric).candidates
    ranking = train_ranking(ctx, heads) if k else None
    val = split_metrics(ctx, backbone, heads, "validation", [metric], c, ranking)
    test = split_metrics(ctx, backbone, heads, "test", [metric], c, ranking)
    layers = [int(x) for x in val.groupby("head")["layer"].first().sort_index()]
    thresholds = calibrate(
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
        candidates=ranking.top(k) if ranking is not None else None,
    )
    add_dssd_choices(  # DSSD's per-draft accuracy, consulted heads and γ per method × ε (docs/design.md §1.6)
        thresholds,
        wide(val, metric),
        wide(val, "correct"),
        CostModel.for_model(backbone),
        num_layers_of(backbone),
        max_draft=int(c.dssd.max_draft),
        gammas=[float(g) for g in c.dssd.gamma],
        flop_budget=None if c.dssd.flop_budget is None else float(c.dssd.flop_budget),
        accuracy_bins=int(c.dssd.accuracy_bins),
        max_tokens=None if c.dssd.max_tokens is None else int(c.dssd.max_tokens),
    )
    thresholds.save(ctx.out_dir / THRESHOLDS_FILE)

    test_values, test_correct = wide(test, metric), wide(test, "correct")
    policy = evaluate_thresholds(test_values, test_correct, thresholds)
    rows = []
    for method in thresholds.methods:
        labels = {"calibration": method, "confidence": metric}
        for eps in thresholds.eps:
            thr = thresholds.for_eps(method, eps)
            out = apply_exit_policy(test_values, test_correct, thr)
            for head, (t, frac) in enumerate(zip(thr.thresholds, out.coverage, strict=True)):
                rows.append(
                    row(
                        "threshold",
                        math.nan if t is None else t,
                        **labels,
                        eps=eps,
                        head=head,
                        layer=layers[head],
                    )
                )
                rows.append(row("exit_frac", frac, **labels, eps=eps, head=head, layer=layers[head]))
            rows.append(row("accuracy", out.accuracy, **labels, eps=eps, head="all"))
            rows.append(row("coverage", out.total_coverage, **labels, eps=eps, head="all"))
            log.info(
                "%s ε=%.2f: test accuracy %.4f, coverage %.3f, per head %s",
                method,
                eps,
                out.accuracy,
                out.total_coverage,
                np.round(out.coverage, 3).tolist(),
            )
    summary = {
        "validation_tokens": int(val["token"].nunique()),
        "test_tokens": int(len(test_values)),
        "violations": {
            m: int((~policy[policy["method"] == m]["meets_eps"]).sum()) for m in thresholds.methods
        },
    }
    ctx.tracker.log_table("policy", policy)
    ctx.tracker.summary({f"violations/{m}": v for m, v in summary["violations"].items()})
    return StageOutput(rows=rows, metrics=summary, tables={"policy": policy})


STAGE = Stage(
    name="calibrate",
    upstream=("backbone", "extract", "heads"),
    run=run,
    group="calibrate",
    key_facts=seed_fact,
)
