"""Stage `decoding`: greedy, early exit, the LayerSkip grid and DSSD per ε on real prompts; lossless by check.

Prompts: `n_prompts` windows of `prompt_len` tokens from the test split (the reported prompts) and a disjoint
set of `n_tune_prompts` windows from the validation split (LayerSkip tuning only), each decoding
`max_new_tokens` tokens. DSSD and early exit use the thresholds of `calibration_method` from the calibrate
stage. What runs, in which order, how LayerSkip is tuned (`layerskip_select`) and how losslessness is enforced:
pipeline/evaluation/decoding_harness.py; the rows: pipeline/evaluation/decoding_report.py. A lossless method
that changes a token raises `LosslessnessError` and nothing is written.

Tables: `per_prompt` (one line per split × prompt × method × setting, every statistic of
`GenerationStats.as_dict()`), `summary` (the logged per-setting table).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from pipeline.evaluation.decoding_harness import (
    SELECT_CRITERIA,
    DecodingPlan,
    LosslessnessError,
    prompt_windows,
    run_decoding,
)
from pipeline.orchestration.validation import ConfigError, check_eps
from pipeline.stages.base import Stage, StageContext, StageOutput
from pipeline.stages.calibrate import THRESHOLDS_FILE

log = logging.getLogger(__name__)
__all__ = ["STAGE", "LosslessnessError", "key_config", "validate", "run"]


def plan_from_config(cfg: DictConfig, policies: dict[float, Any], eos: int | None, pad: int) -> DecodingPlan:
    """The harness's plan from the `decoding` config group."""
    d = cfg.decoding
    return DecodingPlan(
        max_new_tokens=int(d.max_new_tokens),
        policies=policies,
        layerskip_d=[int(x) for x in d.layerskip_d],
        max_draft=int(d.max_draft),
        layerskip_select=str(d.get("layerskip_select", SELECT_CRITERIA[0])),
        early_exit_fills=(str(d.get("early_exit_fill", "lazy")),) if bool(d.get("early_exit", True)) else (),
        repeats=int(d.get("repeats", 1)),
        eos_token_id=eos,
        pad_token_id=pad,
    )


@torch.no_grad()
def run(ctx: StageContext) -> StageOutput:
    from pipeline.data.tokens import make_text_source
    from pipeline.engine import Engine
    from pipeline.exits.calibration import ExitThresholds
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
    eos = tokenizer.eos_token_id if bool(d.get("stop_at_eos", False)) else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    plan = plan_from_config(cfg, policies, eos, pad)
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
    best = report.tuning.best
    log.info(
        "decoding summary (test prompts; LayerSkip head %d d=%d tuned on validation prompts):\n%s",
        best.head,
        best.draft_len,
        summary.to_string(index=False, float_format=lambda x: f"{x:.3g}"),
    )
    ctx.tracker.log_table("decoding_summary", summary)
    metrics = report.metrics()
    ctx.tracker.summary({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    tables = {"per_prompt": report.per_prompt_table(), "summary": summary}
    return StageOutput(rows=report.rows(), metrics=metrics, tables=tables)


# --- config: key_config, validate ---------------------------------------------------------------------------


def key_config(cfg: DictConfig) -> dict:
    d = cfg.decoding
    return {
        "n_prompts": int(d.n_prompts),
        "n_tune_prompts": int(d.n_tune_prompts),
        "prompt_len": int(d.prompt_len),
        "max_new_tokens": int(d.max_new_tokens),
        "eps": [float(e) for e in d.eps],
        "calibration_method": str(d.calibration_method),
        "max_draft": int(d.max_draft),
        "layerskip_d": [int(x) for x in d.layerskip_d],
        "layerskip_select": str(d.get("layerskip_select", SELECT_CRITERIA[0])),
        "early_exit": bool(d.get("early_exit", True)),
        "early_exit_fill": str(d.get("early_exit_fill", "lazy")),
        "stop_at_eos": bool(d.get("stop_at_eos", False)),
        "repeats": int(d.get("repeats", 1)),
        "seed": int(cfg.seed),
    }


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")
    return int(value)


def validate(cfg: DictConfig) -> None:
    from pipeline.engine import FILL_POLICIES
    from pipeline.exits.calibration import eps_key

    d = cfg.decoding
    eps = check_eps(list(d.eps) if isinstance(d.eps, ListConfig | list | tuple) else d.eps, "decoding.eps")
    if not eps:
        raise ConfigError("decoding.eps must list at least one ε (e.g. [0.8, 0.9])")
    calibrated = {eps_key(e) for e in cfg.calibrate.eps}
    missing = [e for e in eps if eps_key(e) not in calibrated]
    if missing:
        raise ConfigError(
            f"decoding.eps {missing} are not calibrated (calibrate.eps={list(cfg.calibrate.eps)}); "
            "add them to calibrate.eps or drop them from decoding.eps"
        )
    if d.calibration_method not in cfg.calibrate.methods:
        raise ConfigError(
            f"decoding.calibration_method={d.calibration_method!r} is not calibrated "
            f"(calibrate.methods={list(cfg.calibrate.methods)})"
        )
    _int(d.n_prompts, "decoding.n_prompts", 1)
    _int(d.n_tune_prompts, "decoding.n_tune_prompts", 1)
    prompt_len = _int(d.prompt_len, "decoding.prompt_len", 1)
    new_tokens = _int(d.max_new_tokens, "decoding.max_new_tokens", 1)
    _int(d.max_draft, "decoding.max_draft", 1)
    _int(d.get("repeats", 1), "decoding.repeats", 1)
    if not isinstance(d.layerskip_d, ListConfig | list | tuple) or not d.layerskip_d:
        raise ConfigError(
            f"decoding.layerskip_d must be a non-empty list of draft lengths >= 1, got {d.layerskip_d!r}"
        )
    for value in d.layerskip_d:
        _int(value, "decoding.layerskip_d entries (LayerSkip draft lengths)", 1)
    max_len = int(cfg.model.get("max_seq_len") or 0)
    if max_len and prompt_len + new_tokens > max_len:
        raise ConfigError(
            f"decoding.prompt_len + decoding.max_new_tokens = {prompt_len + new_tokens} exceeds "
            f"{cfg.model.name}'s maximum sequence length {max_len}; shorten one of them"
        )
    if str(d.get("layerskip_select", SELECT_CRITERIA[0])) not in SELECT_CRITERIA:
        raise ConfigError(
            f"decoding.layerskip_select={d.layerskip_select!r}; choose one of {list(SELECT_CRITERIA)}"
        )
    if str(d.get("early_exit_fill", "lazy")) not in FILL_POLICIES:
        raise ConfigError(
            f"decoding.early_exit_fill={d.early_exit_fill!r}; choose one of {list(FILL_POLICIES)}"
        )


STAGE = Stage(
    name="decoding",
    upstream=("backbone", "extract", "heads", "calibrate"),
    key_config=key_config,
    run=run,
    validate=validate,
)
