"""The stage interface. One module per stage under `pipeline/stages/`, each thin: it reads its inputs, calls
the core library (pipeline/*/, lightning_modules/), writes files into `ctx.out_dir` and returns result rows.

A stage module defines one `Stage` object named `STAGE`:

    STAGE = Stage(
        name="calibrate",
        upstream=("backbone", "extract", "heads"),  # stages whose finished outputs it reads
        run=run,                                    # run(ctx: StageContext) -> StageOutput
        group="calibrate",                          # its config group (schema: pipeline/config/stages.py)
        key_facts=seed_fact,                        # what else defines its output (seed, model/data facts)
    )

Cache key, one rule for every stage (`Stage.key_config`): the stage's group, resolved, minus the fields its
schema marks volatile, plus its `key_facts`. The runner (pipeline/orchestration/runner.py) hashes that with
the upstream stages' keys, reuses a finished output when one exists, and otherwise calls `run` with
`ctx.out_dir` pointing at a fresh temporary directory that is renamed into place only after `run` returns.
So a stage never needs to clean up after a crash, and must write *only* into `ctx.out_dir`.

Checks (`Stage.validate`, run before any stage starts, so bad input fails in seconds): the group's schema
(every field's range, and `check(cfg)` against other groups), then the stage's own `checks` for what a schema
cannot see (disk space, network).

Result rows are long-format dicts with the keys of `pipeline.orchestration.results.COLUMNS`
(model, stage, method, eps, head, metric, value); `model` and `stage` are filled in by the runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig

from pipeline.config import SCHEMAS, group_key, group_settings
from pipeline.orchestration.tracking import Tracker


@dataclass
class StageContext:
    cfg: DictConfig  # the full resolved config of this run
    out_dir: Path  # temporary output directory; becomes the stage's cache entry on success
    inputs: dict[str, Path]  # finished output directories of the upstream stages, by stage name
    device: torch.device
    tracker: Tracker  # W&B (or no-op) run for this stage: .log(), .log_table(), .summary()
    progress: bool = True  # show progress bars
    key: str = ""  # this stage's cache key

    @property
    def model_name(self) -> str:
        return str(self.cfg.model.name)


@dataclass
class StageOutput:
    rows: list[dict[str, Any]] = field(default_factory=list)  # results rows (long format)
    metrics: dict[str, Any] = field(default_factory=dict)  # summary numbers for the completion record
    # Larger tables for notebooks (e.g. per-token metric values): saved as `tables/<name>.parquet` in the
    # stage output and copied into the run directory as `tables/<stage>/<name>.parquet`.
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def seed_fact(cfg: DictConfig) -> dict[str, Any]:
    """The run's seed: part of the key of every stage whose output depends on it."""
    return {"seed": int(cfg.seed)}


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    run: Callable[[StageContext], StageOutput]
    # The config group the stage reads (named after the stage); None for a stage keyed by facts only.
    group: str | None = None
    # What else defines the output, beyond the group: the seed, model and data facts (a corpus fingerprint).
    key_facts: Callable[[DictConfig], dict[str, Any]] | None = None
    # Checks beyond the group's schema that need no heavy work (disk space, a reachable hub).
    checks: Callable[[DictConfig], None] | None = None
    # A resumable stage finds its previous `.partial` work directory intact after a crash (e.g. training
    # checkpoints); others always start from an empty directory.
    resumable: bool = False

    def key_config(self, cfg: DictConfig) -> dict[str, Any]:
        """What defines this stage's output (the one cache-key rule, pipeline/config/groups.py)."""
        key: dict[str, Any] = {}
        if self.group is not None:
            key[self.group] = group_key(cfg, self.group)
        if self.key_facts is not None:
            key.update(self.key_facts(cfg))
        return key

    def validate(self, cfg: DictConfig) -> None:
        if self.group is not None and self.group in SCHEMAS:
            group_settings(cfg, self.group)
        if self.checks is not None:
            self.checks(cfg)
