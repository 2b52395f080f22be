"""How often do LayerSkip / DSSD outputs differ from greedy on bf16 models, and are the differences near-ties?

Small random-weight GPT-NeoX, Llama and Qwen2 models in bf16 (or --dtype float16/float32), logit-lens heads,
random prompts. Every LayerSkip (head × d) and DSSD setting is compared with the engine's greedy decoding,
and the engine's greedy with transformers' `generate(do_sample=False)`; each run is classified by
pipeline/evaluation/losslessness.py (exact / near_tie / mismatch) against fp32-head reference logits.

`--head model-dtype` / `--attention model-dtype` compute the final norm + LM head / the attention in the
model's dtype (as the engine did before it computed them in fp32 for bf16/fp16 models), to measure what each
change buys. Prints, per architecture: runs, divergences, near-ties, mismatches, and the gaps of the
divergences in ulps of the dtype at the logits' scale. Measured with --prompts 20 on 2 CPU cores (840
speculative runs, 60 greedy-vs-generate runs per line; ~9 minutes each):
    all in bf16 (before)        59 of 840 diverged, all near-ties; greedy vs generate 0 of 60
    fp32 head only              68 of 840; greedy vs generate 20 of 60 (all near-ties)
    fp32 attention only          0 of 840; greedy vs generate 15 of 60 (all near-ties)
    fp32 head + attention (now)  0 of 840; greedy vs generate 18 of 60 (all near-ties); gaps at most 1.45 ulps

Usage:
    python benchmarks/bf16_losslessness.py                          # 3 architectures × 50 prompts, as now
    python benchmarks/bf16_losslessness.py --head model-dtype --attention model-dtype   # before: all in bf16
    python benchmarks/bf16_losslessness.py --attention model-dtype  # fp32 head only
    python benchmarks/bf16_losslessness.py --head model-dtype       # fp32 attention only
    python benchmarks/bf16_losslessness.py --prompts 10 --seeds 0 1 --dtype float16
    python benchmarks/bf16_losslessness.py --device cuda            # GPU kernels
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter

import torch

from pipeline.engine import DSSD, Engine, Greedy, LayerSkip
from pipeline.evaluation.decoding_harness import hf_greedy
from pipeline.evaluation.losslessness import MISMATCH, NEAR_TIE, NEAR_TIE_ULPS, classify
from pipeline.exits.confidence import entropy
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ExitPolicy
from pipeline.models.backbone import resolve_dtype

HEAD_LAYERS = [0, 1, 4, 5]
NUM_LAYERS = 6
VOCAB = 256


def random_model(arch: str, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    """A 6-block, 64-wide random model of `arch` (neox, llama, qwen2) with transformers' default init."""
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4)
    common.update(max_position_embeddings=256, tie_word_embeddings=False)
    if arch == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(intermediate_size=256, rotary_pct=0.25, **common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, intermediate_size=128, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, intermediate_size=128, **common))
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose neox, llama or qwen2")
    model = model.eval().requires_grad_(False).to(dtype)
    model.generation_config.eos_token_id = None
    return model


def random_prompts(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 13, (n,), generator=gen).tolist()
    return [torch.randint(0, VOCAB, (length,), generator=gen) for length in lengths]


def entropy_policies(model, heads, prompts, quantiles=(0.3, 0.7)) -> list[ExitPolicy]:
    """Entropy policies whose per-head thresholds are quantiles of the heads' entropies on a few prompts, so
    that DSSD drafts at two rates."""
    per_head: list[list[float]] = [[] for _ in HEAD_LAYERS]
    with torch.inference_mode():
        for prompt in prompts[:5]:
            hidden = model(prompt.view(1, -1), output_hidden_states=True).hidden_states
            for k, layer in enumerate(HEAD_LAYERS):
                per_head[k] += entropy(heads(k, hidden[layer + 1][0].float())).tolist()
    return [
        ExitPolicy(HEAD_LAYERS, [float(torch.tensor(e).quantile(q)) for e in per_head], "entropy")
        for q in quantiles
    ]


def strategies(policies: list[ExitPolicy]) -> list:
    layerskip = [LayerSkip(k, d) for k in range(len(HEAD_LAYERS)) for d in (1, 3, 7)]
    return [*layerskip, *(DSSD(p, max_draft=16) for p in policies)]


def in_model_dtype(engine: Engine, head: bool, attention: bool) -> Engine:
    """The engine with its final norm + LM head and/or its attention in the model's dtype (as before they
    were computed in fp32 for bf16/fp16 models)."""
    a = engine.adapter
    if head:
        a.head_norm, a.head_proj, a.logits_dtype = a.final_norm, a.unembedding, a.dtype
    if attention:
        a.attention_dtype = a.dtype
    return engine


def measure(
    arch: str,
    seed: int,
    n_prompts: int,
    new_tokens: int,
    dtype: torch.dtype,
    head: str,
    attention: str,
    device: str = "cpu",
) -> dict:
    model = random_model(arch, seed, dtype).to(device)
    # fp32 heads, as `EarlyExitHeads.load` gives the decoding stage whatever the backbone's dtype.
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init="unembedding", seed=seed).float().to(device)
    engine = in_model_dtype(Engine(model, heads), head == "model-dtype", attention == "model-dtype")
    judge = Engine(model, heads)  # classifies with the fp32-head reference logits in both modes
    prompts = [p.to(device) for p in random_prompts(n_prompts, seed + 1000)]
    settings = strategies(entropy_policies(model, heads, prompts))
    counts: Counter = Counter()
    gaps_ulps: list[float] = []
    for prompt in prompts:
        greedy = engine.generate(prompt, Greedy(), new_tokens).tokens
        pairs = [("greedy_vs_generate", hf_greedy(model, prompt, new_tokens), greedy)]
        pairs += [("speculative", greedy, engine.generate(prompt, s, new_tokens).tokens) for s in settings]
        for kind, reference, tokens in pairs:
            counts[kind, "runs"] += 1
            verdict = classify(reference, tokens, prompt, judge)
            counts[kind, verdict.kind] += 1
            if verdict.divergence is not None and verdict.kind in (NEAR_TIE, MISMATCH):
                d = verdict.divergence
                gaps_ulps.append(d.gap / (d.tolerance / NEAR_TIE_ULPS) if d.tolerance else float("nan"))
    return {"counts": counts, "gaps_ulps": gaps_ulps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["neox", "llama", "qwen2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--head", choices=["fp32", "model-dtype"], default="fp32")
    parser.add_argument("--attention", choices=["fp32", "model-dtype"], default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="e.g. cuda: GPU kernels round differently")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)
    total: Counter = Counter()
    all_gaps: list[float] = []
    for arch in args.archs:
        for seed in args.seeds:
            result = measure(
                arch, seed, args.prompts, args.new_tokens, dtype, args.head, args.attention, args.device
            )
            counts, gaps = result["counts"], result["gaps_ulps"]
            total.update(counts)
            all_gaps += gaps
            print(f"{arch} seed={seed}: {format_counts(counts)}{format_gaps(gaps)}", flush=True)
    print(
        f"all ({args.dtype}, head {args.head}, attention {args.attention}): {format_counts(total)}{format_gaps(all_gaps)}"
    )


def format_counts(counts: Counter) -> str:
    parts = []
    for kind in ("speculative", "greedy_vs_generate"):
        runs = counts[kind, "runs"]
        diverged = runs - counts[kind, "exact"]
        parts.append(
            f"{kind}: {diverged} of {runs} runs diverged "
            f"({counts[kind, NEAR_TIE]} near_tie, {counts[kind, MISMATCH]} mismatch)"
        )
    return "; ".join(parts)


def format_gaps(gaps: list[float]) -> str:
    finite = [g for g in gaps if g == g]
    if not finite:
        return ""
    return f"; gaps in ulps: median {statistics.median(finite):.2f}, max {max(finite):.2f}"


if __name__ == "__main__":
    main()
