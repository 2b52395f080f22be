"""Stage `decoding`: greedy, early exit, LayerSkip and DSSD (per ε and tuned) on real prompts; lossless by check.

DSSD appears three times: `dssd_paper` (the paper's rule per ε: every head, no early stop, cap `max_draft`),
`dssd` (per ε, the improved DSSD the calibrate stage chose: consulted heads and adaptive stop γ) and
`dssd_tuned` (tuned on the tuning prompts over ε × heads × `dssd_max_draft` × `dssd_gamma`).

Prompts: `n_prompts` windows of `prompt_len` tokens from the test split (the reported prompts) and a disjoint
set of `n_tune_prompts` windows from the validation split (tuning only: LayerSkip's head × d, DSSD's ε ×
consulted heads × `dssd_max_draft`), each decoding `max_new_tokens` tokens. DSSD and early exit use the
thresholds of `calibration_method` from the calibrate stage. What runs, in which order, how LayerSkip and
DSSD are tuned (`layerskip_select`) and how losslessness is enforced: pipeline/evaluation/decoding_harness.py;
the rows: pipeline/evaluation/decoding_report.py. A lossless method that changes a token raises
`LosslessnessError` and nothing is written.

Tables: `per_prompt` (one line per split × prompt × method × setting, every statistic of
`GenerationStats.as_dict()`), `summary` (the logged per-setting table).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from pipeline.evaluation.decoding_harness import (
    DecodingPlan,
    LosslessnessError,
    prompt_windows,
    run_decoding,
)
from pipeline.evaluation.decoding_sampled import run_sampled_decoding
from pipeline.exits.thresholds import ExitThresholds
from pipeline.stages.base import Stage, StageContext, StageOutput, seed_fact
from pipeline.stages.calibrate import THRESHOLDS_FILE

log = logging.getLogger(__name__)
__all__ = ["STAGE", "LosslessnessError", "run"]


def plan_from_config(
    cfg: DictConfig,
    policies: dict[float, Any],
    eos: int | None,
    pad: int,
    thresholds: ExitThresholds | None = None,
) -> DecodingPlan:
    """The harness's plan from the `decoding` config group; `thresholds` (the calibrate stage's artifact)
    supplies the improved DSSD's exit set and γ per ε and the per-draft accuracy curve."""
    d = cfg.decoding
    method = str(d.calibration_method)
    return DecodingPlan(
        max_new_tokens=int(d.max_new_tokens),
        policies=policies,
        layerskip_d=[int(x) for x in d.layerskip_d],
        max_draft=int(d.max_draft),
        dssd_max_draft=[int(x) for x in d.dssd_max_draft],
        dssd_gamma=[float(x) for x in d.dssd_gamma],
        exit_sets={e: thresholds.exit_set(method, e) for e in policies} if thresholds is not None else {},
        draft_accuracy=thresholds.draft_accuracy if thresholds is not None else None,
        layerskip_select=str(d.layerskip_select),
        early_exit_fills=(str(d.early_exit_fill),) if bool(d.early_exit) else (),
        repeats=int(d.repeats),
        eos_token_id=eos,
        pad_token_id=pad,
        calibration=str(d.calibration_method),
    )


@torch.no_grad()
def run(ctx: StageContext) -> StageOutput:
    from pipeline.data.tokens import make_text_source
    from pipeline.engine import Engine
    from pipeline.exits.heads import EarlyExitHeads
    from pipeline.models.backbone import load_from_stage_output

    cfg, d = ctx.cfg, ctx.cfg.decoding
    model, tokenizer = load_from_stage_output(
        ctx.inputs["backbone"], dtype=cfg.model.dtype, device=ctx.device
    )
    heads = EarlyExitHeads.load(ctx.inputs["heads"], model).to(ctx.device).eval()
    thresholds = ExitThresholds.load(Path(ctx.inputs["calibrate"]) / THRESHOLDS_FILE)
    method = str(d.calibration_method)
    policies = {float(e): thresholds.for_eps(method, float(e)) for e in d.eps}
    test, tune = prompt_windows(
        make_text_source(cfg.data),
        tokenizer,
        int(d.n_prompts),
        int(d.n_tune_prompts),
        int(d.prompt_len),
        key_prefix="decoding.",
    )
    eos = tokenizer.eos_token_id if bool(d.stop_at_eos) else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    plan = plan_from_config(cfg, policies, eos, pad, thresholds)
    engine = Engine(model, heads)
    log.info(
        "decoding: %d test prompts, %d tuning prompts, %d+%d tokens; %s thresholds (%s) for ε=%s; heads at "
        "blocks %s; head cost %.2f blocks",
        len(test),
        len(tune),
        int(d.prompt_len),
        plan.max_new_tokens,
        method,
        thresholds.metric,
        list(policies),
        engine.head_layers,
        engine.cost.head,
    )
    report = run_decoding(
        engine, model, list(test.to(ctx.device)), list(tune.to(ctx.device)), plan, progress=ctx.progress
    )
    summary = report.summary_table()
    best, dssd_best = report.tuning.best, report.test.dssd_tuned
    log.info(
        "decoding summary (test prompts; tuned on validation prompts: LayerSkip head %d d=%d, DSSD %s):\n%s",
        best.head,
        best.draft_len,
        dssd_best.detail if dssd_best is not None else "-",
        summary.to_string(index=False, float_format=lambda x: f"{x:.3g}"),
    )
    ctx.tracker.log_table("decoding_summary", summary)
    metrics = report.metrics()
    tables = {"per_prompt": report.per_prompt_table(), "summary": summary}
    rows = report.rows()
    if any(float(t) > 0 for t in d.sampling):  # decoding.sampling: the sampled runs on the same prompts
        sampled = run_sampled_decoding(
            engine,
            report,
            list(test.to(ctx.device)),
            list(tune.to(ctx.device)),
            plan,
            d.sampling,
            int(cfg.seed),
        )
        sampled_summary = sampled.summary_table()
        log.info(
            "decoding by sampling (test prompts; seed %d + prompt index; exact in distribution, no identity "
            "check):\n%s",
            int(cfg.seed),
            sampled_summary.to_string(index=False, float_format=lambda x: f"{x:.3g}"),
        )
        ctx.tracker.log_table("decoding_sampled_summary", sampled_summary)
        rows += sampled.rows()
        metrics.update(sampled.metrics())
        tables.update(sampled_per_prompt=sampled.per_prompt_table(), sampled_summary=sampled_summary)
    ctx.tracker.summary({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    return StageOutput(rows=rows, metrics=metrics, tables=tables)


STAGE = Stage(
    name="decoding",
    upstream=("backbone", "extract", "heads", "calibrate"),
    run=run,
    group="decoding",
    key_facts=seed_fact,
)
