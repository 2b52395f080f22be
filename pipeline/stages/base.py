"""The stage interface. One module per stage under `pipeline/stages/`, each thin: it reads its inputs, calls
the core library (pipeline/*.py, lightning_modules/), writes files into `ctx.out_dir` and returns result rows.

A stage module defines one `Stage` object named `STAGE`:

    STAGE = Stage(
        name="calibrate",
        upstream=("backbone", "extract", "heads"),       # stages whose finished outputs it reads
        key_config=lambda cfg: {"calibrate": cfg.calibrate},   # the config subtree that defines its output
        run=run,                                         # run(ctx: StageContext) -> StageOutput
    )

The runner (pipeline/orchestration/runner.py) hashes `key_config(cfg)` together with the upstream stages' keys, reuses a
finished output when one exists, and otherwise calls `run` with `ctx.out_dir` pointing at a fresh temporary
directory that is renamed into place only after `run` returns. So a stage never needs to clean up after a
crash, and must write *only* into `ctx.out_dir`. Volatile settings (device, log level, progress bars) must
not appear in `key_config`.

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


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    key_config: Callable[[DictConfig], Any]
    run: Callable[[StageContext], StageOutput]
    # Checks that need no heavy work, run before any stage starts (bad input fails in seconds).
    validate: Callable[[DictConfig], None] | None = None
    # A resumable stage finds its previous `.partial` work directory intact after a crash (e.g. training
    # checkpoints); others always start from an empty directory.
    resumable: bool = False
