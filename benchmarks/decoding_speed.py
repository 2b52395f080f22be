"""Decoding speed: transformers' greedy `generate` vs our engine's greedy, early exit, LayerSkip and DSSD.

Everything is measured in one process, on the same prompts, interleaved within each repeat (so load changes
hit every method alike): tokens/s (median over repeats, with min and max), its ratio to `generate` in the
same repeat (median), layer-equivalents per generated token, acceptance rate, accepted drafts per
verification, and whether the output is identical to greedy `generate` on every prompt.

Usage:
    python benchmarks/decoding_speed.py                       # random-weight tiny and Pythia-70m shapes
    python benchmarks/decoding_speed.py --shapes pythia-160m pythia-410m --new-tokens 32
    python benchmarks/decoding_speed.py --model-dir M --heads-dir H --thresholds T.json [--eps 0.8 0.9]

Random-weight models get logit-lens heads (each head = the model's own final norm + unembedding): on random
weights the residual stream barely changes across blocks, so these heads often agree with the full model —
a stand-in for trained heads that lets the speculative paths run at realistic acceptance. Their thresholds
are calibrated on the fly (the paper's empirical rule, `pipeline.calibration`) on separate prompts, and the
LayerSkip setting (head, d) is tuned there too, by layer-equivalents per token. With --model-dir and a
tokenizer, prompts are windows of real text (--text, default: a standard-library module's source).
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.backbone import default_head_layers, load_backbone, num_layers_of
from pipeline.calibration import ExitThresholds, calibrate
from pipeline.confidence import get_metric
from pipeline.engine import DSSD, EarlyExit, Engine, Greedy, LayerSkip, Strategy
from pipeline.heads import EarlyExitHeads

SHAPES = {  # (layers, d_model, attention heads, vocab): Pythia's real shapes, plus a tiny one
    "tiny": (4, 64, 4, 256),
    "pythia-70m": (6, 512, 8, 50304),
    "pythia-160m": (12, 768, 12, 50304),
    "pythia-410m": (24, 1024, 16, 50304),
}
DEFAULT_EPS = (0.6, 0.8, 0.9, 0.95)


def random_model(shape: str, seed: int = 0) -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    layers, d_model, n_heads, vocab = SHAPES[shape]
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=layers,
                           num_attention_heads=n_heads, intermediate_size=4 * d_model, rotary_pct=0.25,
                           max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config).eval().requires_grad_(False)


def random_prompts(vocab: int, n: int, length: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen) for _ in range(n)]


def text_prompts(tokenizer, text: str, n: int, length: int, offset: int = 0) -> list[torch.Tensor]:
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    stride = max(length, (len(ids) - length) // max(n + offset, 1))
    starts = [i * stride for i in range(offset, offset + n) if i * stride + length <= len(ids)]
    if len(starts) < n:
        raise SystemExit(f"the prompt text has {len(ids)} tokens: too short for {n + offset} prompts of {length}")
    return [ids[s : s + length] for s in starts]


# -- on-the-fly calibration and LayerSkip tuning ----------------------------------------------------------------


@torch.inference_mode()
def head_metrics_on_greedy(engine: Engine, prompts: Sequence[torch.Tensor], new_tokens: int,
                           metric: str = "entropy") -> tuple[np.ndarray, np.ndarray]:
    """Per generated token and head: the metric value and whether the head's argmax is the full model's."""
    fn = get_metric(metric)
    values, correct = [], []
    for prompt in prompts:
        tokens = engine.generate(prompt, Greedy(), new_tokens).tokens
        seq = torch.cat([prompt, torch.tensor(tokens, dtype=torch.long)]).view(1, -1)
        out = engine.model(seq, output_hidden_states=True)
        rows = slice(prompt.numel() - 1, seq.shape[1] - 1)
        full = out.logits[0, rows].argmax(-1)
        per_head_v, per_head_c, prev = [], [], out.hidden_states[0][0, rows]
        for k, layer in enumerate(engine.head_layers):
            hidden = out.hidden_states[layer + 1][0, rows]
            logits = engine.heads(k, hidden)
            per_head_v.append(fn(logits, hidden, prev) if fn.needs_hidden else fn(logits))
            per_head_c.append(logits.argmax(-1) == full)
            prev = hidden
        values.append(torch.stack(per_head_v, 1))
        correct.append(torch.stack(per_head_c, 1))
    return torch.cat(values).float().numpy(), torch.cat(correct).numpy()


def calibrate_on_the_fly(engine: Engine, prompts, new_tokens: int, eps: Sequence[float],
                         metric: str = "entropy") -> dict[float, list[float | None]]:
    values, correct = head_metrics_on_greedy(engine, prompts, new_tokens, metric)
    table = calibrate(values, correct, metric, eps, methods=["empirical"], layers=engine.head_layers)
    return {e: table.for_eps("empirical", e) for e in eps}


def tune_layerskip(engine: Engine, prompts, new_tokens: int, draft_lengths: Sequence[int]) -> LayerSkip:
    """LayerSkip's sweep over (head, d), scored by compute (layer-equivalents per generated token), which is
    deterministic where wall-clock on a shared machine is not."""
    best, best_cost = None, float("inf")
    for head in range(len(engine.head_layers)):
        for d in draft_lengths:
            strategy = LayerSkip(head, d)
            cost = sum(engine.generate(p, strategy, new_tokens).stats.layer_equivalents for p in prompts)
            if cost < best_cost:
                best, best_cost = strategy, cost
    return best


# -- the benchmark ----------------------------------------------------------------------------------------------


def run_benchmark(model: torch.nn.Module, heads: EarlyExitHeads, thresholds_by_eps: dict[float, list[float | None]],
                  prompts: Sequence[torch.Tensor], new_tokens: int = 64, repeats: int = 5, warmup: int = 1,
                  layerskip: Sequence[LayerSkip] = (), max_draft: int = 16, metric: str = "entropy",
                  fills: Sequence[str] = ("lazy",), label: str = "") -> pd.DataFrame:
    """One row per method/setting: speed (median, min, max over repeats; ratio to `generate`), compute and
    acceptance (summed over prompts), and whether every prompt's output equals greedy `generate`."""
    engine = Engine(model, heads)

    @torch.inference_mode()
    def hf_generate(prompt: torch.Tensor) -> list[int]:
        out = model.generate(prompt.view(1, -1), attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                             do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        return out[0, prompt.numel():].tolist()

    methods: list[tuple[str, str, Strategy | None]] = [("generate", "transformers", None), ("greedy", "engine", Greedy())]
    for eps, thr in thresholds_by_eps.items():
        for fill in fills:
            methods.append(("early_exit", f"eps={eps} fill={fill}", EarlyExit(thr, metric=metric, fill=fill)))
    for strategy in layerskip:
        methods.append(("layerskip", f"head={strategy.head} d={strategy.max_draft}", strategy))
    for eps, thr in thresholds_by_eps.items():
        methods.append(("dssd", f"eps={eps} max_draft={max_draft}", DSSD(thr, metric=metric, max_draft=max_draft)))

    speeds: dict[int, list[float]] = {i: [] for i in range(len(methods))}
    outputs: dict[int, list[list[int]]] = {}
    stats: dict[int, list] = {}
    for rep in range(warmup + repeats):
        for i, (_, _, strategy) in enumerate(methods):
            tokens, run_stats = [], []
            started = time.perf_counter()
            for prompt in prompts:
                if strategy is None:
                    tokens.append(hf_generate(prompt))
                else:
                    result = engine.generate(prompt, strategy, new_tokens)
                    tokens.append(result.tokens)
                    run_stats.append(result.stats)
            elapsed = time.perf_counter() - started
            if rep >= warmup:
                speeds[i].append(sum(map(len, tokens)) / elapsed)
            outputs[i], stats[i] = tokens, run_stats
    reference = outputs[0]
    rows = []
    for i, (method, setting, _) in enumerate(methods):
        ratios = [s / g for s, g in zip(speeds[i], speeds[0], strict=True)]
        row = {"model": label, "method": method, "setting": setting,
               "tokens_per_s": statistics.median(speeds[i]), "tok_s_min": min(speeds[i]),
               "tok_s_max": max(speeds[i]), "ratio_vs_generate": statistics.median(ratios),
               "identical_to_greedy": outputs[i] == reference}
        if stats[i]:
            total = {key: sum(getattr(s, key) for s in stats[i]) for key in
                     ("generated", "drafted", "accepted", "verifications", "full_passes", "exited")}
            layer_eq = sum(s.layer_equivalents for s in stats[i])
            row.update({
                "layer_eq_per_token": layer_eq / total["generated"],
                "acceptance": total["accepted"] / total["drafted"] if total["drafted"] else float("nan"),
                "accepted_per_verification": (total["accepted"] / total["verifications"]
                                              if total["verifications"] else float("nan")),
                "exit_fraction": total["exited"] / total["generated"],
            })
        rows.append(row)
    bound = [engine.oracle_bound(p, new_tokens) for p in prompts]
    n_tok = sum(len(b.oracle_cost) for b in bound)
    rows.append({"model": label, "method": "oracle_bound", "setting": "earliest agreeing head",
                 "layer_eq_per_token": sum(sum(b.oracle_cost) for b in bound) / n_tok,
                 "exit_fraction": sum(sum(h is not None for h in b.earliest_head) for b in bound) / n_tok,
                 "identical_to_greedy": [b.tokens for b in bound] == reference})
    return pd.DataFrame(rows)


def _default_text() -> str:
    return inspect.getsource(textwrap)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["tiny", "pythia-70m"])
    parser.add_argument("--model-dir", type=Path, help="a saved model (overrides --shapes)")
    parser.add_argument("--heads-dir", type=Path, help="trained heads for --model-dir (default: logit lens)")
    parser.add_argument("--thresholds", type=Path, help="thresholds file from the calibrate stage")
    parser.add_argument("--method", default="empirical", help="calibration method in the thresholds file")
    parser.add_argument("--eps", type=float, nargs="+", default=list(DEFAULT_EPS))
    parser.add_argument("--text", type=Path, help="text for prompts with --model-dir (default: stdlib source)")
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--n-tune-prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-draft", type=int, default=16)
    parser.add_argument("--layerskip-d", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--fills", nargs="+", default=["lazy"], choices=["lazy", "copy", "recompute"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is stable on a shared machine; ratios are per setting)")
    parser.add_argument("--csv", type=Path, default=Path("outputs/benchmarks/decoding_speed.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.model_dir:
        model, tokenizer = load_backbone(args.model_dir)
        targets = [(str(args.model_dir), model, tokenizer)]
    else:
        targets = [(f"{s} (random weights)", random_model(s), None) for s in args.shapes]
    frames = []
    for label, model, tokenizer in targets:
        vocab = model.get_output_embeddings().out_features
        if tokenizer is not None:
            text = args.text.read_text() if args.text else _default_text()
            prompts = text_prompts(tokenizer, text, args.n_prompts, args.prompt_len)
            tune = text_prompts(tokenizer, text, args.n_tune_prompts, args.prompt_len, offset=args.n_prompts)
        else:
            prompts = random_prompts(vocab, args.n_prompts, args.prompt_len, seed=1)
            tune = random_prompts(vocab, args.n_tune_prompts, args.prompt_len, seed=2)
        if args.heads_dir:
            heads = EarlyExitHeads.load(args.heads_dir, model)
        else:
            layers = default_head_layers(num_layers_of(model))
            heads = EarlyExitHeads.from_backbone(model, layers, init="unembedding")
        heads.eval()
        engine = Engine(model, heads)
        if args.thresholds:
            table = ExitThresholds.load(args.thresholds)
            thresholds = {e: table.for_eps(args.method, e) for e in args.eps}
            metric = table.metric
        else:
            metric = "entropy"
            thresholds = calibrate_on_the_fly(engine, tune, args.new_tokens, args.eps, metric)
        layerskip = tune_layerskip(engine, tune, args.new_tokens, args.layerskip_d)
        frame = run_benchmark(model, heads, thresholds, prompts, args.new_tokens, args.repeats, args.warmup,
                              [layerskip], args.max_draft, metric, args.fills, label)
        frames.append(frame)
        _print(frame, label, args)
    result = pd.concat(frames, ignore_index=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(args.csv, index=False)
    return result


def _print(frame: pd.DataFrame, label: str, args) -> None:
    machine = {"threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
               "prompts": args.n_prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "repeats": args.repeats}
    print(f"\n# decoding speed on {label}; {json.dumps(machine)}")
    shown = frame.drop(columns=["model"])
    try:
        print(shown.to_markdown(index=False, floatfmt=".3g"))
    except ImportError:  # tabulate is optional
        print(shown.to_string(index=False, float_format=lambda x: f"{x:.3g}"))


if __name__ == "__main__":
    main()
