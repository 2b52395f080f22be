"""What runs when a sweep ends: `summarize` (summary files, the printed comparison, the report), and the
Hydra callback that calls it at the end of a multirun (registered under `hydra.callbacks` by the
experiments in conf/experiment/)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.sweep.collect import SUMMARY_CSV, write_summary
from pipeline.sweep.compare import comparison, print_comparison

log = logging.getLogger(__name__)


def summarize(
    sweep_dir: str | Path, report: bool = True, wandb_cfg: DictConfig | None = None, group: str | None = None
) -> pd.DataFrame:
    """Write the summary files, print the comparison and (optionally) build the report. Returns the summary."""
    sweep_dir = Path(sweep_dir)
    summary, jobs = write_summary(sweep_dir)
    log.info("sweep summary: %d rows from %d job(s) -> %s", len(summary), len(jobs), sweep_dir / SUMMARY_CSV)
    print_comparison(comparison(summary), jobs, title=sweep_dir.name)
    if report:
        # Imported here: the report draws figures (matplotlib), which a summary alone does not need.
        from pipeline.sweep.report import build_report

        build_report(summary, sweep_dir, wandb_cfg=wandb_cfg, group=group or sweep_dir.name)
    return summary


class SweepSummaryCallback(Callback):
    """Hydra callback: aggregate when a multirun ends.

    Hydra calls `on_multirun_end` only when every job succeeded; after a failure, run
    `python -m pipeline.sweep <sweep dir>` (it summarizes whatever jobs finished).
    """

    def __init__(self, report: bool = True) -> None:
        self.report = report

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            logger_cfg = config.get("logger")
            wandb_cfg = None
            if logger_cfg is not None and logger_cfg.get("enabled", False):
                # The report's W&B runs go where the stages' runs are (same directory, project and group).
                wandb_cfg = OmegaConf.create(
                    {**OmegaConf.to_container(logger_cfg, resolve=True), "dir": str(config.paths.wandb)}
                )
            group = str((logger_cfg or {}).get("group") or sweep_dir.name)
            summarize(sweep_dir, report=self.report, wandb_cfg=wandb_cfg, group=group)
        except Exception:  # noqa: BLE001 - a summary failure must not hide that every job finished
            log.exception("sweep summary failed; rerun it with `python -m pipeline.sweep %s`", sweep_dir)
