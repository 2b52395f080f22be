"""Stage `decoding`: greedy, early exit, LayerSkip and DSSD (per ε and tuned) on real prompts; lossless by check.

DSSD appears three times: `dssd_paper` (the paper's rule per ε: every head, no early stop, cap `max_draft`),
`dssd` (per ε, the improved DSSD the calibrate stage chose: consulted heads and adaptive stop γ) and
`dssd_tuned` (tuned on the tuning prompts over ε × heads × `dssd_max_draft` × `dssd_gamma`). `dssd_paper` and
early exit exit on the paper's signal (`calibrate.metric`, thresholds.json); `dssd` and `dssd_tuned` on the
improved DSSD's (`calibrate.dssd.metric`, dssd_thresholds.json when it differs). Each row's `confidence` label
names its signal.

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

import torch
from omegaconf import DictConfig

from pipeline.evaluation.decoding_harness import (
    DecodingPlan,
    LosslessnessError,
    prompt_windows,
    run_decoding,
)
from pipeline.evaluation.decoding_sampled import run_sampled_decoding
from pipeline.stages.base import Stage, StageContext, StageOutput, seed_fact
from pipeline.stages.calibrate import Calibration, load_calibration

log = logging.getLogger(__name__)
__all__ = ["STAGE", "LosslessnessError", "run"]


def plan_from_config(cfg: DictConfig, calibration: Calibration, eos: int | None, pad: int) -> DecodingPlan:
    """The harness's plan from the `decoding` config group at each ε of `decoding.eps`: early exit and
    `dssd_paper` on the paper's thresholds (`calibration.paper`), the improved DSSD on its own
    (`calibration.dssd`: thresholds, exit set and γ per ε, per-draft accuracy curve)."""
    d = cfg.decoding
    method = str(d.calibration_method)
    eps = [float(e) for e in d.eps]
    dssd = calibration.dssd
    return DecodingPlan(
        max_new_tokens=int(d.max_new_tokens),
        policies={e: calibration.paper.for_eps(method, e) for e in eps},
        dssd_policies={e: dssd.for_eps(method, e) for e in eps},
        layerskip_d=[int(x) for x in d.layerskip_d],
        max_draft=int(d.max_draft),
        dssd_max_draft=[int(x) for x in d.dssd_max_draft],
        dssd_gamma=[float(x) for x in d.dssd_gamma],
        exit_sets={e: dssd.exit_set(method, e) for e in eps},
        draft_accuracy=dssd.draft_accuracy,
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
    calibration = load_calibration(ctx.inputs["calibrate"])
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
    plan = plan_from_config(cfg, calibration, eos, pad)
    engine = Engine(model, heads)
    log.info(
        "decoding: %d test prompts, %d tuning prompts, %d+%d tokens; %s thresholds for ε=%s (paper's signal "
        "%s, improved DSSD's %s); heads at blocks %s; head cost %.2f blocks",
        len(test),
        len(tune),
        int(d.prompt_len),
        plan.max_new_tokens,
        plan.calibration,
        list(plan.policies),
        calibration.paper.metric,
        calibration.dssd.metric,
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
