"""Where a decoding step's time goes: per-call timings of a block, a head, a vocabulary-pruned head view, the
confidence metric and the final LM head, against one whole engine step.

The cost model (docs/design.md §2) prices a step in FLOPs (layer-equivalents) or in calls (latency-equivalents:
each block or head call counts 1). Both ignore what a step costs beyond its kernels: the Python of the step, the
exit test, the cache bookkeeping. This script measures those parts on one model, one row at a time as decoding
runs them, so that a speed-up claim (or its absence) can be read off: a strategy that saves block calls gains
only when a block call costs more than what the strategy adds per step.

Usage:
    python benchmarks/call_costs.py                                   # the default run's tiny model (outputs/)
    python benchmarks/call_costs.py --shapes pythia-70m pythia-160m   # random weights at Pythia's shapes
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch

from pipeline.engine import Engine
from pipeline.evaluation.stage_outputs import latest_outputs
from pipeline.exits.confidence import get_metric
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ALWAYS, ExitPolicy
from pipeline.exits.vocab_pruning import CandidateSet, PrunedHeads
from pipeline.models.backbone import default_head_layers
from pipeline.models.pythia_shapes import PYTHIA_SHAPES, random_pythia
from pipeline.orchestration.store import StageStore

# Rows of a verification pass (drafts + 1) timed against one row: on CPU a k-row matrix product runs another
# kernel than a one-row one, so verifying drafts costs more than one step (docs/design.md §2).
VERIFY_ROWS = (2, 3, 5, 9)


def median_us(fn: Callable[[], object], calls: int, warmup: int = 20) -> float:
    """Median wall time of `fn()` in microseconds over `calls` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def first_k_candidates(vocab_size: int, k: int) -> CandidateSet:
    """A candidate set of K token ids (which ids does not matter for timing)."""
    return CandidateSet(vocab_size=vocab_size, source="benchmark: first K ids", token_ids=list(range(k)))


@torch.inference_mode()
def call_costs(label: str, model: torch.nn.Module, heads: EarlyExitHeads, k: int, calls: int) -> pd.DataFrame:
    """Per-call timings (µs) on `model` at a 64-token prefix, one row per call, and the same in block calls."""
    engine = Engine(model, heads)
    adapter, n_layers = engine.adapter, engine.num_layers
    vocab = adapter.vocab_size
    prompt = torch.randint(0, vocab, (64,), generator=torch.Generator().manual_seed(0))
    session = engine.session(prompt, max_new_tokens=8)
    token = session.prefill()
    position = session.prompt_len
    session.ids[position] = token  # the token every timed step consumes
    cache = session.cache
    hidden = cache.hidden[:, position - 1 : position].clone()
    head_input = hidden.to(engine.head_dtype)
    middle = len(heads.layers) // 2
    view = PrunedHeads(heads, first_k_candidates(vocab, k))
    entropy, margin = get_metric("entropy"), get_metric("logit_margin")
    full_logits = heads(middle, head_input)
    view_logits = view(middle, head_input)

    def block() -> None:
        adapter.block(n_layers // 2, hidden, cache, position)

    def every_block(rows: int = 1) -> Callable[[], None]:
        """All blocks in turn on `rows` rows, as a step runs them (each block's weights read once): with
        rows > 1, a verification pass over rows - 1 drafts."""
        states, start = cache.hidden[:, position - rows + 1 : position + 1].clone(), position - rows + 1

        def run() -> None:
            for i in range(n_layers):
                adapter.block(i, states, cache, start)

        return run

    def lm_head(rows: int) -> Callable[[], None]:
        states = cache.hidden[:, position - rows + 1 : position + 1].clone()
        return lambda: adapter.logits(states)

    def greedy_step() -> None:
        session.step(position, token)
        session.crop(position)

    # A drafting step that exits at the middle head through a pruned view: the blocks up to that head, the view
    # and the exit test (threshold ALWAYS skips the metric; the metric is timed on its own below).
    thresholds = [ALWAYS if h == middle else None for h in range(len(heads.layers))]
    draft_policy = ExitPolicy(
        tuple(heads.layers), tuple(thresholds), f"logit_margin@top{k}", candidates=view.candidates
    )

    def draft_step() -> None:
        session.step(position, token, draft_policy)
        session.crop(position)

    measured = {
        "embed (1 row)": median_us(lambda: adapter.embed(session.ids[position : position + 1]), calls),
        "block (1 row)": median_us(block, calls),
        f"blocks 0..{n_layers - 1} in turn (1 row each)": median_us(every_block(1), calls),
        "full head, d·V (1 row)": median_us(lambda: heads(middle, head_input), calls),
        f"pruned view, d·{k} (1 row)": median_us(lambda: view(middle, head_input), calls),
        "entropy of full logits": median_us(lambda: entropy(full_logits), calls),
        "logit margin of view logits": median_us(lambda: margin(view_logits), calls),
        "final norm + LM head (1 row)": median_us(lambda: adapter.logits(hidden), calls),
        **{
            f"blocks 0..{n_layers - 1} in turn ({rows} rows each: verifying {rows - 1} drafts)": median_us(
                every_block(rows), calls
            )
            for rows in VERIFY_ROWS
        },
        **{f"final norm + LM head ({rows} rows)": median_us(lm_head(rows), calls) for rows in VERIFY_ROWS},
        "crop": median_us(lambda: session.crop(position), calls),
        "engine step, full model": median_us(greedy_step, calls),
        f"engine step, draft at head {middle} (block {heads.layers[middle]})": median_us(draft_step, calls),
    }
    block_us = measured["block (1 row)"]
    # One block called repeatedly keeps its weights in cache; a step reads every block's in turn, so the
    # overhead is taken against the blocks run in turn.
    in_turn = measured[f"blocks 0..{n_layers - 1} in turn (1 row each)"]
    parts = measured["embed (1 row)"] + in_turn + measured["final norm + LM head (1 row)"]
    measured["step overhead (full step - embed - blocks in turn - LM head - crop)"] = (
        measured["engine step, full model"] - parts - measured["crop"]
    )
    return pd.DataFrame(
        [
            {"model": label, "call": name, "us": us, "block_calls": us / block_us}
            for name, us in measured.items()
        ]
    )


def pipeline_model(root: Path, model_name: str) -> tuple[torch.nn.Module, EarlyExitHeads]:
    from pipeline.models.backbone import load_from_stage_output

    outputs = latest_outputs(StageStore(root / "cache"), model_name)
    if outputs is None:
        raise SystemExit(
            f"no finished pipeline outputs for {model_name!r} under {root}: run `python -m pipeline`"
        )
    model, _ = load_from_stage_output(outputs.entry("backbone"))
    return model, EarlyExitHeads.load(outputs.entry("heads"), model)


def random_target(shape: str) -> tuple[torch.nn.Module, EarlyExitHeads]:
    """A random-weight model of a Pythia shape with logit-lens heads at the default head layers."""
    model = random_pythia(shape, seed=0)
    layers = default_head_layers(model.config.num_hidden_layers)
    return model, EarlyExitHeads.from_backbone(model, layers, head_type="linear", init="unembedding")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-outputs", type=Path, default=Path("outputs"), help="pipeline outputs root")
    parser.add_argument("--model", default="tiny", help="model name under <outputs>/cache")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=[],
        choices=list(PYTHIA_SHAPES),
        help="random-weight Pythia shapes instead",
    )
    parser.add_argument("--vocab-fraction", type=float, default=0.125, help="pruned view: K = fraction × V")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    targets = (
        [(shape, *random_target(shape)) for shape in args.shapes]
        if args.shapes
        else [(f"{args.model} (pipeline outputs)", *pipeline_model(args.from_outputs, args.model))]
    )
    frames = []
    for label, model, heads in targets:
        model.eval()
        k = max(2, round(args.vocab_fraction * model.config.vocab_size))
        frame = call_costs(label, model, heads, k, args.calls)
        frames.append(frame)
        print(f"\n## {label}: µs per call, median of {args.calls} ({args.threads} thread(s))\n")
        print(frame[["call", "us", "block_calls"]].to_markdown(index=False, floatfmt=".1f"))
    return pd.concat(frames, ignore_index=True)


if __name__ == "__main__":
    main()
