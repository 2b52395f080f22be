"""Synthetic results that follow the results vocabulary (pipeline/orchestration/results.py) for two
Pythia-like models, so the analysis notebooks and figures can be tested before (and independently of) a real
pipeline run.

The numbers are shaped like the real thing, not random noise: deeper heads agree more with the full model,
entropy separates correct from incorrect best, thresholds tighten as ε grows, LTT is more conservative than
the empirical threshold, DSSD beats the tuned LayerSkip. Everything is seeded, so files are reproducible.

    python -m tests.fixtures_results OUT_DIR     # writes OUT_DIR/run_<model>/ and OUT_DIR/sweep/
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.orchestration.results import COLUMNS

# name -> (n_params, num_layers, head blocks), head blocks by the linspace rule (docs/design.md).
MODELS = {
    "pythia-70m": (70_426_624, 6, [1, 2, 3, 4]),
    "pythia-160m": (162_322_944, 12, [2, 4, 7, 9]),
}
EPS = [0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
TASKS = ["lambada_openai", "piqa"]
METRICS = ["entropy", "max_prob", "prob_margin", "logit_margin", "saturation"]
TOKENS_PER_HEAD = 1500


def _auroc(score: np.ndarray, correct: np.ndarray) -> float:
    keep = np.isfinite(score)
    score, correct = score[keep], correct[keep]
    n_pos, n_neg = int(correct.sum()), int((~correct).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(score).rank(method="average").to_numpy()
    return float((ranks[correct].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def token_table(model: str, rng: np.random.Generator) -> pd.DataFrame:
    """Per-token metrics: columns head, layer, correct, entropy, max_prob, prob_margin, logit_margin, saturation."""
    _, n_layers, blocks = MODELS[model]
    parts = []
    for head, block in enumerate(blocks):
        depth = (block + 1) / n_layers
        p_correct = 0.35 + 0.55 * depth
        correct = rng.random(TOKENS_PER_HEAD) < p_correct
        # Correct tokens are confident: low entropy, high top-1 probability; separation grows with depth.
        sep = 1.2 + 1.5 * depth
        entropy = np.abs(rng.normal(np.where(correct, 1.5, 1.5 + sep), 0.9))
        max_prob = np.clip(np.exp(-entropy) + rng.normal(0, 0.12, TOKENS_PER_HEAD), 0.01, 1.0)
        prob_margin = np.clip(max_prob * rng.uniform(0.3, 1.0, TOKENS_PER_HEAD), 0.0, 1.0)
        logit_margin = np.abs(rng.normal(np.where(correct, 2.0, 1.0), 1.2))
        # Saturation compares with the previous head's input: undefined at the first head.
        saturation = (
            np.full(TOKENS_PER_HEAD, np.nan)
            if head == 0
            else np.clip(rng.normal(np.where(correct, 0.85, 0.8), 0.08), -1, 1)
        )
        parts.append(
            pd.DataFrame(
                {
                    "head": head,
                    "layer": block,
                    "correct": correct,
                    "entropy": entropy,
                    "max_prob": max_prob,
                    "prob_margin": prob_margin,
                    "logit_margin": logit_margin,
                    "saturation": saturation,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def result_rows(model: str, tokens: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    n_params, n_layers, blocks = MODELS[model]
    rows: list[dict] = []

    def add(
        stage: str,
        metric: str,
        value: float,
        eps: float | None = None,
        head: int | str | None = None,
        **labels_and_extra: str | float,
    ) -> None:
        """A row: the label columns (setting, split, confidence, calibration, fill) and extra columns by name."""
        rows.append(
            {
                "model": model,
                "stage": stage,
                "eps": eps,
                "head": head,
                "metric": metric,
                "value": float(value),
            }
            | labels_and_extra
        )

    add("backbone", "n_params", n_params)
    add("backbone", "val_ppl", 20.0 + rng.random(), setting="pretrain")
    for split, n in (("train", 200_000), ("validation", 20_000), ("test", 20_000)):
        add("extract", "tokens", n, split=split)
        add("extract", "tokens_per_s", 5e4 * (1 + rng.random()), split=split)
    add("extract", "bytes_per_token", 2 * 1024)

    for head, block in enumerate(blocks):
        depth = (block + 1) / n_layers
        add("heads", "agree", 0.35 + 0.55 * depth, setting="trained", head=head, layer=block)
        add("heads", "kl", 2.5 * (1 - depth) + 0.1, setting="trained", head=head, layer=block)
        add("heads", "agree", 0.1 + 0.7 * depth**2, setting="logit_lens", head=head, layer=block)
        add("heads", "kl", 8.0 * (1 - depth) + 0.3, setting="logit_lens", head=head, layer=block)
        on_head = tokens[tokens["head"] == head]
        correct = on_head["correct"].to_numpy()
        for metric in METRICS:
            score = on_head[metric].to_numpy()
            add(
                "metrics",
                "auroc",
                _auroc(-score if metric == "entropy" else score, correct),
                confidence=metric,
                head=head,
                layer=block,
            )
    add("heads", "train_tokens_per_s", 1e5, setting="trained")

    # Calibration: cascade exit fractions shrink and thresholds tighten as ε grows; LTT is stricter.
    for method, strictness in (("empirical", 1.0), ("ltt", 0.8)):
        policy = {"calibration": method, "confidence": "entropy"}
        for eps in EPS:
            total = 0.0
            for head, block in enumerate(blocks):
                depth = (block + 1) / n_layers
                frac = strictness * (1 - eps) * 0.9 * depth
                threshold = (
                    np.nan
                    if (method == "ltt" and eps >= 0.99 and head == 0)
                    else strictness * 3 * (1 - eps) * depth
                )
                add("calibrate", "threshold", threshold, eps=eps, head=head, layer=block, **policy)
                add("calibrate", "exit_frac", frac, eps=eps, head=head, layer=block, **policy)
                total += frac
            add("calibrate", "coverage", total, eps=eps, head="all", **policy)
            add(
                "calibrate",
                "accuracy",
                min(1.0, eps + (0.01 if method == "ltt" else -0.005)),
                eps=eps,
                head="all",
                **policy,
            )

    # Benchmarks: the full model, then each calibration method per ε.
    for task_i, task in enumerate(TASKS):
        full_acc = 0.55 + 0.05 * task_i + 0.02 * np.log10(n_params / 7e7)
        add("early_exit", f"acc/{task}", full_acc, setting="full")
        add("early_exit", f"acc_stderr/{task}", 0.01, setting="full")
        add("early_exit", f"compute_frac/{task}", 1.0, setting="full")
        for method in ("empirical", "ltt"):
            policy = {"setting": "early_exit", "calibration": method, "confidence": "entropy"}
            for eps in EPS:
                add("early_exit", f"acc/{task}", full_acc * (0.8 + 0.2 * eps), eps=eps, **policy)
                add("early_exit", f"acc_stderr/{task}", 0.01, eps=eps, **policy)
                add("early_exit", f"compute_frac/{task}", 0.45 + 0.55 * eps, eps=eps, **policy)
                for head in range(len(blocks)):
                    add("early_exit", f"exit_frac/{task}", (1 - eps) * 0.2, eps=eps, head=head, **policy)
    # Token level: one policy per calibration method, evaluated under each KV-cache fill.
    add("early_exit", "agreement", 1.0, setting="full")
    add("early_exit", "ppl", 20.0, setting="full")
    add("early_exit", "layer_equiv_per_token", n_layers + 1, setting="full")
    for calibration, shift in (("empirical", 0.0), ("ltt", 0.3)):
        for fill, overhead in (("lazy", 0.0), ("copy", -0.3), ("recompute", 1.5)):
            for eps in EPS:
                common = {
                    "setting": "early_exit",
                    "calibration": calibration,
                    "confidence": "entropy",
                    "fill": fill,
                    "eps": eps,
                }
                add("early_exit", "agreement", eps - 0.02 * (fill == "copy"), **common)
                add("early_exit", "ppl", 20 + 10 * (1 - eps), **common)
                add(
                    "early_exit",
                    "layer_equiv_per_token",
                    n_layers * (0.5 + 0.5 * eps) + overhead + shift,
                    **common,
                )
                add("early_exit", "compute_frac", 0.5 + 0.5 * eps, **common)

    # Decoding: greedy/generate references, DSSD and early exit per ε, tuned LayerSkip, oracle, and the grid.
    def decode(
        setting: str, eps: float | None, speedup: float, acc_rate: float, per_ver: float, layer_equiv: float
    ) -> None:
        add("decoding", "tokens_per_s", 100 * speedup, setting=setting, eps=eps)
        add("decoding", "speedup_vs_generate", speedup, setting=setting, eps=eps)
        add("decoding", "layer_equiv_per_token", layer_equiv, setting=setting, eps=eps)
        add("decoding", "identical", 1.0, setting=setting, eps=eps)
        if not np.isnan(acc_rate):
            add("decoding", "acceptance_rate", acc_rate, setting=setting, eps=eps)
            add("decoding", "accepted_per_verification", per_ver, setting=setting, eps=eps)

    decode("generate", None, 1.0, np.nan, np.nan, n_layers + 8)
    decode("greedy", None, 1.1, np.nan, np.nan, n_layers + 8)
    best_ls = (0.0, 0.0)
    for head, block in enumerate(blocks):
        depth = (block + 1) / n_layers
        for draft_len in (1, 2, 4, 6, 8):
            acc_rate = (0.3 + 0.6 * depth) * (0.97**draft_len)
            per_ver = acc_rate * draft_len / (1 + 0.15 * draft_len)
            best_ls = max(best_ls, (per_ver, acc_rate))
            for metric, value in (
                ("acceptance_rate", acc_rate),
                ("accepted_per_verification", per_ver),
                ("speedup_vs_generate", 0.8 + 0.3 * per_ver),
            ):
                add(
                    "decoding",
                    metric,
                    value,
                    setting="layerskip_grid",
                    head=head,
                    layer=block,
                    draft_len=draft_len,
                )
    decode("layerskip", None, 0.8 + 0.3 * best_ls[0], best_ls[1], best_ls[0], n_layers * 0.8 + 6)
    for eps in EPS:
        acc_rate = min(0.98, best_ls[1] * (1.2 + 0.5 * eps))
        per_ver = best_ls[0] * (1.3 + 0.4 * eps)
        decode(
            "dssd",
            eps,
            0.9 + 0.35 * per_ver - 0.3 * (eps - 0.8) ** 2,
            acc_rate,
            per_ver,
            n_layers * (0.6 + 0.3 * eps) + 6,
        )
        decode("early_exit", eps, 1.0 + 0.5 * (1 - eps), np.nan, np.nan, n_layers * (0.5 + 0.5 * eps) + 6)
        add("decoding", "acceptance_ratio", acc_rate / best_ls[1], setting="dssd_vs_layerskip", eps=eps)
        add(
            "decoding",
            "accepted_per_verification_ratio",
            per_ver / best_ls[0],
            setting="dssd_vs_layerskip",
            eps=eps,
        )
    decode("oracle", None, 2.0, 1.0, best_ls[0] * 2.2, n_layers * 0.5 + 4)

    frame = pd.DataFrame(rows)
    return frame[COLUMNS + [c for c in frame.columns if c not in COLUMNS]]


def write_run(root: Path, model: str, seed: int = 0) -> Path:
    """A run directory as pipeline/orchestration/runner.py leaves it: results.csv and tables/metrics/token_metrics.parquet."""
    rng = np.random.default_rng([seed, sorted(MODELS).index(model)])
    run_dir = Path(root)
    (run_dir / "tables" / "metrics").mkdir(parents=True, exist_ok=True)
    tokens = token_table(model, rng)
    tokens.to_parquet(run_dir / "tables" / "metrics" / "token_metrics.parquet", index=False)
    result_rows(model, tokens, rng).to_csv(run_dir / "results.csv", index=False)
    return run_dir


def write_sweep(root: Path, models: list[str] | None = None, seed: int = 0) -> Path:
    """A sweep directory: one Hydra-style job directory per model plus summary.csv and summary.parquet."""
    root = Path(root)
    frames = []
    for job, model in enumerate(models or list(MODELS)):
        run_dir = write_run(root / str(job), model, seed)
        frames.append(pd.read_csv(run_dir / "results.csv"))
    summary = pd.concat(frames, ignore_index=True)
    summary.to_csv(root / "summary.csv", index=False)
    # Mixed ints and "all" in `head`: store as strings, as a summary writer must for parquet.
    summary.assign(head=summary["head"].astype("string")).to_parquet(root / "summary.parquet", index=False)
    return root


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/synthetic_results")
    for name in MODELS:
        write_run(out / f"run_{name}", name)
    write_sweep(out / "sweep")
    print(f"synthetic results in {out}")
