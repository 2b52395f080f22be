"""Pipeline throughput: is the storage path the bottleneck of extraction, and how fast do heads train?

Measured side by side in one process, on the same model and batches:
  forward            bare `model(input_ids)` (what the hardware can do at best)
  forward+hidden     the same with `output_hidden_states=True` (what extraction must at least pay)
  extract            our extraction: forward + stacking + fp16 conversion + shard writes + checksums
  heads training     Lightning training of all heads on the extracted shards (tokens/s, after warm-up)

Usage (after the default run, the tiny model is found in the store; or a random model of a Pythia shape):
    python benchmarks/pipeline_throughput.py                       # tiny model from outputs/ if present
    python benchmarks/pipeline_throughput.py --shape pythia-70m    # random weights, Pythia-70m's shape
Prints a table and writes CSV (--csv, default outputs/benchmarks/pipeline_throughput.csv).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from pipeline.data.shards import ShardWriter
from pipeline.exits.training import train_heads
from pipeline.models.backbone import default_head_layers, load_backbone, num_layers_of, unembedding_of
from pipeline.models.pythia_shapes import random_pythia
from pipeline.stages.extract import extract_split

SHAPES = ("pythia-70m", "pythia-160m", "pythia-410m")


def random_model(shape: str) -> torch.nn.Module:
    return random_pythia(shape, seed=0)


def find_tiny_model(outputs: Path) -> Path | None:
    candidates = sorted(
        (outputs / "cache" / "backbone" / "tiny").glob("*/model"), key=lambda p: p.stat().st_mtime
    )
    return candidates[-1] if candidates else None


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def measure(
    model,
    label: str,
    n_seqs: int,
    seq_len: int,
    batch_size: int,
    repeats: int,
    train_steps: int,
    batch_tokens: int,
) -> pd.DataFrame:
    vocab = unembedding_of(model).out_features
    layers = default_head_layers(num_layers_of(model))
    d_model = unembedding_of(model).in_features
    blocks = torch.randint(0, vocab, (n_seqs, seq_len), generator=torch.Generator().manual_seed(0))
    n_tokens = blocks.numel()
    rows = []

    @torch.inference_mode()
    def forward(hidden: bool) -> None:
        for start in range(0, n_seqs, batch_size):
            model(input_ids=blocks[start : start + batch_size], output_hidden_states=hidden)

    with tempfile.TemporaryDirectory() as tmp:
        counter = {"k": 0}

        def extract() -> None:
            counter["k"] += 1
            writer = ShardWriter(Path(tmp) / f"run{counter['k']}", n_slots=len(layers) + 1, d_model=d_model)
            extract_split(model, blocks, layers, writer, batch_size, torch.device("cpu"), False, "")
            writer.close()

        for name, fn in [
            ("forward", lambda: forward(False)),
            ("forward+hidden", lambda: forward(True)),
            ("extract", extract),
        ]:
            times = timed(fn, repeats)
            median = statistics.median(times)
            rows.append(
                {
                    "model": label,
                    "measure": name,
                    "tokens_per_s": n_tokens / median,
                    "spread_pct": 100 * (max(times) - min(times)) / median,
                }
            )
        shard_dir = Path(tmp) / "run1"
        stored = sum(p.stat().st_size for p in shard_dir.glob("*.npy"))
        rows.append({"model": label, "measure": "bytes_per_token", "value": stored / n_tokens})

        heads_cfg = {
            "max_steps": train_steps,
            "batch_tokens": batch_tokens,
            "val_tokens": batch_tokens,
            "val_every_n_steps": train_steps,
            "warmup_steps": 1,
        }
        _, metrics = train_heads(
            model,
            layers,
            shard_dir,
            heads_cfg,
            {"accelerator": "cpu", "devices": 1},
            seed=0,
            out_dir=Path(tmp) / "heads",
            logger=False,
            progress=False,
        )
        rows.append(
            {"model": label, "measure": "heads training", "tokens_per_s": metrics["train_tokens_per_s"]}
        )
    frame = pd.DataFrame(rows)
    base = frame.loc[frame.measure == "forward", "tokens_per_s"].iloc[0]
    frame["ratio_vs_forward"] = frame["tokens_per_s"] / base
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=["tiny", *SHAPES], default="tiny")
    parser.add_argument("--model-dir", type=Path, help="a local model directory (overrides --shape)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"))
    parser.add_argument("--n-seqs", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--csv", type=Path, default=Path("outputs/benchmarks/pipeline_throughput.csv"))
    args = parser.parse_args()

    if args.model_dir or args.shape == "tiny":
        model_dir = args.model_dir or find_tiny_model(args.outputs)
        if model_dir is None:
            raise SystemExit(
                "no tiny model in outputs/: run `python -m pipeline stages=[backbone]` first, "
                "or pass --shape pythia-70m"
            )
        model, _ = load_backbone(model_dir, with_tokenizer=False)
        label = "tiny" if not args.model_dir else str(model_dir)
    else:
        model, label = random_model(args.shape), f"{args.shape} (random weights)"
    frame = measure(
        model,
        label,
        args.n_seqs,
        args.seq_len,
        args.batch_size,
        args.repeats,
        args.train_steps,
        args.batch_tokens,
    )
    machine = {
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    print(f"# pipeline throughput on {label}; {json.dumps(machine)}")
    print(frame.to_markdown(index=False, floatfmt=".3g") if _has_tabulate() else frame.to_string(index=False))
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.csv, index=False)
    print(f"written to {args.csv}")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
