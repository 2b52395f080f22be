"""Sweeps: collect a Hydra multirun's per-job results into one summary, compare models, estimate costs.

A multirun directory holds one subdirectory per job, each with Hydra's `.hydra/` record and the runner's
`results.csv`. Aggregation only reads those files, so it works the same after the local launcher, after
SLURM (the submitting process waits for the array), and by hand after a sweep that failed half-way:

    python -m pipeline.sweep outputs/multirun/full_sweep/2026-01-01_12-00-00     # summary + report
    python -m pipeline.sweep --estimate                                           # disk / GPU-time table

Outputs, next to the job directories: `summary.csv` and `summary.parquet` (the long results table of every
job, with `job`, `variant` and swept-override columns added), `jobs.csv` (one line per job: status, rows),
and the comparison report (pipeline/report.py).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.orchestration.results import COLUMNS, RESULTS_FILE, read_results

log = logging.getLogger(__name__)

SUMMARY_CSV = "summary.csv"
SUMMARY_PARQUET = "summary.parquet"
JOBS_CSV = "jobs.csv"
# Columns the summary adds in front of the results columns.
JOB_COLUMNS = ["job", "job_num", "variant", "seed"]


# --- collecting -------------------------------------------------------------------------------------------


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
        if "head" in frame:
            frame["head"] = frame["head"].map(_head_label, na_action="ignore").astype("string")
        meta = {"job": job.name, "job_num": job.num, "variant": labels[job.name], "seed": job.seed}
        meta.update({_column_name(k): job.overrides.get(k) for k in swept})
        frames.append(frame.assign(**meta))
    jobs_frame = pd.DataFrame(
        status, columns=["job", "job_num", "variant", "model", "seed", "status", "rows", "overrides"]
    )
    if not frames:
        return pd.DataFrame(columns=JOB_COLUMNS + COLUMNS), jobs_frame
    summary = pd.concat(frames, ignore_index=True)
    first = JOB_COLUMNS + [c for c in COLUMNS if c in summary]
    return summary[first + [c for c in summary.columns if c not in first]], jobs_frame


def _head_label(value: Any) -> Any:
    # A stage whose rows mix head=None and head=0 gets a float column from pandas, so results.csv says "0.0";
    # heads are indices or "all", so print integral floats as integers.
    text = str(value)
    if text.endswith(".0") and text[:-2].isdigit():
        return text[:-2]
    return value


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns mixing strings and numbers (e.g. `head`: 0..3 and "all") as nullable strings, which
    parquet can store; numeric columns are left alone."""
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
    """The summary table, typed as the stages wrote it (`head` and `method` as strings)."""
    path = Path(sweep_dir_or_file)
    if path.is_dir():
        path = path / SUMMARY_PARQUET if (path / SUMMARY_PARQUET).is_file() else path / SUMMARY_CSV
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    for column in ("method", "head"):
        if column in frame:
            frame[column] = frame[column].astype("string")
    return frame


# --- comparing --------------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([mbk])\b", re.IGNORECASE)


def size_of(name: str) -> float:
    """Parameters implied by a model name (pythia-1.4b -> 1.4e9), for ordering; unknown sizes sort first."""
    match = _SIZE_RE.search(str(name))
    if not match:
        return 0.0
    return float(match.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9}[match.group(2).lower()]


def variant_order(summary: pd.DataFrame) -> list[str]:
    """Variants by model size (measured n_params where the backbone stage reported it, else the name)."""
    if summary.empty:
        return []
    params = summary[(summary["stage"] == "backbone") & (summary["metric"] == "n_params")]
    measured = params.groupby("variant")["value"].max().to_dict()
    variants = summary.drop_duplicates("variant")[["variant", "model", "job_num"]]
    return [
        v
        for v, *_ in sorted(
            (
                (r.variant, measured.get(r.variant, size_of(r.model)), r.job_num)
                for r in variants.itertuples()
            ),
            key=lambda t: (t[1], t[2]),
        )
    ]


@dataclass(frozen=True)
class Selector:
    """One line of the comparison: rows matching (stage, method, metric[, eps, head]), reduced per variant."""

    label: str
    stage: str
    metric: str
    method: str | None = None  # None: any method
    eps: float | None = None  # None: any ε; otherwise the present ε closest to it
    head: str | None = None  # None: any head
    reduce: str = "mean"  # mean | max | min over the matching rows (heads, tasks, ε)
    metric_prefix: bool = False  # metric is a prefix (acc/<task>: mean over tasks)
    scale: float = 1.0  # shown value = value × scale

    def pick(self, frame: pd.DataFrame) -> pd.Series:
        sel = frame[frame["stage"] == self.stage]
        metric = sel["metric"].astype(str)
        sel = sel[metric.str.startswith(self.metric) if self.metric_prefix else metric == self.metric]
        if self.method is not None:
            sel = sel[sel["method"].fillna("").astype(str) == self.method]
        if self.head is not None:
            sel = sel[sel["head"].astype(str) == self.head]
        if self.eps is not None and not sel.empty:
            eps = pd.to_numeric(sel["eps"], errors="coerce")
            if eps.notna().any():
                nearest = eps.dropna().unique()[abs(eps.dropna().unique() - self.eps).argmin()]
                sel = sel[eps == nearest]
        if sel.empty:
            return pd.Series(dtype=float)
        return sel.groupby("variant")["value"].agg(self.reduce) * self.scale


# The numbers a reader wants side by side first; stages that have not run simply leave their lines out.
COMPARISON: tuple[Selector, ...] = (
    Selector("parameters (M)", "backbone", "n_params", method="", scale=1e-6),
    Selector("extraction bytes/token", "extract", "bytes_per_token", method=""),
    Selector("head KL to full model (mean over heads)", "heads", "kl", method="trained"),
    Selector("head agreement with full model (mean)", "heads", "agree", method="trained"),
    Selector("AUROC entropy (mean over heads)", "metrics", "auroc", method="entropy"),
    Selector("AUROC max_prob (mean over heads)", "metrics", "auroc", method="max_prob"),
    Selector(
        "calibrated accuracy @ε≈0.9 (empirical)",
        "calibrate",
        "accuracy",
        method="empirical",
        eps=0.9,
        head="all",
    ),
    Selector(
        "calibrated coverage @ε≈0.9 (empirical)",
        "calibrate",
        "coverage",
        method="empirical",
        eps=0.9,
        head="all",
    ),
    Selector(
        "benchmark accuracy, full model (mean over tasks)",
        "early_exit",
        "acc/",
        method="full",
        metric_prefix=True,
    ),
    Selector(
        "benchmark accuracy @ε≈0.9 (mean over tasks)",
        "early_exit",
        "acc/",
        method="empirical",
        eps=0.9,
        metric_prefix=True,
    ),
    Selector(
        "compute fraction @ε≈0.9 (mean over tasks)",
        "early_exit",
        "compute_frac/",
        method="empirical",
        eps=0.9,
        metric_prefix=True,
    ),
    Selector("DSSD acceptance rate (best ε)", "decoding", "acceptance_rate", method="dssd", reduce="max"),
    Selector(
        "LayerSkip acceptance rate (tuned)", "decoding", "acceptance_rate", method="layerskip", reduce="max"
    ),
    Selector(
        "DSSD / LayerSkip acceptance (best ε)",
        "decoding",
        "acceptance_ratio",
        method="dssd_vs_layerskip",
        reduce="max",
    ),
    Selector(
        "DSSD speedup vs generate (best ε)", "decoding", "speedup_vs_generate", method="dssd", reduce="max"
    ),
    Selector(
        "LayerSkip speedup vs generate", "decoding", "speedup_vs_generate", method="layerskip", reduce="max"
    ),
)


def comparison(summary: pd.DataFrame, selectors: Sequence[Selector] = COMPARISON) -> pd.DataFrame:
    """Key numbers, one row per selector, one column per variant (ordered by model size)."""
    order = variant_order(summary)
    rows = {}
    for selector in selectors:
        values = selector.pick(summary)
        if not values.empty:
            rows[selector.label] = values
    if not rows:
        return pd.DataFrame(columns=order)
    return pd.DataFrame(rows).T.reindex(columns=order)


def print_comparison(table: pd.DataFrame, jobs: pd.DataFrame | None = None, title: str = "sweep") -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=200)
    if jobs is not None and not jobs.empty:
        missing = jobs[jobs["status"] != "ok"]
        console.print(
            f"[bold]{escape(title)}[/bold]: {len(jobs)} job(s), {len(jobs) - len(missing)} with results"
            + (f"; missing: {escape(', '.join(missing['job']))}" if len(missing) else "")
        )
    if table.empty:
        console.print("no comparable rows yet")
        return
    out = Table(title=f"{escape(title)}: comparison across models", caption="full table: summary.csv")
    out.add_column("")
    for variant in table.columns:
        out.add_column(escape(str(variant)), justify="right")  # "tiny [heads=mlp]" is not rich markup
    for label, values in table.iterrows():
        out.add_row(escape(str(label)), *("" if pd.isna(v) else f"{v:.4g}" for v in values))
    console.print(out)


def summarize(
    sweep_dir: str | Path, report: bool = True, wandb_cfg: DictConfig | None = None, group: str | None = None
) -> pd.DataFrame:
    """Write the summary files, print the comparison and (optionally) build the report. Returns the summary."""
    sweep_dir = Path(sweep_dir)
    summary, jobs = write_summary(sweep_dir)
    log.info("sweep summary: %d rows from %d job(s) -> %s", len(summary), len(jobs), sweep_dir / SUMMARY_CSV)
    print_comparison(comparison(summary), jobs, title=sweep_dir.name)
    if report:
        from pipeline.report import build_report

        build_report(summary, sweep_dir, wandb_cfg=wandb_cfg, group=group or sweep_dir.name)
    return summary


class SweepSummaryCallback(Callback):
    """Hydra callback (registered under `hydra.callbacks` by the experiments): aggregate when a multirun ends.

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


# --- estimating disk and GPU time ------------------------------------------------------------------------

# Pythia parameter counts (total, from the model cards) and vocabulary (padded unembedding rows).
PYTHIA_PARAMS = {
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
}
PYTHIA_VOCAB = 50_304
# Assumed sustained throughput on one A100-80GB: 40 % of the dense peak (312 TFLOP/s bf16, 156 TF32).
ASSUMED_TFLOPS = {"bfloat16": 125.0, "float16": 125.0, "float32": 62.0}
# lm-eval zero-shot suite of full_sweep (8 tasks): about 6M scored tokens per pass over all tasks.
SUITE_TOKENS = 6_000_000
# Batch-1 decoding through the layer-wise engine: about 1 ms per transformer block per token (launch-bound).
MS_PER_BLOCK_TOKEN = 1.0
# Shard I/O (extraction writes, head training's random-token reads): 1 GB/s sustained from local NVMe.
DISK_GB_PER_S = 1.0


def estimate(cfg: DictConfig) -> dict[str, float]:
    """Disk and A100 GPU-hours for one composed full_sweep job, from its token budgets and FLOP counts.

    Extraction: 2·N FLOPs per token (forward with logits). Head training: per token, the teacher logits
    (2·d·V) plus each head's forward and backward (3 × 2·d·V). Metrics/calibration: teacher + heads forward on
    validation + test. Benchmarks: full model plus the heads, one pass for the full model and one per
    (method, ε). Decoding: batch-1, launch-bound, so time ∝ generated tokens × blocks. Shard I/O at
    DISK_GB_PER_S. Model download, MiniPile streaming and lm-eval's dataset preparation are not counted.
    """
    name, d = str(cfg.model.name), int(cfg.model.d_model)
    n_heads, n_layers = len(cfg.model.head_layers), int(cfg.model.num_layers)
    n_params = PYTHIA_PARAMS.get(name, 0)
    budgets = {k: int(v) for k, v in cfg.data.budgets.items()}
    tokens = sum(budgets.values())
    per_token_bytes = (n_heads + 1) * d * 2 + 4
    head_flops = 2 * d * PYTHIA_VOCAB
    flops = {
        "extract": 2 * n_params * tokens,
        "heads": head_flops * (1 + 3 * n_heads) * int(cfg.heads.max_steps) * int(cfg.heads.batch_tokens),
        "metrics+calibrate": head_flops
        * (1 + n_heads)
        * (budgets.get("validation", 0) + budgets.get("test", 0)),
        "early_exit": (2 * n_params + head_flops * n_heads)
        * SUITE_TOKENS
        * (1 + len(cfg.evaluate.eps) * len(cfg.evaluate.methods)),
    }
    tflops = ASSUMED_TFLOPS.get(str(cfg.model.dtype), 62.0) * 1e12
    hours = {k: v / tflops / 3600 for k, v in flops.items()}
    dec = cfg.decoding
    # generate, greedy, oracle, tuned LayerSkip, plus early exit and DSSD at every ε; then the tuning grid.
    runs = 4 + 2 * len(dec.eps)
    gen_tokens = runs * int(dec.n_prompts) * int(dec.max_new_tokens)
    gen_tokens += n_heads * len(dec.layerskip_d) * int(dec.n_tune_prompts) * int(dec.max_new_tokens)
    hours["decoding"] = gen_tokens * n_layers * MS_PER_BLOCK_TOKEN / 1000 / 3600
    # Reading and writing shards overlaps compute only partly; count it in full (an upper bound).
    io_bytes = per_token_bytes * (
        tokens
        + int(cfg.heads.max_steps) * int(cfg.heads.batch_tokens)
        + budgets.get("validation", 0)
        + budgets.get("test", 0)
    )
    hours["shard_io"] = io_bytes / (DISK_GB_PER_S * 1e9) / 3600
    heads_bytes = n_heads * d * PYTHIA_VOCAB * 4  # fp32 head weights
    model_bytes = n_params * 2  # fp16 checkpoint in the HF cache
    return {
        "bytes_per_token": per_token_bytes,
        "extract_tokens": tokens,
        "extract_gb": per_token_bytes * tokens / 1e9,
        "other_gb": (heads_bytes + model_bytes) / 1e9,
        **{f"{k}_h": v for k, v in hours.items()},
        "total_h": sum(hours.values()),
    }


def estimate_table(models: Sequence[str] | None = None, experiment: str = "full_sweep") -> pd.DataFrame:
    """`estimate` for every model of the experiment's sweep (composed exactly as the multirun would)."""
    import os

    from hydra import compose, initialize_config_dir

    from pipeline.__main__ import CONFIG_DIR

    os.environ.setdefault("PIPELINE_OUTPUTS", "outputs")  # paths need no Hydra runtime here
    rows = {}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        base = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
        axis = models or str(base.hydra.sweeper.params.model).split(",")
        for model in axis:
            cfg = compose("config", overrides=[f"+experiment={experiment}", f"model={model}"])
            rows[model] = estimate(cfg)
    return pd.DataFrame(rows).T


def print_estimates(table: pd.DataFrame) -> None:
    columns = [
        "bytes_per_token",
        "extract_tokens",
        "extract_gb",
        "other_gb",
        "extract_h",
        "heads_h",
        "metrics+calibrate_h",
        "early_exit_h",
        "decoding_h",
        "shard_io_h",
        "total_h",
    ]
    shown = table[columns].copy()
    shown["extract_tokens"] = (shown["extract_tokens"] / 1e6).map(lambda v: f"{v:.1f}M")
    print("ESTIMATE (not measured): A100-80GB at 40% of peak; see pipeline.sweep.estimate")
    print(shown.to_markdown(floatfmt=".2f") if _has_tabulate() else shown.to_string(float_format="%.2f"))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="a Hydra multirun directory")
    parser.add_argument("--no-report", action="store_true", help="write the summary only")
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="print disk and GPU-time estimates for the full_sweep sizes and exit",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.estimate:
        print_estimates(estimate_table())
        return
    if args.sweep_dir is None or not args.sweep_dir.is_dir():
        parser.error("give a sweep directory (e.g. outputs/multirun/smoke/<date>) or --estimate")
    summarize(args.sweep_dir, report=not args.no_report)


if __name__ == "__main__":
    main()
