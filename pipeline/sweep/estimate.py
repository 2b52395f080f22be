"""Estimating a sweep before running it: disk and A100 GPU-hours per job of an experiment's sweep, from its
token budgets and FLOP counts (`python -m pipeline.sweep --estimate`, and per job `--plan`). Nothing here is
measured."""

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
# The offline tasks (early_exit.tasks=offline: next-word and next-line, built from the held-out split): about
# 4 choices x 128 tokens scored per example.
OFFLINE_TOKENS_PER_EXAMPLE = 512
# Batch-1 decoding through the layer-wise engine: about 1 ms per block unit (one transformer block's weights,
# the cost model's unit) per generated token. Memory-bound, so time follows the weights a token reads.
MS_PER_BLOCK_UNIT = 1.0
# Shard I/O (extraction writes, head training's random-token reads): 1 GB/s sustained from local NVMe.
DISK_GB_PER_S = 1.0
# sha256 on one core, 0.5 GB/s: every shard is hashed once as it is written (pipeline/data/checksums.py), a
# local model directory's files once per version; the issue-15 measurement was 1.5–3 min per 92 GB.
HASH_GB_PER_S = 0.5
# Downloading the model from the hub: 100 MB/s.
DOWNLOAD_GB_PER_S = 0.1
# Head training's `last.ckpt`: fp32 head weights + AdamW's two moment buffers = 3x the heads (1.24 GB for
# 412 MB of heads at 70m, measured in issue 15). It is deleted once the heads are saved, but the disk must
# hold it while they train.
CHECKPOINT_COPIES = 3
COLUMNS = [
    "bytes_per_token",
    "extract_tokens",
    "extract_gb",
    "heads_gb",
    "checkpoint_gb",
    "model_gb",
    "disk_gb",
    "extract_h",
    "heads_h",
    "metrics+calibrate_h",
    "early_exit_h",
    "decoding_h",
    "shard_io_h",
    "hash_h",
    "download_h",
    "total_h",
]


def early_exit_group(cfg: DictConfig) -> DictConfig:
    """The early_exit stage's config group: `early_exit` since issue 13, `evaluate` in configs before it."""
    return cfg.early_exit if "early_exit" in cfg else cfg.evaluate


def model_size(cfg: DictConfig) -> tuple[int, int]:
    """(parameters, vocabulary) of the job's model: Pythia's published counts, or for another model (the tiny
    one) the GPT-NeoX count from its config, 12·L·d² (blocks with a 4·d MLP) + 2·V·d (untied embeddings)."""
    name = str(cfg.model.name)
    if name in PYTHIA_PARAMS:
        return PYTHIA_PARAMS[name], PYTHIA_VOCAB
    tiny = cfg.model.get("tiny") or {}
    vocab = int(tiny.get("vocab_size") or cfg.model.get("vocab_size") or PYTHIA_VOCAB)
    d, n_layers = int(cfg.model.d_model), int(cfg.model.num_layers)
    return 12 * n_layers * d * d + 2 * vocab * d, vocab


def head_parameters(cfg: DictConfig, vocab: int) -> int:
    """Parameters of one exit head: a final-norm copy + Linear(d, V), plus the residual MLP of an `mlp` head."""
    d = int(cfg.model.d_model)
    params = 2 * d + d * vocab
    if str(cfg.heads.head_type) == "mlp":
        hidden = int(float(cfg.heads.mlp_ratio) * d)
        params += 2 * d * hidden + hidden + d
    return params


def suite_tokens(early_exit: DictConfig) -> int:
    """Tokens scored in one pass over the benchmark tasks: the Pythia suite's ~6M, or the offline tasks' examples
    (`early_exit.limit` per task when set) at OFFLINE_TOKENS_PER_EXAMPLE."""
    if str(early_exit.tasks) == "pythia":
        return SUITE_TOKENS
    offline = early_exit.get("offline") or {}
    per_task = int(early_exit.get("limit") or offline.get("n_examples") or 300)
    return 2 * per_task * OFFLINE_TOKENS_PER_EXAMPLE


def estimate(cfg: DictConfig) -> dict[str, float]:
    """Disk and A100 GPU-hours for one composed job, from its token budgets and FLOP counts.

    Extraction runs the base model without its LM head: 2·(N − 2·d·V) FLOPs per token (the blocks; the input
    embedding is a lookup). Head training: per token, the teacher logits (2·d·V) plus each head's forward and
    backward (3 × 2·d·V). Metrics/calibration: teacher + heads forward on validation + test. Benchmarks: full
    model plus the heads, one pass for the full model and one per (method, ε), over `suite_tokens`. Decoding: batch-1,
    memory-bound, so time ∝ generated tokens × the cost of one greedy token in block units
    (`greedy_token_cost`: L blocks + the unembedding, docs/design.md §2). Shard I/O at DISK_GB_PER_S; hashing
    (shards once as written, the model's files once) at HASH_GB_PER_S; the model download at
    DOWNLOAD_GB_PER_S. Disk: the shards, the heads, head training's checkpoint (CHECKPOINT_COPIES x the heads,
    alive while they train) and the model in the hub cache (fp16 weights + each layer's stored 2048² causal
    mask, as Pythia's checkpoints hold). MiniPile streaming and lm-eval's dataset preparation are not counted.
    """
    d, n_heads, n_layers = int(cfg.model.d_model), len(cfg.model.head_layers), int(cfg.model.num_layers)
    n_params, vocab = model_size(cfg)
    budgets = {k: int(v) for k, v in cfg.data.budgets.items()}
    tokens = sum(budgets.values())
    eval_tokens = budgets.get("validation", 0) + budgets.get("test", 0)
    train_steps_tokens = int(cfg.heads.max_steps) * int(cfg.heads.batch_tokens)
    per_token_bytes = (n_heads + 1) * d * 2 + 4
    head_flops = 2 * d * vocab
    early_exit = early_exit_group(cfg)
    flops = {
        "extract": 2 * max(n_params - 2 * d * vocab, 0) * tokens,
        "heads": head_flops * (1 + 3 * n_heads) * train_steps_tokens,
        "metrics+calibrate": head_flops * (1 + n_heads) * eval_tokens,
        "early_exit": (2 * n_params + head_flops * n_heads)
        * suite_tokens(early_exit)
        * (1 + len(early_exit.eps) * len(early_exit.methods)),
    }
    tflops = ASSUMED_TFLOPS.get(str(cfg.model.dtype), 62.0) * 1e12
    hours = {k: v / tflops / 3600 for k, v in flops.items()}
    dec = cfg.decoding
    # generate, greedy, oracle, tuned LayerSkip, plus early exit and DSSD at every ε; then the tuning grid.
    runs = 4 + 2 * len(dec.eps)
    gen_tokens = runs * int(dec.n_prompts) * int(dec.max_new_tokens)
    gen_tokens += n_heads * len(dec.layerskip_d) * int(dec.n_tune_prompts) * int(dec.max_new_tokens)
    token_blocks = greedy_token_cost(n_layers, d, vocab)
    hours["decoding"] = gen_tokens * token_blocks * MS_PER_BLOCK_UNIT / 1000 / 3600
    extract_bytes = per_token_bytes * tokens
    # Reading and writing shards overlaps compute only partly; count it in full (an upper bound).
    hours["shard_io"] = (
        per_token_bytes * (tokens + train_steps_tokens + eval_tokens) / (DISK_GB_PER_S * 1e9) / 3600
    )
    heads_bytes = n_heads * head_parameters(cfg, vocab) * 4  # fp32
    checkpoint_bytes = CHECKPOINT_COPIES * heads_bytes
    model_bytes = 0
    if cfg.model.source != "tiny":
        model_bytes = n_params * 2 + n_layers * int(cfg.model.get("max_seq_len") or 2048) ** 2
    hours["hash"] = (extract_bytes + model_bytes) / (HASH_GB_PER_S * 1e9) / 3600
    hours["download"] = model_bytes / (DOWNLOAD_GB_PER_S * 1e9) / 3600
    return {
        "bytes_per_token": per_token_bytes,
        "extract_tokens": tokens,
        "extract_gb": extract_bytes / 1e9,
        "heads_gb": heads_bytes / 1e9,
        "checkpoint_gb": checkpoint_bytes / 1e9,
        "model_gb": model_bytes / 1e9,
        "disk_gb": (extract_bytes + heads_bytes + checkpoint_bytes + model_bytes) / 1e9,
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
