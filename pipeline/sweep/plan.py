"""What a command would run, before paying for it: `python -m pipeline.sweep --plan <the command's arguments>`.

One line per job of `python -m pipeline <arguments>` (a single run, or every job of a multirun, composed exactly
as Hydra would compose them: `pipeline.command_line.compose_jobs`): the model, the head type and layers, the
token budgets, and the job's estimated shard disk, head-checkpoint disk and A100 GPU-hours
(`pipeline.sweep.estimate`). Nothing runs, nothing is written, no network is needed."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.sweep.estimate import estimate

PLAN_COLUMNS = [
    "job",
    "model",
    "heads",
    "head_layers",
    "train",
    "validation",
    "test",
    "shards_gb",
    "checkpoint_gb",
    "disk_gb",
    "gpu_h",
    "overrides",
]


def _tokens(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def plan_table(argv: Sequence[str]) -> pd.DataFrame:
    """One row per job `python -m pipeline <argv>` would run (see the module docstring)."""
    from pipeline.command_line import compose_jobs

    os.environ.setdefault("PIPELINE_OUTPUTS", "outputs")  # paths need no Hydra runtime here
    return plan_rows(compose_jobs(argv))


def plan_rows(jobs: Sequence[DictConfig]) -> pd.DataFrame:
    """One row per composed job config, in launch order."""
    rows = []
    for number, job in enumerate(jobs):
        est = estimate(job)
        budgets = {split: int(tokens) for split, tokens in job.data.budgets.items()}
        overrides = OmegaConf.to_container(job.hydra.overrides.task, resolve=False) if "hydra" in job else []
        rows.append(
            {
                "job": number,
                "model": str(job.model.name),
                "heads": str(job.heads.head_type),
                "head_layers": ",".join(str(layer) for layer in job.model.head_layers),
                "train": _tokens(budgets.get("train", 0)),
                "validation": _tokens(budgets.get("validation", 0)),
                "test": _tokens(budgets.get("test", 0)),
                "shards_gb": est["extract_gb"],
                "checkpoint_gb": est["checkpoint_gb"],
                "disk_gb": est["disk_gb"],
                "gpu_h": est["total_h"],
                "overrides": " ".join(str(o) for o in overrides),
            }
        )
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)


def print_plan(table: pd.DataFrame, argv: Sequence[str]) -> None:
    command = " ".join(["python -m pipeline", *argv])
    print(f"PLAN of `{command}`: {len(table)} job(s), nothing run. Disk and A100 GPU-hours are ESTIMATES")
    print("(pipeline/sweep/estimate.py); disk_gb = shards + heads + head checkpoint + model download.")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    # Jobs that differ only downstream of extraction (smoke's two head types) share one extraction.
    extractions = table.drop_duplicates(["model", "head_layers", "train", "validation", "test"])
    print(
        f"total: {extractions['shards_gb'].sum():.1f} GB of shards ({len(extractions)} extraction(s), shared "
        f"between jobs of the same model and budgets), {table['gpu_h'].sum():.2f} GPU-h"
    )
