"""Sampling exactness: do DSSD and LayerSkip with sampling draw tokens exactly as the full model does?

On tiny random GPT-NeoX and Llama models (vocabulary of 16 tokens, 3 blocks, logit-lens heads after blocks
0 and 1, so that drafts are often but not always accepted), each strategy generates 4 tokens after a fixed
prompt many times with a seeded generator. Token 1 comes from the prompt's pass through the full model in
every strategy; tokens 2 and 3 are the first ones a draft can produce (accepted, corrected, or a bonus). Their
empirical joint distribution is compared with the exact one computed from the full model's logits by
transformers' forward (P(t2, t3) = Σ_t1 p(t1) p(t2 | t1) p(t3 | t1, t2), every p after the same temperature /
top-k / top-p transform) with a chi-square test (cells expected below 5 pooled; a token of probability 0
that is ever drawn fails outright). Fixed seeds make every p-value deterministic for a given machine and
thread count. Exact sampling gives p-values spread uniformly over (0, 1); the tests reject below 1e-3.

Negative controls show the test has power: `draft head alone` (early exit at head 0 for every token: the
drafter's distribution, not the full model's) and `resample from p` (speculative sampling with the rejection
step drawing from p instead of normalize(max(0, p - q)), a plausible bug) must be rejected.

Usage:
    python benchmarks/sampling_exactness.py                 # the whole matrix (a few minutes on one core)
    python benchmarks/sampling_exactness.py --samples 20000 --models neox --strategies "dssd entropy"

tests/test_sampling.py runs a representative subset by default and the whole matrix with `-m slow`.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pandas as pd
import torch
from scipy import stats as scipy_stats
from torch import nn

from pipeline.engine import DSSD, EarlyExit, Engine, Greedy, LayerSkip, Sampling, Strategy
from pipeline.engine import sampling as sampling_module
from pipeline.exits.confidence import entropy
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ALWAYS, ExitPolicy

VOCAB = 16
HEAD_LAYERS = (0, 1)
PROMPT = (3, 5)
NEW_TOKENS = 4  # 1 (full model) + up to 2 drafts with a bonus, or 3 without: tokens 2 and 3 are tested
ALPHA = 1e-3
MODELS = ("neox", "llama")

SAMPLINGS = {
    "T=1.0": Sampling(1.0),
    "T=0.7": Sampling(0.7),
    "T=0.7 top-k=4": Sampling(0.7, top_k=4),
    "T=1.0 top-p=0.8": Sampling(1.0, top_p=0.8),
}

# Strategies that must be exact, and negative controls that must be rejected.
EXACT = (
    "greedy",
    "layerskip h0 d=1",
    "layerskip h1 d=3",
    "layerskip h0 d=2 no bonus",
    "dssd always",
    "dssd never",
    "dssd entropy",
)
CONTROLS = ("draft head alone", "resample from p")


def tiny_model(kind: str) -> nn.Module:
    """3 blocks, d_model 32, 16 tokens; initializer range 0.3 so that distributions are far from uniform."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    common = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "initializer_range": 0.3,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    if kind == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(rotary_pct=0.5, **common))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))  # GQA
    else:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {MODELS}")
    return model.eval().requires_grad_(False)


def tiny_engine(kind: str) -> Engine:
    model = tiny_model(kind)
    heads = EarlyExitHeads.from_backbone(model, list(HEAD_LAYERS), init="unembedding").eval()
    return Engine(model, heads)


# -- the exact distribution ------------------------------------------------------------------------------------


def _continuations(prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """Every sequence prompt + (t_1 .. t_n_new) over the vocabulary: [VOCAB ** n_new, len(prompt) + n_new]."""
    grids = torch.cartesian_prod(*[torch.arange(VOCAB)] * n_new).view(-1, n_new)
    return torch.cat([prompt.expand(grids.shape[0], -1), grids], dim=1)


@torch.inference_mode()
def exact_pair_distribution(model: nn.Module, sampling: Sampling, prompt=PROMPT) -> np.ndarray:
    """P(t2, t3) [VOCAB, VOCAB] of ancestral sampling from the full model (transformers' forward)."""
    prompt = torch.tensor(prompt).view(1, -1)

    def next_probs(n_new: int) -> torch.Tensor:
        seqs = _continuations(prompt, n_new) if n_new else prompt
        return sampling.probs(model(seqs).logits[:, -1]).double()

    p1 = next_probs(0).view(VOCAB)
    p2 = next_probs(1).view(VOCAB, VOCAB)  # [t1, t2]
    p3 = next_probs(2).view(VOCAB, VOCAB, VOCAB)  # [t1, t2, t3]
    joint = torch.einsum("a,ab,abc->bc", p1, p2, p3)
    return joint.numpy()


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value of observed `counts` against cell probabilities `probs` (same shape).

    Cells expected below 5 are pooled into one (with the next smallest cells until the pool reaches 5); a
    count in a cell of probability 0 gives p = 0."""
    counts, probs = np.asarray(counts, float).ravel(), np.asarray(probs, float).ravel()
    n = counts.sum()
    impossible = probs <= 0
    if counts[impossible].sum() > 0:
        return 0.0
    counts, expected = counts[~impossible], probs[~impossible] / probs[~impossible].sum() * n
    order = np.argsort(expected)
    counts, expected = counts[order], expected[order]
    small = int((expected < 5).sum())
    pooled = max(small, int(np.searchsorted(np.cumsum(expected), 5.0)) + 1) if small else 0
    if pooled:
        counts = np.concatenate([[counts[:pooled].sum()], counts[pooled:]])
        expected = np.concatenate([[expected[:pooled].sum()], expected[pooled:]])
    if len(expected) < 2:
        return 1.0
    statistic = float(((counts - expected) ** 2 / expected).sum())
    return float(scipy_stats.chi2.sf(statistic, len(expected) - 1))


# -- the strategies --------------------------------------------------------------------------------------------


@torch.inference_mode()
def median_head_entropies(engine: Engine, prompt=PROMPT) -> list[float]:
    """Per head, the median entropy of its logits over every 2-token continuation of the prompt: an
    entropy threshold that makes DSSD draft about half the time."""
    seqs = _continuations(torch.tensor(prompt).view(1, -1), 2)
    hidden = engine.model(seqs, output_hidden_states=True).hidden_states
    return [
        float(entropy(engine.heads(k, hidden[layer + 1][:, -1])).median())
        for k, layer in enumerate(engine.head_layers)
    ]


def make_strategy(name: str, engine: Engine) -> Strategy:
    """The strategy a row of the matrix names (the controls included)."""
    layers = engine.head_layers
    if name == "greedy":
        return Greedy()
    if name in ("layerskip h0 d=1", "resample from p"):
        return LayerSkip(0, 1)
    if name == "layerskip h1 d=3":
        return LayerSkip(1, 3)
    if name == "layerskip h0 d=2 no bonus":
        return LayerSkip(0, 2, bonus=False)
    if name == "dssd always":
        return DSSD(ExitPolicy(layers, [ALWAYS, None]))
    if name == "dssd never":
        return DSSD(ExitPolicy(layers, [None, None]))
    if name == "dssd entropy":
        return DSSD(ExitPolicy(layers, median_head_entropies(engine), "entropy"))
    if name == "draft head alone":
        return EarlyExit(ExitPolicy.fixed_head(layers, 0))
    raise ValueError(f"unknown strategy {name!r}; choose one of {EXACT + CONTROLS}")


@contextlib.contextmanager
def resample_from_p() -> Iterator[None]:
    """The bug the `resample from p` control plants: a rejected draft replaced by a draw from p."""
    with mock.patch.object(sampling_module, "residual_distribution", lambda p, q: p):
        yield


# -- one cell of the matrix ------------------------------------------------------------------------------------


@dataclass
class ExactnessResult:
    model: str
    strategy: str
    sampling: str
    samples: int
    p_value: float
    drafted: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


def sample_pairs(
    engine: Engine, strategy: Strategy, sampling: Sampling, samples: int, seed: int = 0
) -> tuple[np.ndarray, int, int]:
    """Counts of (t2, t3) over `samples` generations, and the drafts made and accepted along the way."""
    generator = torch.Generator().manual_seed(seed)
    counts = np.zeros((VOCAB, VOCAB), dtype=np.int64)
    drafted = accepted = 0
    for _ in range(samples):
        result = engine.generate(PROMPT, strategy, NEW_TOKENS, sampling=sampling, generator=generator)
        result.stats.check()
        counts[result.tokens[1], result.tokens[2]] += 1
        drafted += result.stats.drafted
        accepted += result.stats.accepted
    return counts, drafted, accepted


def check_exactness(
    engine: Engine, model_kind: str, strategy: str, sampling: str, samples: int, seed: int = 0
) -> ExactnessResult:
    """One cell: sample with `strategy` under `SAMPLINGS[sampling]`, chi-square against the exact pair."""
    chosen = SAMPLINGS[sampling]
    planted: Callable[[], contextlib.AbstractContextManager] = (
        resample_from_p if strategy == "resample from p" else contextlib.nullcontext
    )
    with planted():
        counts, drafted, accepted = sample_pairs(
            engine, make_strategy(strategy, engine), chosen, samples, seed
        )
    p_value = chi_square_pvalue(counts, exact_pair_distribution(engine.model, chosen))
    return ExactnessResult(model_kind, strategy, sampling, samples, p_value, drafted, accepted)


# -- main ------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--strategies", nargs="+", choices=list(EXACT + CONTROLS), default=list(EXACT + CONTROLS)
    )
    parser.add_argument("--samplings", nargs="+", choices=list(SAMPLINGS), default=list(SAMPLINGS))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for kind in args.models:
        engine = tiny_engine(kind)
        for strategy in args.strategies:
            for sampling in args.samplings:
                result = check_exactness(engine, kind, strategy, sampling, args.samples, args.seed)
                expected = "reject" if strategy in CONTROLS else "exact"
                passed = (result.p_value < ALPHA) == (expected == "reject")
                rows.append(
                    {
                        "model": kind,
                        "strategy": strategy,
                        "sampling": sampling,
                        "samples": result.samples,
                        "expected": expected,
                        "p_value": result.p_value,
                        "acceptance_rate": result.acceptance_rate,
                        "ok": passed,
                    }
                )
                print(
                    f"{kind:6} {strategy:26} {sampling:16} p={result.p_value:.3g} "
                    f"acceptance={result.acceptance_rate:.3f} ({expected}: {'ok' if passed else 'FAILED'})",
                    flush=True,
                )
    table = pd.DataFrame(rows)
    print(f"\n# chi-square p-values of (token 2, token 3), {args.samples} samples, seed {args.seed}")
    try:
        print(table.to_markdown(index=False, floatfmt=".3g"))
    except ImportError:  # tabulate is optional
        print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
