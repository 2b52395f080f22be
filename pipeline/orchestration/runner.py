"""Runs the requested stages in dependency order, reusing finished outputs from the stage store.

Demand-driven: a requested stage whose output is finished (and not forced) is skipped; otherwise its
upstream stages are ensured first (run only if their own outputs are missing), then it runs. Each stage's
result rows are stored inside its output, so a skipped stage still contributes its rows to this run's table.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import shutil
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

import pipeline.stages as stages_pkg
from pipeline.config import check_renamed
from pipeline.models.backbone import resolve_device
from pipeline.orchestration.console import route_library_logging
from pipeline.orchestration.results import RESULTS_FILE, print_table, read_results, to_frame
from pipeline.orchestration.store import StageStore, stage_key
from pipeline.orchestration.tracking import make_tracker
from pipeline.orchestration.validation import ConfigError, check_device, validate_config
from pipeline.stages.base import Stage, StageContext

log = logging.getLogger(__name__)

# Dependency order of every stage the project knows; only those with a module in pipeline/stages/ run.
TABLES_DIR = "tables"
STAGE_ORDER = ("backbone", "extract", "heads", "metrics", "calibrate", "early_exit", "decoding")


def available_stages() -> dict[str, Stage]:
    present = {m.name for m in pkgutil.iter_modules(stages_pkg.__path__)}
    stages: dict[str, Stage] = {}
    for name in STAGE_ORDER:
        if name not in present:
            continue
        stage = importlib.import_module(f"pipeline.stages.{name}").STAGE
        # A stage whose inputs no present stage can produce cannot run (e.g. in a partial checkout).
        if all(up in stages for up in stage.upstream):
            stages[name] = stage
    return stages


def _as_list(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, ListConfig | list | tuple):
        return [str(v) for v in value]
    raise ConfigError(f"expected a stage name or a list of stage names, got {value!r}")


def requested_stages(cfg: DictConfig, known: dict[str, Stage]) -> list[str]:
    names = _as_list(cfg.stages)
    if "all" in names:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown} in stages=...; available, in order: {list(known)}")
    return [n for n in known if n in names]


def forced_stages(cfg: DictConfig, requested: list[str], known: dict[str, Stage]) -> set[str]:
    force = cfg.get("force", False)
    if force is True:
        return set(requested)
    if force is False or force is None:
        return set()
    names = _as_list(force)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown} in force=...; available: {list(known)}")
    return set(names)


def plan_keys(cfg: DictConfig, known: dict[str, Stage]) -> tuple[dict[str, str], dict[str, object]]:
    """Each stage's cache key, and the plain config it hashes: `Stage.key_config`, the one rule (its group
    minus volatile fields, plus its key facts), kept for the completion record so it runs once per stage
    (a key fact may fingerprint a whole corpus)."""
    keys: dict[str, str] = {}
    key_configs: dict[str, object] = {}
    for name, stage in known.items():
        key_configs[name] = _plain(stage.key_config(cfg))
        keys[name] = stage_key(name, key_configs[name], {up: keys[up] for up in stage.upstream})
    return keys, key_configs


def _plain(value):
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class Runner:
    def __init__(self, cfg: DictConfig, group: str = "local"):
        self.cfg = cfg
        self.group = group
        check_renamed(cfg)  # an old key (evaluate.*) fails with its new name, before anything reads it
        validate_config(cfg)  # before anything reads the config (keys, device)
        check_device(str(cfg.device), available=True)
        self.known = available_stages()
        self.requested = requested_stages(cfg, self.known)
        self.forced = forced_stages(cfg, self.requested, self.known)
        self.keys, self.key_configs = plan_keys(cfg, self.known)
        self.store = StageStore(Path(cfg.paths.cache))
        self.model = str(cfg.model.name)
        self.device = resolve_device(str(cfg.device))
        self._done: dict[str, Path] = {}
        self._verified: set[str] = set()
        self.timings: dict[str, float] = {}
        self.status: dict[str, str] = {}

    def validate(self) -> None:
        for name in self._closure(self.requested):
            stage = self.known[name]
            if stage.validate is not None:
                stage.validate(self.cfg)

    def _closure(self, names: list[str]) -> list[str]:
        needed: set[str] = set()

        def visit(name: str) -> None:
            if name not in needed:
                needed.add(name)
                for up in self.known[name].upstream:
                    visit(up)

        for name in names:
            visit(name)
        return [n for n in self.known if n in needed]

    def ensure(self, name: str) -> Path:
        """The finished output directory of `name`, computing it (and what it needs) if necessary."""
        if name in self._done:
            return self._done[name]
        key = self.keys[name]
        entry = self.store.entry(name, self.model, key)
        if self.store.is_complete(name, self.model, key) and name not in self.forced:
            log.info("stage %-10s %s: finished output reused (%s)", name, self.model, entry)
            self.status[name] = "reused"
        else:
            inputs = {up: self.ensure(up) for up in self.known[name].upstream}
            for up in inputs:
                self._verify(up)
            with self.store.lock(name, self.model, key):
                # Another process may have finished it while we waited for the lock.
                if self.store.is_complete(name, self.model, key) and name not in self.forced:
                    log.info("stage %-10s %s: finished by another process, reused", name, self.model)
                    self.status[name] = "reused"
                else:
                    self._run(name, key, inputs)
                    self.status[name] = "computed"
        self._done[name] = entry
        return entry

    def _verify(self, name: str) -> None:
        if name not in self._verified:
            self.store.verify(name, self.model, self.keys[name])
            self._verified.add(name)

    def _run(self, name: str, key: str, inputs: dict[str, Path]) -> None:
        stage = self.known[name]
        log.info("stage %-10s %s: computing (key %s)", name, self.model, key)
        started = time.time()
        record = {
            "config": self.key_configs[name],
            "upstream": {up: self.keys[up] for up in inputs},
            "seed": int(self.cfg.seed),
        }
        torch.manual_seed(int(self.cfg.seed))
        route_library_logging()  # Lightning's and transformers' chatter to the log file
        resumable = getattr(stage, "resumable", False)
        with self.store.writing(name, self.model, key, record, resumable=resumable) as (work_dir, rec):
            with make_tracker(self.cfg, name, self.group) as tracker:
                ctx = StageContext(
                    cfg=self.cfg,
                    out_dir=work_dir,
                    inputs=inputs,
                    device=self.device,
                    tracker=tracker,
                    progress=bool(self.cfg.get("progress", True)),
                    key=key,
                )
                output = stage.run(ctx)
                frame = to_frame(output.rows, model=self.model, stage=name)
                frame.to_csv(work_dir / RESULTS_FILE, index=False)
                if output.tables:
                    (work_dir / TABLES_DIR).mkdir(exist_ok=True)
                    for table_name, table in output.tables.items():
                        table.to_parquet(work_dir / TABLES_DIR / f"{table_name}.parquet", index=False)
                tracker.summary({k: v for k, v in output.metrics.items() if isinstance(v, int | float | str)})
            rec["metrics"] = output.metrics
        self._verified.add(name)
        self.timings[name] = time.time() - started
        log.info("stage %-10s %s: done in %.1f s", name, self.model, self.timings[name])

    def run(self, run_dir: Path | None = None) -> pd.DataFrame:
        self.validate()
        frames = []
        for name in self.requested:
            entry = self.ensure(name)
            path = entry / RESULTS_FILE
            if run_dir is not None and (entry / TABLES_DIR).is_dir():
                shutil.copytree(entry / TABLES_DIR, run_dir / TABLES_DIR / name, dirs_exist_ok=True)
            if path.is_file() and path.stat().st_size > 0:
                frame = read_results(path)
                if not frame.empty:
                    frames.append(frame)
        results = pd.concat(frames, ignore_index=True) if frames else to_frame([])
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            results.to_csv(run_dir / RESULTS_FILE, index=False)
        print_table(
            results,
            title=f"{self.model}: " + ", ".join(f"{n} ({self.status.get(n, '?')})" for n in self.requested),
        )
        return results


def run_pipeline(cfg: DictConfig, run_dir: Path | None = None, group: str = "local") -> pd.DataFrame:
    return Runner(cfg, group=group).run(run_dir)
