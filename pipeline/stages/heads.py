"""Stage `heads`: train one early-exit head per `model.head_layers` on the extracted train split (Lightning,
self-supervised KL to the frozen model), then score them and the logit lens on the same held-out tokens.

Output directory: `heads.safetensors` + `heads.json` (load with `EarlyExitHeads.load(dir, backbone)`), the
Lightning CSV logs under `logs/`. Training checkpoints live in `checkpoints/` while the stage runs (the stage
is resumable: an interrupted run continues from `checkpoints/last.ckpt`) and are deleted once the heads are
saved — for Pythia-2.8b they weigh several GB and nothing downstream reads them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.config.stages import world_size
from pipeline.models.backbone import load_from_stage_output
from pipeline.orchestration.console import route_library_logging
from pipeline.orchestration.results import row
from pipeline.orchestration.validation import ConfigError
from pipeline.stages.base import Stage, StageContext, StageOutput
from pipeline.stages.extract import read_meta

log = logging.getLogger(__name__)
METHODS = ("trained", "logit_lens")


def key_facts(cfg: DictConfig) -> dict[str, Any]:
    """Beyond the `heads` group: the seed and what of conf/trainer changes the weights — numerics and the
    global batch (heads.batch_tokens is per data-parallel process) — not where training runs."""
    trainer = cfg.trainer
    return {
        "seed": int(cfg.seed),
        "precision": str(trainer.get("precision", "32-true")),
        "world_size": world_size(trainer),
        "accumulate_grad_batches": int(trainer.get("accumulate_grad_batches", 1) or 1),
    }


def stage_trainer_cfg(trainer_cfg: DictConfig) -> dict[str, Any]:
    """conf/trainer as used inside the pipeline.

    `strategy: ddp` launches the other ranks by re-running the command line; inside the pipeline that would
    re-run the whole runner, whose rank-1 copy then waits on the stage lock rank 0 holds while rank 0 waits
    for rank 1 in the process group (deadlock). `ddp_spawn` starts workers that run only the training loop.
    """
    tcfg = OmegaConf.to_container(trainer_cfg, resolve=True)
    if tcfg.get("strategy") == "ddp":
        log.info("heads stage: trainer.strategy=ddp runs as ddp_spawn inside the pipeline")
        tcfg["strategy"] = "ddp_spawn"
    return tcfg


def result_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for setting in METHODS:
        for r in metrics[setting]:
            for name in ("kl", "agree"):
                rows.append(row(name, r[name], setting=setting, head=r["head"], layer=r["layer"]))
    for name in ("train_tokens_per_s", "train_seconds", "train_tokens", "steps"):
        if metrics.get(name) is not None:
            rows.append(row(name, metrics[name], setting="trained"))
    return rows


def run(ctx: StageContext) -> StageOutput:
    # Imported here: Lightning takes seconds to import, and a rerun that reuses the heads never needs it.
    from pipeline.exits.training import CHECKPOINT_DIR, train_heads

    route_library_logging()  # Lightning, just imported, prints its tips through a console handler of its own

    cfg = ctx.cfg
    layers = [int(x) for x in cfg.model.head_layers]
    meta = read_meta(ctx.inputs["extract"])
    if meta["layers"] != layers:
        raise ConfigError(f"extracted layers {meta['layers']} differ from model.head_layers {layers}")
    backbone, _ = load_from_stage_output(
        ctx.inputs["backbone"], dtype=cfg.model.dtype, device="cpu", with_tokenizer=False
    )
    extract_dir = Path(ctx.inputs["extract"])
    logger = ctx.tracker.lightning_logger()  # W&B when tracking is on; None -> CSV logs in the output
    heads, metrics = train_heads(
        backbone,
        layers,
        extract_dir / "train",
        cfg.heads,
        stage_trainer_cfg(cfg.trainer),
        int(cfg.seed),
        ctx.out_dir,
        logger=logger,
        progress=ctx.progress,
        backbone_id=str(cfg.model.source),
        backbone_revision=cfg.model.revision,
    )
    shutil.rmtree(ctx.out_dir / CHECKPOINT_DIR, ignore_errors=True)
    for t, lens in zip(metrics["trained"], metrics["logit_lens"], strict=True):
        log.info(
            "head %d (block %d): KL %.4f (logit lens %.4f), agreement %.3f (logit lens %.3f)",
            t["head"],
            t["layer"],
            t["kl"],
            lens["kl"],
            t["agree"],
            lens["agree"],
        )
    table = pd.DataFrame([{**r, "method": method} for method in METHODS for r in metrics[method]])
    summary: dict[str, Any] = {
        k: metrics[k] for k in ("steps", "train_tokens", "train_seconds", "train_tokens_per_s", "eval_tokens")
    }
    for method in METHODS:
        for r in metrics[method]:
            summary[f"{method}/kl_head{r['head']}"] = r["kl"]
            summary[f"{method}/agree_head{r['head']}"] = r["agree"]
    return StageOutput(rows=result_rows(metrics), metrics=summary, tables={"heads_eval": table})


STAGE = Stage(
    name="heads",
    upstream=("backbone", "extract"),
    run=run,
    group="heads",
    key_facts=key_facts,
    resumable=True,
)
