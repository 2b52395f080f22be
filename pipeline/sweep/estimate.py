"""Estimating a sweep before running it: disk and A100 GPU-hours per model of an experiment's sweep, from
its token budgets and FLOP counts (`python -m pipeline.sweep --estimate`). Nothing here is measured."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd
from omegaconf import DictConfig

from pipeline.exits.cost import greedy_token_cost

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
# Batch-1 decoding through the layer-wise engine: about 1 ms per block unit (one transformer block's weights,
# the cost model's unit) per generated token. Memory-bound, so time follows the weights a token reads.
MS_PER_BLOCK_UNIT = 1.0
# Shard I/O (extraction writes, head training's random-token reads): 1 GB/s sustained from local NVMe.
DISK_GB_PER_S = 1.0
COLUMNS = [
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


def early_exit_group(cfg: DictConfig) -> DictConfig:
    """The early_exit stage's config group: `early_exit` since issue 13, `evaluate` in configs before it."""
    return cfg.early_exit if "early_exit" in cfg else cfg.evaluate


def estimate(cfg: DictConfig) -> dict[str, float]:
    """Disk and A100 GPU-hours for one composed full_sweep job, from its token budgets and FLOP counts.

    Extraction: 2·N FLOPs per token (forward with logits). Head training: per token, the teacher logits
    (2·d·V) plus each head's forward and backward (3 × 2·d·V). Metrics/calibration: teacher + heads forward on
    validation + test. Benchmarks: full model plus the heads, one pass for the full model and one per
    (method, ε). Decoding: batch-1, memory-bound, so time ∝ generated tokens × the cost of one greedy token in
    block units (`greedy_token_cost`: L blocks + the unembedding, docs/design.md §2). Shard I/O at
    DISK_GB_PER_S. Model download, MiniPile streaming and lm-eval's dataset preparation are not counted.
    """
    name, d = str(cfg.model.name), int(cfg.model.d_model)
    n_heads, n_layers = len(cfg.model.head_layers), int(cfg.model.num_layers)
    n_params = PYTHIA_PARAMS.get(name, 0)
    budgets = {k: int(v) for k, v in cfg.data.budgets.items()}
    tokens = sum(budgets.values())
    per_token_bytes = (n_heads + 1) * d * 2 + 4
    head_flops = 2 * d * PYTHIA_VOCAB
    early_exit = early_exit_group(cfg)
    flops = {
        "extract": 2 * n_params * tokens,
        "heads": head_flops * (1 + 3 * n_heads) * int(cfg.heads.max_steps) * int(cfg.heads.batch_tokens),
        "metrics+calibrate": head_flops
        * (1 + n_heads)
        * (budgets.get("validation", 0) + budgets.get("test", 0)),
        "early_exit": (2 * n_params + head_flops * n_heads)
        * SUITE_TOKENS
        * (1 + len(early_exit.eps) * len(early_exit.methods)),
    }
    tflops = ASSUMED_TFLOPS.get(str(cfg.model.dtype), 62.0) * 1e12
    hours = {k: v / tflops / 3600 for k, v in flops.items()}
    dec = cfg.decoding
    # generate, greedy, oracle, tuned LayerSkip, plus early exit and DSSD at every ε; then the tuning grid.
    runs = 4 + 2 * len(dec.eps)
    gen_tokens = runs * int(dec.n_prompts) * int(dec.max_new_tokens)
    gen_tokens += n_heads * len(dec.layerskip_d) * int(dec.n_tune_prompts) * int(dec.max_new_tokens)
    token_blocks = greedy_token_cost(n_layers, d, PYTHIA_VOCAB)
    hours["decoding"] = gen_tokens * token_blocks * MS_PER_BLOCK_UNIT / 1000 / 3600
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
    shown = table[COLUMNS].copy()
    shown["extract_tokens"] = (shown["extract_tokens"] / 1e6).map(lambda v: f"{v:.1f}M")
    print("ESTIMATE (not measured): A100-80GB at 40% of peak; see pipeline/sweep/estimate.py")
    try:
        print(shown.to_markdown(floatfmt=".2f"))
    except ImportError:  # pandas needs `tabulate` for Markdown
        print(shown.to_string(float_format="%.2f"))
