"""Experiment tracking through Weights & Biases, kept behind a thin interface so stages never import wandb.

One W&B run per (model, stage), grouped by sweep, `job_type` = stage. Offline by default (run files under
`paths.wandb`; upload later with `wandb sync`). `logger=none` gives a `Tracker` that does nothing. Secrets
(WANDB_API_KEY) are never logged: only the resolved pipeline config is sent as the run config.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.models.backbone import host_reachable

log = logging.getLogger(__name__)


class Tracker:
    """No-op tracker (logger=none). `WandbTracker` overrides every method."""

    enabled = False

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_table(self, name: str, frame: pd.DataFrame) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def log_artifact(self, name: str, kind: str, path: str | Path) -> None:
        pass

    def lightning_logger(self):
        return None

    def finish(self) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


class WandbTracker(Tracker):
    enabled = True

    def __init__(self, logger_cfg, run_name: str, job_type: str, group: str, config: dict, directory: Path):
        import wandb

        mode = str(logger_cfg.mode)
        if mode == "online" and not _wandb_reachable():
            log.warning(
                "W&B online mode requested but api.wandb.ai is unreachable: logging offline instead "
                "(upload later with `wandb sync %s`)",
                directory,
            )
            mode = "offline"
        directory.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.run = wandb.init(
            project=str(logger_cfg.project),
            entity=logger_cfg.entity,
            name=run_name,
            group=group,
            job_type=job_type,
            tags=list(logger_cfg.tags or []),
            config=config,
            dir=str(directory),
            mode=mode,
            reinit="finish_previous",
            settings=wandb.Settings(init_timeout=60, console="off", x_disable_stats=True),
        )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, frame: pd.DataFrame) -> None:
        self.run.log({name: self._wandb.Table(dataframe=frame.reset_index(drop=True))})

    def summary(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value

    def log_artifact(self, name: str, kind: str, path: str | Path) -> None:
        artifact = self._wandb.Artifact(name=_artifact_name(name), type=kind)
        path = Path(path)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def lightning_logger(self):
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(experiment=self.run)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _artifact_name(name: str) -> str:
    # W&B artifact names allow alphanumerics, dashes, underscores and dots only.
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)


def _wandb_reachable() -> bool:
    # Not hub_reachable: HF_HUB_OFFLINE says nothing about W&B.
    return host_reachable("api.wandb.ai")


def make_tracker(cfg, stage: str, group: str) -> Tracker:
    """A tracker for one (model, stage) run; the caller must `finish()` it (use it as a context manager)."""
    from omegaconf import OmegaConf

    if not cfg.logger.enabled or cfg.logger.mode == "disabled":
        return Tracker()
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    return WandbTracker(
        cfg.logger,
        run_name=f"{cfg.model.name}/{stage}",
        job_type=stage,
        group=str(cfg.logger.group or group),
        config=config,
        directory=Path(cfg.paths.wandb),
    )
