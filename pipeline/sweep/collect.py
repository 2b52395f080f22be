"""Collecting a sweep: every job directory of a Hydra multirun, its results, one summary table.

Outputs, next to the job directories: `summary.csv` and `summary.parquet` (the long results table of every
job, with `job`, `variant` and swept-override columns in front) and `jobs.csv` (one line per job: status,
rows). The summary's results columns are those of pipeline/orchestration/results.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline.orchestration.results import COLUMNS, RESULTS_FILE, normalize, read_results

SUMMARY_CSV = "summary.csv"
SUMMARY_PARQUET = "summary.parquet"
JOBS_CSV = "jobs.csv"
# Columns the summary adds in front of the results columns.
JOB_COLUMNS = ["job", "job_num", "variant", "seed"]
JOBS_FRAME_COLUMNS = ["job", "job_num", "variant", "model", "seed", "status", "rows", "overrides"]


@dataclass
class Job:
    """One job directory of a sweep, as Hydra left it."""

    path: Path
    num: int
    overrides: dict[str, str]  # this job's command-line/sweep overrides, key -> value string
    seed: int | None
    model: str | None

    @property
    def name(self) -> str:
        return self.path.name


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _parse_overrides(lines: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines or []:
        key, sep, value = str(line).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Every job directory under `sweep_dir` (any depth: Hydra's subdir pattern may nest), by job number."""
    jobs = []
    for hydra_dir in sorted(sweep_dir.rglob(".hydra")):
        job_dir = hydra_dir.parent
        if job_dir == sweep_dir or ".submitit" in job_dir.parts:
            continue
        hydra_cfg = _read_yaml(hydra_dir / "hydra.yaml") or {}
        config = _read_yaml(hydra_dir / "config.yaml") or {}
        num = (hydra_cfg.get("hydra", {}).get("job", {}) or {}).get("num")
        jobs.append(
            Job(
                path=job_dir,
                num=int(num) if num is not None else len(jobs),
                overrides=_parse_overrides(_read_yaml(hydra_dir / "overrides.yaml")),
                seed=config.get("seed"),
                model=(config.get("model") or {}).get("name"),
            )
        )
    return sorted(jobs, key=lambda job: (job.num, job.name))


def _swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (the sweep axes actually used), model excluded."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    return [k for k in keys if k != "model" and len({job.overrides.get(k) for job in jobs}) > 1]


def _variant_labels(jobs: list[Job], swept: list[str]) -> dict[str, str]:
    """A short label per job: the model name, plus the other swept values when they distinguish jobs."""
    labels = {}
    for job in jobs:
        extra = [f"{k.split('.')[-1]}={job.overrides[k]}" for k in swept if k in job.overrides]
        labels[job.name] = str(job.model or job.overrides.get("model", job.name)) + (
            f" [{', '.join(extra)}]" if extra else ""
        )
    return labels


def _column_name(key: str) -> str:
    # Swept override `heads` becomes column `heads`; names the results table already uses get a prefix.
    name = re.sub(r"[^0-9A-Za-z_]+", "_", key)
    return f"override_{name}" if name in COLUMNS or name in JOB_COLUMNS else name


def collect(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, jobs): the long results table of every job in the sweep, and one status line per job."""
    sweep_dir = Path(sweep_dir)
    jobs = find_jobs(sweep_dir)
    swept = _swept_keys(jobs)
    labels = _variant_labels(jobs, swept)
    frames, status = [], []
    for job in jobs:
        path = job.path / RESULTS_FILE
        frame = read_results(path) if path.is_file() and path.stat().st_size > 0 else None
        status.append(
            {
                "job": job.name,
                "job_num": job.num,
                "variant": labels[job.name],
                "model": job.model,
                "seed": job.seed,
                "status": "missing" if frame is None else "ok",
                "rows": 0 if frame is None else len(frame),
                "overrides": " ".join(f"{k}={v}" for k, v in job.overrides.items()),
            }
        )
        if frame is None or frame.empty:
            continue
        meta = {"job": job.name, "job_num": job.num, "variant": labels[job.name], "seed": job.seed}
        axes = {_column_name(k): job.overrides.get(k) for k in swept}
        # Job columns in front, the swept axes after the results columns.
        frames.append(pd.DataFrame(meta, index=frame.index).join(frame).assign(**axes))
    jobs_frame = pd.DataFrame(status, columns=JOBS_FRAME_COLUMNS)
    if not frames:
        return normalize(pd.DataFrame(columns=JOB_COLUMNS + COLUMNS)), jobs_frame
    return normalize(pd.concat(frames, ignore_index=True)), jobs_frame


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns mixing strings and numbers (e.g. a swept override) as nullable strings, which parquet
    can store; numeric columns are left alone."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = (
                out[column]
                .map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
                .astype("string")
            )
    return out


def write_summary(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    sweep_dir = Path(sweep_dir)
    summary, jobs = collect(sweep_dir)
    summary = _parquet_safe(summary)
    summary.to_csv(sweep_dir / SUMMARY_CSV, index=False)
    summary.to_parquet(sweep_dir / SUMMARY_PARQUET, index=False)
    jobs.to_csv(sweep_dir / JOBS_CSV, index=False)
    return summary, jobs


def read_summary(sweep_dir_or_file: str | Path) -> pd.DataFrame:
    """The summary table (parquet when present, else CSV), normalised like any results table."""
    path = Path(sweep_dir_or_file)
    if path.is_dir():
        path = path / SUMMARY_PARQUET if (path / SUMMARY_PARQUET).is_file() else path / SUMMARY_CSV
    return read_results(path)
