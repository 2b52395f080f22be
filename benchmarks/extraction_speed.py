"""Extraction forward pass: the full causal LM (before) against the base model alone (after).

Extraction stores hidden states only; running `GPTNeoXForCausalLM` also computes the LM head's logits
([batch, seq, vocab], 50,304 columns for Pythia) and throws them away. `pipeline.stages.extract` now runs the
decoder (`model.gpt_neox`) alone. This script times both on the same random-weight model and batches,
alternating them repeat by repeat so that a noisy shared machine slows both alike:

  full causal LM   model(input_ids, output_hidden_states=True)           (extraction before)
  base model       model.gpt_neox(input_ids, output_hidden_states=True)  (extraction after)
  extraction       extract_split: base model + fp16 + shard writes + checksums

Usage:
    python benchmarks/extraction_speed.py                          # pythia-70m shape, 4 x 512 tokens
    python benchmarks/extraction_speed.py --shape pythia-160m --batch 8 --repeats 5 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.data.shards import ShardWriter
from pipeline.models.backbone import decoder_of, default_head_layers, resolve_dtype
from pipeline.models.pythia_shapes import random_pythia
from pipeline.stages.extract import extract_split

SHAPES = ("pythia-70m", "pythia-160m", "pythia-410m")


def pythia_shaped_model(shape: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A GPT-NeoX with random weights and the named Pythia checkpoint's exact architecture."""
    return random_pythia(shape, seed=0, dtype=dtype, device=device)


def alternate(
    fns: dict[str, Callable[[], None]], repeats: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds per call of each function, run in turn (A B C A B C ...) after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    sync()
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="pythia-70m")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (ignored on a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = pythia_shaped_model(args.shape, resolve_dtype(args.dtype), device)
    decoder = decoder_of(model)
    layers = default_head_layers(len(decoder.layers))
    batch = torch.randint(0, 50304, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = batch.to(device)
    n_tokens = batch.numel()

    with tempfile.TemporaryDirectory() as scratch, torch.inference_mode():

        def extraction() -> None:
            writer = ShardWriter(
                Path(scratch) / "s", n_slots=len(layers) + 1, d_model=model.config.hidden_size
            )
            extract_split(model, batch.cpu(), layers, writer, args.batch, device, progress=False, desc="")
            writer.close()

        times = alternate(
            {
                "full causal LM (before)": lambda: model(input_ids=batch, output_hidden_states=True),
                "base model (after)": lambda: decoder(
                    input_ids=batch, output_hidden_states=True, use_cache=False
                ),
                "extraction (after: + fp16, shards, sha256)": extraction,
            },
            args.repeats,
            sync,
        )

    n_params = sum(p.numel() for p in model.parameters())
    where = f"{args.device}, {args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name()
    print(
        f"\n{args.shape} shape, random weights ({n_params:,} parameters, {args.dtype}), {args.batch} x "
        f"{args.seq_len} tokens per pass, median of {args.repeats} alternating repeats; {where}, "
        f"torch {torch.__version__}, {platform.machine()}\n"
    )
    before = statistics.median(times["full causal LM (before)"])
    print("| forward pass | tokens/s (median) | tokens/s (best) | time vs full causal LM |")
    print("|---|---|---|---|")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(
            f"| {name} | {n_tokens / median:,.0f} | {n_tokens / min(seconds):,.0f} | {median / before:.2f} |"
        )
    after = statistics.median(times["base model (after)"])
    print(
        f"\nbase model / full causal LM: {before / after:.2f}x the tokens/s ({1 - after / before:.0%} less time)"
    )


if __name__ == "__main__":
    main()
