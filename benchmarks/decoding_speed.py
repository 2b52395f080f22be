"""Decoding speed: transformers' greedy `generate` vs our engine's greedy, early exit, LayerSkip and DSSD.

Everything is measured in one process, on the same prompts, interleaved within each repeat (so load changes
hit every method alike): tokens/s (median over repeats, with min and max), its ratio to `generate` in the
same repeat (median), layer-equivalents per generated token, acceptance rate, accepted drafts per
verification, and whether the output is identical to greedy `generate` on every prompt.

Usage:
    python benchmarks/decoding_speed.py                       # the default run's own outputs (outputs/cache, tiny)
    python benchmarks/decoding_speed.py --from-outputs outputs/ --model tiny --eps 0.8 0.9
    python benchmarks/decoding_speed.py --model-dir M --heads-dir H --thresholds T.json [--eps 0.8 0.9]
    python benchmarks/decoding_speed.py --shapes tiny pythia-70m pythia-160m   # random weights, real shapes
    python benchmarks/decoding_speed.py --no-llama            # skip the Llama / assistant_early_exit section

With --from-outputs (the default), the latest finished `calibrate` entry for the model under <outputs>/cache
names the backbone, heads and thresholds it was computed from (its upstream keys), so the three always
belong together; prompts are windows of the test split (tuning prompts: validation split) of the data the
`extract` stage read, as in the pipeline's `decoding` stage.

transformers' own early-exit assistant (`generate(assistant_early_exit=k)`, LayerSkip-style self-speculation)
is benchmarked on a small random-weight LlamaForCausalLM built locally, next to our LayerSkip with the same
drafter (block k-1's output through the final norm and the LM head: exactly what transformers drafts with)
and the same draft length. It is shown only for Llama: on GPT-NeoX (Pythia) transformers' assistant_early_exit
silently runs the FULL model (its layer loop ignores `num_hidden_layers`, DESIGN.md §6), so a row there would
look lossless and merely slow. The Llama model scales its token embeddings (×10) so that the residual stream,
and hence the early exits, stay close to the final layer's prediction: random weights otherwise give early
exits that almost never agree with the full model, and every speculative method would only pay for drafts.

Random-weight models get logit-lens heads (each head = the model's own final norm + unembedding): on random
weights the residual stream barely changes across blocks, so these heads often agree with the full model —
a stand-in for trained heads that lets the speculative paths run at realistic acceptance. Their thresholds
are calibrated on the fly (the paper's empirical rule, `pipeline.exits.calibration`) on separate prompts, and the
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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.engine import DSSD, EarlyExit, Engine, Greedy, LayerSkip, Strategy
from pipeline.exits.calibration import ExitThresholds, calibrate
from pipeline.exits.confidence import get_metric
from pipeline.exits.heads import EarlyExitHeads
from pipeline.models.backbone import default_head_layers, load_backbone, num_layers_of

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
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        intermediate_size=4 * d_model,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )
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
        raise SystemExit(
            f"the prompt text has {len(ids)} tokens: too short for {n + offset} prompts of {length}"
        )
    return [ids[s : s + length] for s in starts]


# -- on-the-fly calibration and LayerSkip tuning ----------------------------------------------------------------


@torch.inference_mode()
def head_metrics_on_greedy(
    engine: Engine, prompts: Sequence[torch.Tensor], new_tokens: int, metric: str = "entropy"
) -> tuple[np.ndarray, np.ndarray]:
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


def calibrate_on_the_fly(
    engine: Engine, prompts, new_tokens: int, eps: Sequence[float], metric: str = "entropy"
) -> dict[float, list[float | None]]:
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


def run_benchmark(
    model: torch.nn.Module,
    heads: EarlyExitHeads,
    thresholds_by_eps: dict[float, list[float | None]],
    prompts: Sequence[torch.Tensor],
    new_tokens: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    layerskip: Sequence[LayerSkip] = (),
    max_draft: int = 16,
    metric: str = "entropy",
    fills: Sequence[str] = ("lazy",),
    label: str = "",
    extra: Sequence[tuple[str, str, Callable[[torch.Tensor], list[int]]]] = (),
    oracle: bool = True,
) -> pd.DataFrame:
    """One row per method/setting: speed (median, min, max over repeats; ratio to `generate`), compute and
    acceptance (summed over prompts), and whether every prompt's output equals greedy `generate`.
    `extra`: (method, setting, fn) where fn(prompt) -> new tokens, timed like `generate` (no engine stats)."""
    engine = Engine(model, heads)

    def hf_generate(prompt: torch.Tensor) -> list[int]:
        return hf_greedy(model, prompt, new_tokens)

    methods: list[tuple[str, str, Strategy | Callable | None]] = [
        ("generate", "transformers", None),
        ("greedy", "engine", Greedy()),
    ]
    for eps, thr in thresholds_by_eps.items():
        for fill in fills:
            methods.append(("early_exit", f"eps={eps} fill={fill}", EarlyExit(thr, fill=fill)))
    for strategy in layerskip:
        methods.append(("layerskip", f"head={strategy.head} d={strategy.max_draft}", strategy))
    for eps, thr in thresholds_by_eps.items():
        methods.append(
            ("dssd", f"eps={eps} max_draft={max_draft}", DSSD(thr, max_draft=max_draft))
        )
    methods += list(extra)

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
                elif not isinstance(strategy, Strategy):
                    tokens.append(strategy(prompt))
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
        row = {
            "model": label,
            "method": method,
            "setting": setting,
            "tokens_per_s": statistics.median(speeds[i]),
            "tok_s_min": min(speeds[i]),
            "tok_s_max": max(speeds[i]),
            "ratio_vs_generate": statistics.median(ratios),
            "identical_to_greedy": outputs[i] == reference,
        }
        if stats[i]:
            total = {
                key: sum(getattr(s, key) for s in stats[i])
                for key in ("generated", "drafted", "accepted", "verifications", "full_passes", "exited")
            }
            layer_eq = sum(s.layer_equivalents for s in stats[i])
            row.update(
                {
                    "layer_eq_per_token": layer_eq / total["generated"],
                    "acceptance": total["accepted"] / total["drafted"] if total["drafted"] else float("nan"),
                    "accepted_per_verification": (
                        total["accepted"] / total["verifications"] if total["verifications"] else float("nan")
                    ),
                    "exit_fraction": total["exited"] / total["generated"],
                }
            )
        rows.append(row)
    if not oracle:
        return pd.DataFrame(rows)
    bound = [engine.oracle_bound(p, new_tokens) for p in prompts]
    n_tok = sum(len(b.oracle_cost) for b in bound)
    rows.append(
        {
            "model": label,
            "method": "oracle_bound",
            "setting": "earliest agreeing head",
            "layer_eq_per_token": sum(sum(b.oracle_cost) for b in bound) / n_tok,
            "exit_fraction": sum(sum(h is not None for h in b.earliest_head) for b in bound) / n_tok,
            "identical_to_greedy": [b.tokens for b in bound] == reference,
        }
    )
    return pd.DataFrame(rows)


def hf_greedy(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, **generation: object
) -> list[int]:
    """transformers' greedy `generate` with an explicit GenerationConfig (no EOS: exactly `new_tokens` tokens,
    whatever the model's own generation_config says). `generation` adds e.g. assistant_early_exit=k."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        **generation,
    )
    with torch.inference_mode():
        out = model.generate(
            prompt.view(1, -1),
            attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long, device=prompt.device),
            generation_config=config,
        )
    return out[0, prompt.numel() :].tolist()


def _default_text() -> str:
    return inspect.getsource(textwrap)


# -- the pipeline's own outputs ---------------------------------------------------------------------------------


def _finished(cache: Path, stage: str, model: str) -> list[tuple[dict, Path]]:
    """Finished entries of one stage, newest first (completion record's start time, then file time)."""
    entries = []
    for record_path in (cache / stage / model).glob("*/_SUCCESS.json"):
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        entries.append((record.get("started", ""), record_path.stat().st_mtime, record, record_path.parent))
    entries.sort(key=lambda e: (e[0], e[1]), reverse=True)
    return [(record, path) for _, _, record, path in entries]


def find_pipeline_outputs(root: Path, model: str = "tiny") -> dict:
    """The latest finished calibrate entry for `model` under `root`/cache and the backbone, heads and extract
    entries it was computed from (its recorded upstream keys). Without a calibrate entry: the latest heads
    entry and its backbone (thresholds are then calibrated on the fly)."""
    cache = Path(root) / "cache"

    def upstream(record: dict, stage: str) -> Path | None:
        key = record.get("upstream", {}).get(stage)
        entry = cache / stage / model / str(key)
        return entry if key and (entry / "_SUCCESS.json").is_file() else None

    for record, entry in _finished(cache, "calibrate", model):
        found = {name: upstream(record, name) for name in ("backbone", "heads", "extract")}
        if found["backbone"] and found["heads"]:
            return {**found, "thresholds": entry / "thresholds.json", "calibrate": entry}
    for record, entry in _finished(cache, "heads", model):
        found = {"backbone": upstream(record, "backbone"), "extract": upstream(record, "extract")}
        if found["backbone"]:
            return {**found, "heads": entry, "thresholds": None, "calibrate": None}
    raise SystemExit(
        f"no finished backbone + heads outputs for model {model!r} under {cache}: run the pipeline "
        "first (`python -m pipeline`), pass --model-dir/--heads-dir/--thresholds, or use random-weight "
        "models (--shapes tiny pythia-70m)"
    )


def pipeline_prompts(found: dict, tokenizer, n: int, n_tune: int, length: int):
    """Test-split prompts and validation-split tuning prompts of the data the extract stage read."""
    from pipeline.data.tokens import make_text_source, token_blocks

    record = json.loads((found["extract"] / "_SUCCESS.json").read_text())
    source = make_text_source(record["config"]["data"])
    test = token_blocks(source, tokenizer, "test", n * length, length)
    tune = token_blocks(source, tokenizer, "validation", n_tune * length, length)
    return list(test), list(tune)


# -- Llama: transformers' assistant_early_exit next to our LayerSkip ---------------------------------------------

LLAMA_SHAPES = {  # (layers, d_model, attention heads, KV heads, vocab)
    "llama-tiny": (8, 256, 8, 4, 4096),
    "llama-small": (16, 512, 8, 4, 32000),
}


def random_llama(shape: str = "llama-tiny", embed_scale: float = 10.0, seed: int = 0) -> torch.nn.Module:
    """A random-weight LlamaForCausalLM (GQA, untied LM head) whose token embeddings are scaled by
    `embed_scale`, so that early exits often agree with the full model (see the module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, d_model, n_heads, n_kv, vocab = LLAMA_SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=int(2.6875 * d_model) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    model.model.embed_tokens.weight.mul_(embed_scale)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def llama_assistant_benchmark(shape: str, args) -> pd.DataFrame:
    """Our LayerSkip (tuned head and d) vs transformers' assistant_early_exit with the same exit block and
    draft length, plus `generate` and our greedy, on one random Llama model and the same prompts."""
    model = random_llama(shape, args.llama_embed_scale)
    vocab = model.get_output_embeddings().out_features
    prompts = random_prompts(vocab, args.n_prompts, args.prompt_len, seed=1)
    tune = random_prompts(vocab, args.n_tune_prompts, args.prompt_len, seed=2)
    layers = default_head_layers(num_layers_of(model))
    heads = EarlyExitHeads.from_backbone(model, layers, init="unembedding").eval()  # final norm + LM head
    engine = Engine(model, heads)
    best = tune_layerskip(engine, tune, args.new_tokens, args.layerskip_d)
    k, d = (
        layers[best.head] + 1,
        best.max_draft,
    )  # transformers counts the drafter's blocks: block k-1's output
    extra = [
        (
            "assistant_early_exit",
            f"transformers k={k} d={d} (constant)",
            lambda prompt: hf_greedy(
                model,
                prompt,
                args.new_tokens,
                assistant_early_exit=k,
                num_assistant_tokens=d,
                num_assistant_tokens_schedule="constant",
            ),
        ),
        (
            "assistant_early_exit",
            f"transformers k={k} (default schedule)",
            lambda prompt: hf_greedy(model, prompt, args.new_tokens, assistant_early_exit=k),
        ),
    ]
    label = f"{shape} (random weights, embeddings ×{args.llama_embed_scale:g})"
    return run_benchmark(
        model,
        heads,
        {},
        prompts,
        args.new_tokens,
        args.repeats,
        args.warmup,
        [best],
        args.max_draft,
        label=label,
        extra=extra,
        oracle=False,
    )


# -- main -------------------------------------------------------------------------------------------------------

GPT_NEOX_NOTE = (
    "note: transformers' assistant_early_exit is shown only for Llama: on GPT-NeoX (Pythia) it "
    "silently runs the full model (its layer loop ignores num_hidden_layers; DESIGN.md §6)."
)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--from-outputs",
        type=Path,
        default=Path("outputs"),
        help="pipeline outputs root: latest finished backbone/heads/calibrate (default: outputs)",
    )
    parser.add_argument("--model", default="tiny", help="model name under <outputs>/cache (default: tiny)")
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=list(SHAPES),
        help="random-weight models of these shapes instead of the pipeline's outputs",
    )
    parser.add_argument("--model-dir", type=Path, help="a saved model (overrides --from-outputs)")
    parser.add_argument("--heads-dir", type=Path, help="trained heads for --model-dir (default: logit lens)")
    parser.add_argument("--thresholds", type=Path, help="thresholds file from the calibrate stage")
    parser.add_argument("--method", default="empirical", help="calibration method in the thresholds file")
    parser.add_argument("--eps", type=float, nargs="+", default=list(DEFAULT_EPS))
    parser.add_argument(
        "--text", type=Path, help="text for prompts with --model-dir (default: stdlib source)"
    )
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--n-tune-prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-draft", type=int, default=16)
    parser.add_argument("--layerskip-d", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--fills", nargs="+", default=["lazy"], choices=["lazy", "copy", "recompute"])
    parser.add_argument(
        "--llama",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also benchmark transformers' assistant_early_exit vs our LayerSkip on a random Llama",
    )
    parser.add_argument("--llama-shape", choices=list(LLAMA_SHAPES), default="llama-tiny")
    parser.add_argument("--llama-embed-scale", type=float, default=10.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 is stable on a shared machine; ratios are per setting)",
    )
    parser.add_argument("--csv", type=Path, default=Path("outputs/benchmarks/decoding_speed.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    # (label, model, tokenizer, heads dir, thresholds file, prompts or None)
    targets: list[tuple] = []
    if args.shapes:
        targets = [(f"{s} (random weights)", random_model(s), None, None, None, None) for s in args.shapes]
    elif args.model_dir:
        model, tokenizer = load_backbone(args.model_dir)
        targets = [(str(args.model_dir), model, tokenizer, args.heads_dir, args.thresholds, None)]
    else:
        from pipeline.models.backbone import load_from_stage_output

        found = find_pipeline_outputs(args.from_outputs, args.model)
        model, tokenizer = load_from_stage_output(found["backbone"])
        prompts = None
        if found["extract"] is not None:
            try:
                prompts = pipeline_prompts(
                    found, tokenizer, args.n_prompts, args.n_tune_prompts, args.prompt_len
                )
            except (ValueError, OSError) as err:  # e.g. a hub corpus that is not reachable now
                print(f"# prompts from the pipeline's data unavailable ({err}); using standard-library text")
        print(
            f"# pipeline outputs: backbone {found['backbone']}, heads {found['heads']}, "
            f"thresholds {found['thresholds'] or 'calibrated on the fly'}"
        )
        targets = [
            (
                f"{args.model} (pipeline outputs)",
                model,
                tokenizer,
                found["heads"],
                found["thresholds"],
                prompts,
            )
        ]
    frames = []
    for label, model, tokenizer, heads_dir, thresholds_file, given in targets:
        model.eval().requires_grad_(False)
        vocab = model.get_output_embeddings().out_features
        if given is not None:
            prompts, tune = given
        elif tokenizer is not None:
            text = args.text.read_text() if args.text else _default_text()
            prompts = text_prompts(tokenizer, text, args.n_prompts, args.prompt_len)
            tune = text_prompts(tokenizer, text, args.n_tune_prompts, args.prompt_len, offset=args.n_prompts)
        else:
            prompts = random_prompts(vocab, args.n_prompts, args.prompt_len, seed=1)
            tune = random_prompts(vocab, args.n_tune_prompts, args.prompt_len, seed=2)
        if heads_dir:
            heads = EarlyExitHeads.load(heads_dir, model)
        else:
            layers = default_head_layers(num_layers_of(model))
            heads = EarlyExitHeads.from_backbone(model, layers, init="unembedding")
        heads.eval()
        engine = Engine(model, heads)
        if thresholds_file:
            table = ExitThresholds.load(thresholds_file)
            eps = [e for e in args.eps if any(abs(e - c) < 1e-9 for c in table.eps)]
            if not eps:
                raise SystemExit(
                    f"none of --eps {args.eps} is calibrated in {thresholds_file} (ε: {table.eps})"
                )
            thresholds = {e: table.for_eps(args.method, e) for e in eps}
            metric = table.metric
        else:
            metric = "entropy"
            thresholds = calibrate_on_the_fly(engine, tune, args.new_tokens, args.eps, metric)
        layerskip = tune_layerskip(engine, tune, args.new_tokens, args.layerskip_d)
        frame = run_benchmark(
            model,
            heads,
            thresholds,
            prompts,
            args.new_tokens,
            args.repeats,
            args.warmup,
            [layerskip],
            args.max_draft,
            metric,
            args.fills,
            label,
        )
        frames.append(frame)
        _print(frame, label, args)
    if args.llama:
        frame = llama_assistant_benchmark(args.llama_shape, args)
        frames.append(frame)
        _print(frame, frame["model"].iloc[0], args)
        print(GPT_NEOX_NOTE)
    result = pd.concat(frames, ignore_index=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(args.csv, index=False)
    return result


def _print(frame: pd.DataFrame, label: str, args) -> None:
    machine = {
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "prompts": args.n_prompts,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
    }
    print(f"\n# decoding speed on {label}; {json.dumps(machine)}")
    shown = frame.drop(columns=["model"]).dropna(axis=1, how="all")
    try:
        print(shown.to_markdown(index=False, floatfmt=".3g"))
    except ImportError:  # tabulate is optional
        print(shown.to_string(index=False, float_format=lambda x: f"{x:.3g}"))


if __name__ == "__main__":
    main()
