"""The exit policy: its vectorised and per-token faces agree token for token, saturation at head 0, checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.engine import EarlyExit, Engine
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ALWAYS, FULL, ExitPolicy, head_inputs_of
from tests.conftest import tiny_gpt_neox

LAYERS, HEADS, VOCAB, SEQ = 4, [0, 1, 2], 96, 32


@pytest.fixture(scope="module")
def setup(one_thread):
    model = tiny_gpt_neox(num_layers=LAYERS, vocab=VOCAB).requires_grad_(False)
    heads = EarlyExitHeads.from_backbone(model, HEADS, init="unembedding", seed=0)
    tokens = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(tokens.view(1, -1), output_hidden_states=True)
    return model, heads, tokens, out


def _stored_values(policy: ExitPolicy, heads, out) -> np.ndarray:
    """[T, n_heads] metric values of every head, as the metrics stage stores them."""
    inputs = [h[0] for h in head_inputs_of(out.hidden_states, policy.layers)]
    with torch.no_grad():
        columns = [
            policy.head_values(k, heads(k, inputs[k]), inputs[k], inputs[k - 1] if k else None)
            for k in range(policy.n_heads)
        ]
    return torch.stack(columns, 1).double().numpy()


def _cut_between_values(values: np.ndarray, q: float) -> float:
    """A threshold halfway between two neighbouring values, so float noise between the engine's block-wise
    numerics and the full forward cannot flip a decision."""
    finite = np.unique(values[np.isfinite(values)])
    if not finite.size:  # saturation at head 0: a threshold that would take every defined value
        return -1.0
    i = int(q * (len(finite) - 1))
    return float((finite[i] + finite[i + 1]) / 2)


@pytest.mark.parametrize("metric", ["entropy", "max_prob", "saturation"])
@pytest.mark.parametrize("fill", ["lazy", "recompute"])
def test_vectorised_and_engine_decisions_agree(setup, metric, fill):
    model, heads, tokens, out = setup
    probe = ExitPolicy(HEADS, [None] * len(HEADS), metric)
    values = _stored_values(probe, heads, out)
    # Head 1 disabled: a disabled head is skipped by every face, and the cascade continues past it.
    q = 0.6 if probe.metric_fn.lower_is_confident else 0.4
    thresholds = [_cut_between_values(values[:, k], q) if k != 1 else None for k in range(len(HEADS))]
    policy = probe.with_thresholds(thresholds)

    decided = policy.decide(values)
    logits, cascaded = policy.cascade(heads, head_inputs_of(out.hidden_states, policy.layers), out.logits)
    run = Engine(model, heads).teacher_force(tokens, EarlyExit(policy, fill=fill))

    engine_exits = run.exit_head.numpy()
    assert decided.tolist() == cascaded[0].tolist() == engine_exits.tolist()
    assert 0 < (engine_exits != FULL).sum() < SEQ  # both outcomes occur
    assert not (engine_exits == 1).any()
    torch.testing.assert_close(run.logits, logits[0], atol=1e-4, rtol=1e-4)
    run.stats.check()
    assert run.stats.exits_per_head == [int((engine_exits == k).sum()) for k in range(len(HEADS))]


def test_saturation_never_exits_at_head_zero(setup):
    model, heads, tokens, out = setup
    # cosine >= -1 holds for every defined value: only NaN (head 0) can refuse.
    policy = ExitPolicy(HEADS, [-1.0, None, None], "saturation")
    values = _stored_values(policy, heads, out)
    assert np.isnan(values[:, 0]).all() and np.isfinite(values[:, 1:]).all()
    assert (policy.decide(values) == FULL).all()
    run = Engine(model, heads).teacher_force(tokens, EarlyExit(policy))
    assert run.stats.exited == 0 and run.stats.head_evals == SEQ
    # From head 1 on, saturation is defined, and the same threshold takes every token there.
    policy = policy.with_thresholds([-1.0, -1.0, None])
    assert (policy.decide(_stored_values(policy, heads, out)) == 1).all()
    assert (Engine(model, heads).teacher_force(tokens, EarlyExit(policy)).exit_head == 1).all()


def test_decide_by_hand():
    values = np.array([[0.9, 0.2], [0.1, 0.8], [0.1, 0.1], [np.nan, 0.95]])
    policy = ExitPolicy([3, 7], [0.5, 0.7], "max_prob")
    assert policy.decide(values).tolist() == [0, 1, FULL, 1]
    assert policy.with_thresholds([None, 0.7]).decide(values).tolist() == [FULL, 1, FULL, 1]
    assert policy.with_thresholds([None, ALWAYS]).decide(values).tolist() == [1, 1, 1, 1]
    # Lower is confident for entropy: the same values read the other way round.
    assert ExitPolicy([3, 7], [0.5, None], "entropy").decide(values).tolist() == [FULL, 0, 0, FULL]
    assert ExitPolicy.disabled([3, 7]).enabled == [] and ExitPolicy.fixed_head([3, 7], 1).enabled == [1]
    assert ExitPolicy.fixed_head([3, 7], 1).evaluated_heads == {7: 1}


def test_per_token_form_by_hand():
    policy = ExitPolicy([0, 1], [0.5, ALWAYS], "max_prob")
    sure, unsure = torch.tensor([[[10.0, 0.0, 0.0]]]), torch.tensor([[[0.0, 0.0, 0.0]]])
    assert policy.exits(0, sure) and not policy.exits(0, unsure)
    assert policy.exits(1, unsure)  # ALWAYS: no confidence test
    assert not policy.with_thresholds([None, None]).exits(0, sure)


def test_invalid_policies_are_refused():
    with pytest.raises(ValueError, match="thresholds"):
        ExitPolicy([0, 1], [1.0])
    with pytest.raises(ValueError, match="increasing"):
        ExitPolicy([2, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="threshold of head 0"):
        ExitPolicy([0], [math.nan])
    with pytest.raises(KeyError, match="unknown confidence metric"):
        ExitPolicy([0], [1.0], "vibes")
    with pytest.raises(ValueError, match="out of range"):
        ExitPolicy.fixed_head([0, 1], 2)
    with pytest.raises(TypeError, match="ExitPolicy"):
        EarlyExit([1.0, None])
