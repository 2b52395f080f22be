"""Loading the results tables of a run or a sweep, and small selectors over the long results table.

The notebooks and `python -m analysis` read only what the pipeline writes; the row format (columns, label
vocabulary, normalisation) is pipeline/orchestration/results.py, which needs pandas only:

- a **run directory** holds `results.csv` and `tables/<stage>/<name>.parquet`;
- a **sweep directory** holds `summary.parquet` / `summary.csv` (the same long table, concatenated over jobs,
  the `model` column telling them apart) and, somewhere below it, each job's run directory with its tables.

A directory with neither (e.g. a Hydra multirun whose end-callback did not run) is read as the union of every
`results.csv` below it, so a figure can still be rebuilt from whatever finished.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.orchestration.results import COLUMNS, RESULTS_FILE, normalize

log = logging.getLogger("analysis")

SUMMARY_FILES = ("summary.parquet", "summary.csv")
TOKEN_TABLE = Path("tables") / "metrics" / "token_metrics.parquet"


@dataclass
class Results:
    """Everything the figures read: the long results table and the per-token metric tables by model."""

    frame: pd.DataFrame
    token_tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    source: Path | None = None

    @property
    def models(self) -> list[str]:
        return model_order(self.frame, extra=self.token_tables)


def _read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def _run_dirs(root: Path) -> list[Path]:
    """Run directories at or below `root`, in a stable order (sorted paths)."""
    return sorted({p.parent for p in root.rglob(RESULTS_FILE)})


def _model_of_run(run_dir: Path) -> str | None:
    path = run_dir / RESULTS_FILE
    if not path.is_file() or path.stat().st_size == 0:
        return None
    models = pd.read_csv(path, usecols=lambda c: c == "model")
    names = models["model"].dropna().unique() if "model" in models else []
    return str(names[0]) if len(names) == 1 else None


def load_token_tables(root: Path) -> dict[str, pd.DataFrame]:
    """Per-token metric tables below `root`, by model (taken from the table's own `model` column when present,
    else from the run's results.csv). Several tables for one model are concatenated in path order."""
    tables: dict[str, list[pd.DataFrame]] = {}
    for path in sorted(root.rglob(str(TOKEN_TABLE))):
        run_dir = path.parents[2]
        try:
            table = pd.read_parquet(path)
        except Exception as err:  # a corrupt or partial table must not cost the other figures
            log.warning("skipping unreadable token table %s: %s", path, err)
            continue
        if "model" in table:
            for model, part in table.groupby("model", sort=True):
                tables.setdefault(str(model), []).append(part.drop(columns="model"))
            continue
        model = _model_of_run(run_dir)
        if model is None:
            log.warning(
                "skipping token table %s: cannot tell its model (no single model in %s)",
                path,
                run_dir / RESULTS_FILE,
            )
            continue
        tables.setdefault(model, []).append(table)
    return {m: pd.concat(parts, ignore_index=True) for m, parts in tables.items()}


def load(path: str | Path) -> Results:
    """Read a run directory, a sweep directory, or a single results/summary file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no results at {path}: pass a run directory (with {RESULTS_FILE}) or a sweep "
            f"directory (with {' or '.join(SUMMARY_FILES)})"
        )
    if path.is_file():
        return Results(normalize(_read_table(path)), load_token_tables(path.parent), path)
    for name in (*SUMMARY_FILES, RESULTS_FILE):
        if (path / name).is_file():
            return Results(normalize(_read_table(path / name)), load_token_tables(path), path)
    runs = _run_dirs(path)
    if not runs:
        raise FileNotFoundError(
            f"{path} holds no {RESULTS_FILE} and no sweep summary ({', '.join(SUMMARY_FILES)})"
        )
    log.info("no summary in %s: reading the %d results.csv files below it", path, len(runs))
    frames = [pd.read_csv(r / RESULTS_FILE) for r in runs if (r / RESULTS_FILE).stat().st_size > 0]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    return Results(normalize(frame), load_token_tables(path), path)


Wanted = str | Iterable[str] | None


def select(
    frame: pd.DataFrame,
    stage: Wanted = None,
    metric: Wanted = None,
    model: Wanted = None,
    head: Wanted = None,
    *,
    setting: Wanted = None,
    split: Wanted = None,
    confidence: Wanted = None,
    calibration: Wanted = None,
    fill: Wanted = None,
) -> pd.DataFrame:
    """Rows matching every given column (a string or a collection of accepted values); the label columns
    (setting, split, confidence, calibration, fill) are described in pipeline/orchestration/results.py."""
    mask = pd.Series(True, index=frame.index)
    for column, wanted in (
        ("stage", stage),
        ("metric", metric),
        ("model", model),
        ("head", head),
        ("setting", setting),
        ("split", split),
        ("confidence", confidence),
        ("calibration", calibration),
        ("fill", fill),
    ):
        if wanted is None:
            continue
        values = [wanted] if isinstance(wanted, str) else list(wanted)
        mask &= frame[column].isin(values).fillna(False)
    return frame[mask]


def per_head(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows for numbered heads only (drops 'all' and head-less rows), with an integer `head_idx` column."""
    numbered = frame[frame["head"].str.fullmatch(r"\d+").fillna(False)].copy()
    numbered["head_idx"] = numbered["head"].astype(int)
    return numbered


def head_labels(frame: pd.DataFrame) -> dict[int, str]:
    """'head i (block b)' when the `layer` column says which block a head reads, else 'head i'."""
    rows = per_head(frame)
    labels: dict[int, str] = {}
    for idx in sorted(rows["head_idx"].unique()):
        layers = rows.loc[rows["head_idx"] == idx, "layer"].dropna() if "layer" in rows else pd.Series([])
        labels[idx] = f"head {idx} (block {int(layers.iloc[0])})" if len(layers) else f"head {idx}"
    return labels


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmb])\b", re.IGNORECASE)
_SCALE = {"k": 1e3, "m": 1e6, "b": 1e9}


def model_size(frame: pd.DataFrame, model: str) -> float:
    """Parameter count: the backbone stage's `n_params` row, else parsed from the name ('pythia-1.4b'), else NaN."""
    rows = select(frame, stage="backbone", metric="n_params", model=model)["value"].dropna()
    if len(rows):
        return float(rows.iloc[0])
    match = _SIZE.search(model)
    return float(match.group(1)) * _SCALE[match.group(2).lower()] if match else float("nan")


def model_order(frame: pd.DataFrame, extra: Iterable[str] = ()) -> list[str]:
    """Models by size (unknown sizes last), then by name, so every figure lists them the same way."""
    names = set(frame["model"].dropna().astype(str)) | {str(m) for m in extra}
    sizes = {m: model_size(frame, m) for m in names}
    return sorted(names, key=lambda m: (np.isnan(sizes[m]), sizes[m] if not np.isnan(sizes[m]) else 0.0, m))


def slug(name: str) -> str:
    """A file-name-safe form of a model name ('EleutherAI/pythia-70m' -> 'EleutherAI_pythia-70m')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def tasks(frame: pd.DataFrame, prefix: str) -> list[str]:
    """Benchmark names from metrics like 'acc/<task>'."""
    metrics = frame["metric"].dropna().astype(str)
    return sorted({m.split("/", 1)[1] for m in metrics if m.startswith(prefix + "/")})


def outputs_root() -> Path:
    """Where the pipeline writes (conf/paths: $PIPELINE_OUTPUTS, else outputs/ in the repository), found the
    same way from a notebook whatever folder Jupyter was started in."""
    env = os.environ.get("PIPELINE_OUTPUTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "outputs"


def latest_run(root: str | Path | None = None) -> Path:
    """The most recently written run or sweep under `root` (runs/ and multirun/ as laid out by conf/paths),
    for notebooks opened without a `results` parameter."""
    root = Path(root) if root is not None else outputs_root()
    candidates = [
        p.parent
        for name in (RESULTS_FILE, *SUMMARY_FILES)
        for sub in ("runs", "multirun")
        if (root / sub).is_dir()
        for p in (root / sub).rglob(name)
    ]
    if not candidates:
        raise FileNotFoundError(
            f"no run under {root}/runs or {root}/multirun: run `python -m pipeline` first, "
            "or set the notebook's `results` parameter"
        )
    # Newest by the results file's mtime; the path breaks ties so the choice is stable.
    return max(
        candidates,
        key=lambda d: (
            max((d / n).stat().st_mtime for n in (RESULTS_FILE, *SUMMARY_FILES) if (d / n).is_file()),
            str(d),
        ),
    )


def resolve(results: str | Path | None, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Notebook parameters -> (results location, figure folder). Empty `results` means the latest run;
    empty `out_dir` means `<results>/figures`, as for `python -m analysis`."""
    path = Path(results) if results else latest_run()
    out = Path(out_dir) if out_dir else (path if path.is_dir() else path.parent) / "figures"
    return path, out
