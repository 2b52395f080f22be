"""Stage `early_exit`: benchmark accuracy with early exit, next to its compute, and token-level evaluation.

For the full model and every (calibration method, ε), the configured lm-eval tasks run through `EarlyExitLM`
(pipeline/evaluation/lm_eval_adapter.py); then the same policies are evaluated token by token on the test split under each
KV fill policy (pipeline/evaluation/token_eval.py). `early_exit.tasks=offline` uses tasks built from the held-out split
(pipeline/evaluation/offline_tasks.py), so the default run needs no network.

Rows (pipeline/orchestration/results.py):
  setting full (no eps), or setting early_exit with calibration c and confidence m at eps e, head -:
      acc/<task>, acc_stderr/<task> (and every other metric lm-eval reports, e.g. acc_norm/<task>,
      perplexity/<task>), compute_frac/<task>; same, head i: exit_frac/<task>
  setting early_exit, calibration c, confidence m, fill lazy|copy|recompute, eps e, head -: agreement, ppl,
      layer_equiv_per_token, compute_frac; head i: exit_frac (token level). The full model's token-level
      ppl, agreement and layer_equiv_per_token are rows of setting `full`.
compute_frac is the exit policy's layer-equivalents per scored token over the full model's (L + unembedding);
for benchmarks it excludes KV fill, which the token-level rows measure per fill policy.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.orchestration.console import stdout_to_log
from pipeline.orchestration.results import row
from pipeline.orchestration.validation import ConfigError
from pipeline.stages.base import Stage, StageContext, StageOutput, seed_fact

log = logging.getLogger(__name__)
THRESHOLDS_FILE = "thresholds.json"
TASKS_DIR = "offline_tasks"
LM_EVAL_DIR = "lm_eval"


# --- config -----------------------------------------------------------------------------------------------------


def task_names(cfg: DictConfig) -> list[str] | None:
    """The configured lm-eval task names; None means the offline tasks (built at run time). The schema
    (pipeline/config/stages.py) has checked the form of `early_exit.tasks`."""
    tasks = cfg.early_exit.tasks
    if tasks == "offline":
        return None
    if tasks == "pythia":
        return [str(t) for t in cfg.early_exit.pythia]
    return [str(t) for t in tasks]


def check_tasks_reachable(cfg: DictConfig) -> None:
    """lm-eval's own tasks download their datasets: fail now, not after the other stages, without a hub."""
    names = task_names(cfg)
    if names is not None and os.environ.get("HF_DATASETS_OFFLINE") != "1":
        from pipeline.models.backbone import hub_reachable

        if not hub_reachable():
            raise ConfigError(
                f"early_exit.tasks {names} download their datasets from the Hugging Face hub, which is "
                "unreachable; use early_exit.tasks=offline, or HF_DATASETS_OFFLINE=1 if they are cached"
            )


# --- run --------------------------------------------------------------------------------------------------------


def _prepare_tasks(cfg: DictConfig, out_dir: Path):
    from pipeline.data.tokens import make_text_source
    from pipeline.evaluation.offline_tasks import OfflineTaskSettings, task_manager, write_offline_tasks

    names = task_names(cfg)
    if names is not None:
        return names, task_manager(None, include_defaults=True)
    settings = OfflineTaskSettings.from_config(OmegaConf.to_container(cfg.early_exit.offline, resolve=True))
    counts = write_offline_tasks(out_dir / TASKS_DIR, make_text_source(cfg.data), settings)
    log.info("offline tasks from the %s split: %s", settings.split, counts)
    return list(counts), task_manager(out_dir / TASKS_DIR)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def policy_labels(method: str, confidence: str) -> dict[str, str]:
    """The label columns of a policy's rows: the full model (`method` "full") or early exit with thresholds
    calibrated by `method` on the `confidence` metric."""
    if method == "full":
        return {"setting": "full"}
    return {"setting": "early_exit", "calibration": method, "confidence": confidence}


def task_rows(results: dict, exit_stats: dict, labels: dict[str, str], eps: float | None) -> list[dict]:
    """Rows for one lm-eval run: every numeric metric (`acc,none` -> acc/<task>), compute and exit fractions."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            number = _number(value)
            if not filt or number is None:
                continue
            suffix = "" if filt == "none" else f"[{filt}]"
            rows.append(row(f"{name}/{task}{suffix}", number, **labels, eps=eps))
        stats = exit_stats.get(task)
        if stats is not None and stats.positions:
            rows.append(row(f"compute_frac/{task}", stats.compute_fraction, **labels, eps=eps))
            rows += [
                row(f"exit_frac/{task}", frac, **labels, eps=eps, head=k)
                for k, frac in enumerate(stats.exit_fractions)
            ]
    return rows


def _token_rows(results: dict, labels: dict[str, str], eps: float) -> list[dict]:
    rows = []
    for fill, res in results.items():
        common = {**labels, "fill": fill, "eps": eps}
        rows += [
            row("agreement", res.agreement, **common),
            row("ppl", res.ppl, **common),
            row("layer_equiv_per_token", res.layer_equivalents_per_token, **common),
            row("compute_frac", res.compute_fraction, **common),
        ]
        rows += [row("exit_frac", frac, head=k, **common) for k, frac in enumerate(res.exit_fractions)]
    return rows


def run(ctx: StageContext) -> StageOutput:
    import lm_eval

    from pipeline.data.tokens import make_text_source, token_blocks
    from pipeline.evaluation.lm_eval_adapter import EarlyExitLM
    from pipeline.evaluation.token_eval import evaluate_tokens
    from pipeline.exits.heads import EarlyExitHeads
    from pipeline.exits.policy import ExitPolicy
    from pipeline.exits.thresholds import ExitThresholds
    from pipeline.models.backbone import load_from_stage_output

    cfg, ev = ctx.cfg, ctx.cfg.early_exit
    model, tokenizer = load_from_stage_output(
        ctx.inputs["backbone"], dtype=cfg.model.dtype, device=ctx.device
    )
    heads = EarlyExitHeads.load(ctx.inputs["heads"], model).to(ctx.device)
    thresholds = ExitThresholds.load(Path(ctx.inputs["calibrate"]) / THRESHOLDS_FILE)
    names, manager = _prepare_tasks(cfg, ctx.out_dir)
    lm = EarlyExitLM(
        model,
        tokenizer,
        heads,
        batch_size=int(ev.batch_size),
        generation=str(ev.generation),
        fill=str(ev.fill),
        max_draft=int(ev.max_draft),
        progress=ctx.progress,
    )
    settings: list[tuple[str, float | None]] = [("full", None)]
    settings += [(str(m), float(e)) for m in ev.methods for e in ev.eps]
    rows: list[dict] = []
    (ctx.out_dir / LM_EVAL_DIR).mkdir()
    for method, eps in settings:
        lm.set_policy(None if eps is None else thresholds.for_eps(method, eps))
        log.info("lm-eval %s ε=%s on %s", method, eps, names)
        with stdout_to_log(log):  # lm-eval prints a line per bootstrapped metric: the log file's business
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                task_manager=manager,
                limit=ev.limit,
                num_fewshot=int(ev.num_fewshot),
                bootstrap_iters=int(ev.bootstrap_iters),
                log_samples=False,
                random_seed=int(cfg.seed),
                numpy_random_seed=int(cfg.seed),
                torch_random_seed=int(cfg.seed),
                fewshot_random_seed=int(cfg.seed),
            )
        rows += task_rows(results, lm.exit_stats, policy_labels(method, thresholds.metric), eps)
        label = method if eps is None else f"{method}_eps{eps:g}"
        (ctx.out_dir / LM_EVAL_DIR / f"{label}.json").write_text(
            json.dumps(
                {
                    "results": results["results"],
                    "policy": lm.policy.thresholds,
                    "exit_stats": {t: vars(s) for t, s in lm.exit_stats.items()},
                },
                indent=1,
                default=str,
            )
        )

    n_tokens = int(ev.token_eval.n_tokens)
    if n_tokens > 0:
        blocks = token_blocks(
            make_text_source(cfg.data),
            tokenizer,
            "test",
            n_tokens,
            int(cfg.data.seq_len),
            budget_key="early_exit.token_eval.n_tokens",
        )
        fills = [str(f) for f in ev.token_eval.fills]
        batch = int(ev.token_eval.batch_size)
        full = ExitPolicy.disabled(heads.layers, thresholds.metric)
        base = evaluate_tokens(
            model, blocks, heads, full, lm.cost, fills=["lazy"], batch_size=batch, device=ctx.device
        )["lazy"]
        rows += [
            row("ppl", base.ppl, setting="full"),
            row("agreement", 1.0, setting="full"),
            row("layer_equiv_per_token", base.layer_equivalents_per_token, setting="full"),
        ]
        for method, eps in settings[1:]:
            policy = thresholds.for_eps(method, eps)
            log.info("token-level %s ε=%s: %d tokens, fills %s", method, eps, blocks.numel(), fills)
            rows += _token_rows(
                evaluate_tokens(
                    model, blocks, heads, policy, lm.cost, fills=fills, batch_size=batch, device=ctx.device
                ),
                policy_labels(method, thresholds.metric),
                eps,
            )
    table = accuracy_compute_table(rows)
    ctx.tracker.log_table("accuracy_compute", table)
    metrics = {}
    for (policy, eps), group in table.groupby(["policy", table["eps"].fillna(-1)], sort=False):
        metrics[f"mean_acc/{policy}" + ("" if eps < 0 else f"@{eps:g}")] = float(group["acc"].mean())
        metrics[f"mean_compute_frac/{policy}" + ("" if eps < 0 else f"@{eps:g}")] = float(
            group["compute_frac"].mean()
        )
    return StageOutput(rows=rows, metrics=metrics, tables={"accuracy_compute": table})


def accuracy_compute_table(rows: list[dict]) -> pd.DataFrame:
    """One line per (policy, ε, task), in run order: acc, its stderr and the compute fraction; the policy is
    `full` or the calibration method of the thresholds."""
    columns = ("acc", "acc_stderr", "compute_frac")
    lines: dict[tuple, dict[str, float]] = {}
    for r in rows:
        name, sep, task = r["metric"].partition("/")
        if sep and name in columns and r.get("head") is None:
            policy = r["calibration"] or r["setting"]
            lines.setdefault((policy, r["eps"], task), {})[name] = r["value"]
    return pd.DataFrame(
        [
            {"policy": p, "eps": e, "task": t, **{c: v.get(c, math.nan) for c in columns}}
            for (p, e, t), v in lines.items()
        ],
        columns=["policy", "eps", "task", *columns],
    )


STAGE = Stage(
    name="early_exit",
    upstream=("backbone", "extract", "heads", "calibrate"),
    run=run,
    group="early_exit",
    key_facts=seed_fact,
    checks=check_tasks_reachable,
)
