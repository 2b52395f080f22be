"""Sampling: the Sampling transform, the speculative acceptance rule, and exactness in distribution.

The exactness tests compare the empirical joint distribution of generated tokens 2 and 3 (the first ones a
draft can produce) with the exact distribution computed from the full model's logits, by a chi-square test
at fixed seeds (benchmarks/sampling_exactness.py; run with `-s` to see the p-values). A representative subset
runs by default; the whole matrix (both architectures × every strategy × every sampling) is `slow`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import sampling_exactness as exactness
from pipeline.engine import DSSD, EarlyExit, Engine, Greedy, LayerSkip, Sampling
from pipeline.engine.sampling import (
    acceptance_probability,
    residual_distribution,
    sample,
    verify_drafts,
)
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ExitPolicy

from .conftest import tiny_gpt_neox


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (see conftest); p-values are deterministic for a fixed thread count."""


# -- Sampling: validation and the transform ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature is 0.0: it must be a finite number > 0"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_k": -1}, r"top_k is -1: it must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, r"top_p is 0.0: it must be in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
    ],
)
def test_invalid_sampling_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_or_greedy_maps_temperature_zero_to_greedy():
    assert Sampling.or_greedy(0.0) is None
    assert Sampling.or_greedy(0.7, top_k=5) == Sampling(0.7, top_k=5, top_p=1.0)


def test_probs_temperature_top_k_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.5, -1.0])
    torch.testing.assert_close(Sampling(0.5).probs(logits), torch.softmax(logits / 0.5, -1))
    # top-k keeps the k largest logits, ties at the k-th included (here 3 and 4 tie).
    kept = Sampling(1.0, top_k=3).probs(logits)
    assert (kept > 0).tolist() == [True, True, True, True, False]
    torch.testing.assert_close(kept[:4], torch.softmax(logits[:4], -1))
    # top-p keeps the smallest most-probable set whose mass reaches top_p.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    nucleus = Sampling(1.0, top_p=0.8).probs(probs.log())
    torch.testing.assert_close(nucleus, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert (Sampling(1.0, top_p=0.81).probs(probs.log()) > 0).sum() == 3
    assert (Sampling(1.0, top_p=0.01).probs(probs.log()) > 0).tolist() == [True, False, False, False]
    # Batched over leading dimensions, row by row.
    batch = torch.stack([logits, logits.flip(0)])
    torch.testing.assert_close(
        Sampling(0.7, top_k=2, top_p=0.9).probs(batch)[1],
        Sampling(0.7, top_k=2, top_p=0.9).probs(logits.flip(0)),
    )


# -- the acceptance rule on hand-built distributions ---------------------------------------------------------


def test_acceptance_probability_cases():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5, 0.0])
    assert acceptance_probability(p, q, 0) == 1.0  # p(x) >= q(x)
    assert acceptance_probability(p, q, 2) == 0.0  # p(x) = 0: never kept
    assert acceptance_probability(q, p, 0) == 0.5  # p(x)/q(x)
    assert acceptance_probability(p, torch.tensor([0.0, 1.0, 0.0, 0.0]), 0) == 1.0  # q(x) = 0 < p(x)
    assert acceptance_probability(p, q, 3) == 0.0  # q(x) = p(x) = 0


def test_residual_distribution_cases():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5, 0.0])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(residual_distribution(q, p), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    # p <= q everywhere (p == q): rejection only happens by rounding; the replacement is drawn from p.
    torch.testing.assert_close(residual_distribution(p, p.clone()), p)


def _rule_output_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The exact distribution of the token the rule keeps: Σ_x q(x) a(x) δ_x + P(reject) residual."""
    accept = torch.tensor([acceptance_probability(p, q, x) for x in range(p.numel())], dtype=p.dtype)
    kept = q * accept
    return kept + (1 - kept.sum()) * residual_distribution(p, q)


@pytest.mark.parametrize(
    "case", ["random", "q_top_k_masked", "p_top_k_masked", "disjoint_supports", "p_equals_q"]
)
def test_rule_reproduces_p_exactly(case):
    gen = torch.Generator().manual_seed(0)
    p_logits = torch.randn(12, generator=gen, dtype=torch.float64)
    q_logits = torch.randn(12, generator=gen, dtype=torch.float64)
    p, q = torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)
    if case == "q_top_k_masked":  # the drafter never proposes most tokens (q(x) = 0)
        q = Sampling(1.0, top_k=3).probs(q_logits).double()
    elif case == "p_top_k_masked":  # drafts the target never emits must always be rejected
        p = Sampling(1.0, top_k=3).probs(p_logits).double()
    elif case == "disjoint_supports":
        p = torch.tensor([0.0] * 6 + [1 / 6] * 6, dtype=torch.float64)
        q = torch.tensor([1 / 6] * 6 + [0.0] * 6, dtype=torch.float64)
    elif case == "p_equals_q":
        q = p.clone()
    p, q = p / p.sum(), q / q.sum()  # the float32 transform's rounding: exact sums for the identity below
    torch.testing.assert_close(_rule_output_distribution(p, q), p, atol=1e-12, rtol=0)


def test_verify_drafts_chain_and_sampling():
    p = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    # Draft 0 has p = 0: rejected, replaced by the only token of the residual; draft 1 is never looked at.
    assert verify_drafts(p, q, [0, 0], gen) == (0, 1)
    # p = q: every draft kept, no replacement (the caller draws the bonus token).
    assert verify_drafts(q, q, [0, 0], gen) == (2, None)
    # One draft, Monte Carlo: the kept token is distributed as p (q has a zero where p does not).
    p1, q1 = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.8, 0.0, 0.2])
    counts = torch.zeros(3)
    for _ in range(4000):
        draft = sample(q1, gen)
        kept, replacement = verify_drafts(p1.view(1, -1), q1.view(1, -1), [draft], gen)
        counts[draft if kept else replacement] += 1
    assert exactness.chi_square_pvalue(counts.numpy(), p1.numpy()) > exactness.ALPHA


def test_chi_square_pvalue_pools_and_rejects_impossible_tokens():
    probs = [0.5, 0.49, 0.01, 0.0]
    assert exactness.chi_square_pvalue([50, 49, 1, 0], probs) > 0.9
    assert exactness.chi_square_pvalue([50, 48, 1, 1], probs) == 0.0  # a token of probability 0 was drawn
    assert exactness.chi_square_pvalue([80, 19, 1, 0], probs) < 1e-3


# -- the engine with sampling ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def neox_engine() -> Engine:
    """3 blocks, 16 tokens, logit-lens heads after blocks 0 and 1; large random weights (no near-ties
    between the top logits, which rounding could flip between the engine and transformers)."""
    engine = exactness.tiny_engine("neox")
    engine.model.generation_config.eos_token_id = None
    engine.model.generation_config.pad_token_id = 0
    return engine


def _strategies() -> list:
    policy = ExitPolicy([0, 1], [1.5, 2.0], "entropy")
    return [Greedy(), EarlyExit(policy), LayerSkip(1, 3), LayerSkip(0, 2, bonus=False), DSSD(policy, 4)]


def test_sampling_none_is_greedy_decoding(neox_engine):
    """sampling=None (a generator passed or not) is exactly transformers' greedy decoding for the lossless
    strategies, and a vanishing temperature gives the same tokens."""
    gen = torch.Generator().manual_seed(1)
    model = neox_engine.model
    for prompt in [torch.randint(0, 16, (length,), generator=gen) for length in range(1, 13, 2)]:
        with torch.no_grad():
            out = model.generate(
                prompt.view(1, -1),
                attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                do_sample=False,
                max_new_tokens=10,
                pad_token_id=0,
            )
        reference = out[0, prompt.numel() :].tolist()
        for strategy in _strategies():
            if isinstance(strategy, EarlyExit):
                continue  # lossy: compared with its own greedy run below
            assert neox_engine.generate(prompt, strategy, 10).tokens == reference
            assert (
                neox_engine.generate(prompt, strategy, 10, sampling=None, generator=gen).tokens == reference
            )
        cold = Sampling(temperature=1e-4)
        assert (
            neox_engine.generate(prompt, DSSD(_strategies()[-1].policy), 10, sampling=cold).tokens
            == reference
        )
        early = _strategies()[1]
        assert (
            neox_engine.generate(prompt, early, 10, sampling=cold).tokens
            == neox_engine.generate(prompt, early, 10).tokens
        )


def test_same_seed_same_tokens_and_stats_add_up(neox_engine):
    prompt = torch.tensor([5, 9, 2])
    sampling = Sampling(0.9, top_k=20, top_p=0.95)
    for strategy in _strategies():
        runs = [
            neox_engine.generate(
                prompt, strategy, 24, sampling=sampling, generator=torch.Generator().manual_seed(seed)
            )
            for seed in (7, 7, 8)
        ]
        assert runs[0].tokens == runs[1].tokens
        assert runs[0].tokens != runs[2].tokens
        for run in runs:
            run.stats.check()
            assert len(run.tokens) == 24


def test_drafter_equal_to_full_model_accepts_every_draft():
    """A head at the last block with the model's own unembedding drafts from q = p (up to rounding): the
    rule accepts (almost surely) every draft, and each fully accepted round adds a bonus token."""
    model = tiny_gpt_neox(num_layers=4, d_model=32, vocab=64, seed=0).requires_grad_(False)
    heads = EarlyExitHeads.from_backbone(model, [3], init="unembedding").eval()
    engine = Engine(model, heads)
    result = engine.generate(
        [1, 2, 3], LayerSkip(0, 3), 40, sampling=Sampling(1.0), generator=torch.Generator().manual_seed(0)
    )
    stats = result.stats
    stats.check()
    assert stats.drafted > 0 and stats.acceptance_rate == 1.0 and stats.corrections == 0
    assert stats.bonus == stats.verifications


def test_generate_rejects_a_non_sampling(neox_engine):
    with pytest.raises(TypeError, match="Sampling"):
        neox_engine.generate([1, 2], Greedy(), 4, sampling=0.7)


# -- exactness in distribution: chi-square against the full model ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_engines() -> dict[str, Engine]:
    return {kind: exactness.tiny_engine(kind) for kind in exactness.MODELS}


def _check(engines, model: str, strategy: str, sampling: str, samples: int = 5000):
    result = exactness.check_exactness(engines[model], model, strategy, sampling, samples)
    print(
        f"\n[sampling exactness] {model} / {strategy} / {sampling}: p = {result.p_value:.4g} "
        f"({samples} samples, acceptance {result.acceptance_rate:.3f})"
    )
    return result


def test_dssd_sampling_is_exact(tiny_engines):
    """The default suite's representative cell (~25 s on an idle core): DSSD with an entropy test that
    drafts about half the time — chains of two drafts, acceptances, corrections and bonus tokens — under
    temperature and top-k. The whole matrix (both architectures, LayerSkip d=1 / d=3 / no bonus, DSSD
    always / never / entropy, four samplings) is `test_exactness_matrix` (`-m slow`)."""
    result = _check(tiny_engines, "neox", "dssd entropy", "T=0.7 top-k=4")
    assert 0.2 < result.acceptance_rate < 0.95  # both the accept and the reject paths are exercised
    assert result.p_value > exactness.ALPHA


@pytest.mark.parametrize("strategy", exactness.CONTROLS)
def test_negative_controls_are_rejected(tiny_engines, strategy):
    """The test has power: sampling from the drafter, or a wrong rejection step (resampling from p instead
    of the residual), is rejected already at a fifth of the samples."""
    assert _check(tiny_engines, "neox", strategy, "T=1.0", 1000).p_value < exactness.ALPHA


@pytest.mark.slow
@pytest.mark.parametrize("sampling", list(exactness.SAMPLINGS))
@pytest.mark.parametrize("strategy", exactness.EXACT + exactness.CONTROLS)
@pytest.mark.parametrize("model", exactness.MODELS)
def test_exactness_matrix(tiny_engines, model, strategy, sampling):
    result = _check(tiny_engines, model, strategy, sampling)
    if strategy in exactness.CONTROLS:
        assert result.p_value < exactness.ALPHA
    else:
        assert result.p_value > exactness.ALPHA
