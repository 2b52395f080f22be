"""Token-level evaluation: the cascade, the KV fill accounting, and the three fill policies end to end."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluation.token_eval import evaluate_tokens
from pipeline.exits.confidence import get_metric
from pipeline.exits.cost import CostModel
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ExitPolicy, head_inputs_of
from tests.conftest import tiny_gpt_neox

LAYERS, HEADS = 4, [1, 2]


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt_neox(num_layers=LAYERS, vocab=96)
    heads = EarlyExitHeads.from_backbone(model, HEADS, init="random", seed=3)
    blocks = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(0))
    cost = CostModel.default(d_model=32, vocab_size=96)
    return model, heads, blocks, cost


def policy(thresholds) -> ExitPolicy:
    return ExitPolicy(HEADS, thresholds, "entropy")


def cascade_logits(hidden_states, final_logits, heads, policy):
    return policy.cascade(heads, head_inputs_of(hidden_states, policy.layers), final_logits)


def test_cascade_takes_the_first_confident_head(setup):
    model, heads, blocks, cost = setup
    with torch.no_grad():
        out = model(blocks, output_hidden_states=True)
        head0 = heads(0, out.hidden_states[HEADS[0] + 1])
    same, exits = cascade_logits(out.hidden_states, out.logits, heads, policy([None, None]))
    assert same is out.logits and bool((exits == -1).all())
    forced, exits = cascade_logits(out.hidden_states, out.logits, heads, policy([math.inf, math.inf]))
    assert torch.equal(forced, head0) and bool((exits == 0).all())
    # A threshold between the entropies: exactly the positions under it exit at head 0.
    entropy = get_metric("entropy")(head0)
    cut = float(entropy.median())
    mixed, exits = cascade_logits(out.hidden_states, out.logits, heads, policy([cut, None]))
    assert torch.equal(exits == 0, entropy <= cut)
    assert torch.equal(mixed[entropy > cut], out.logits[entropy > cut])


def test_full_model_under_every_fill_policy(setup):
    model, heads, blocks, cost = setup
    results = evaluate_tokens(model, blocks, heads, policy([None, None]), cost, batch_size=2)
    with torch.no_grad():
        logits = model(blocks).logits[:, :-1]
    ppl = math.exp(
        float(torch.nn.functional.cross_entropy(logits.reshape(-1, 96), blocks[:, 1:].reshape(-1)))
    )
    seq_len = blocks.shape[1]
    for fill in ("lazy", "copy"):
        assert results[fill].layer_equivalents_per_token == pytest.approx(LAYERS + cost.head)
        assert results[fill].compute_fraction == pytest.approx(1.0)
    # Without cache reuse, position p recomputes p + 1 rows per block: L (T + 1) / 2 blocks per token on average.
    assert results["recompute"].layer_equivalents_per_token == pytest.approx(
        LAYERS * (seq_len + 1) / 2 + cost.head
    )
    for fill, res in results.items():
        assert res.agreement == 1.0, fill
        assert res.ppl == pytest.approx(ppl, rel=1e-4), fill
        assert res.exit_fractions == [0.0, 0.0]
        assert res.tokens == blocks.shape[0] * (blocks.shape[1] - 1)


def test_forced_exit_costs_and_predictions(setup):
    model, heads, blocks, cost = setup
    results = evaluate_tokens(model, blocks, heads, policy([math.inf, None]), cost, batch_size=2)
    own = HEADS[0] + 1 + cost.head
    assert results["lazy"].layer_equivalents_per_token == pytest.approx(own)
    depth, seq_len = HEADS[0] + 1, blocks.shape[1]
    assert results["recompute"].layer_equivalents_per_token == pytest.approx(
        depth * (seq_len + 1) / 2 + cost.head
    )
    assert results["copy"].layer_equivalents_per_token == pytest.approx(
        own + cost.kv_only * (LAYERS - HEADS[0] - 1)
    )
    # Head 0 reads blocks every position ran exactly, so copying K/V for deeper blocks changes nothing here.
    assert results["copy"].ppl == pytest.approx(results["lazy"].ppl, rel=1e-4)
    assert results["copy"].agreement == results["lazy"].agreement < 1.0
    for res in results.values():
        assert res.exit_fractions == [1.0, 0.0]


def test_partial_exits_order_the_fill_policies(setup):
    model, heads, blocks, cost = setup
    with torch.no_grad():
        out = model(blocks, output_hidden_states=True)
        cut = float(get_metric("entropy")(heads(0, out.hidden_states[HEADS[0] + 1])).median())
    results = evaluate_tokens(model, blocks, heads, policy([cut, None]), cost, batch_size=2)
    lazy, rec = results["lazy"], results["recompute"]
    assert 0 < lazy.exit_fractions[0] < 1
    # Exact-state policies give the same predictions; recomputation pays at least lazy fill's price.
    assert (lazy.agreement, lazy.ppl) == (rec.agreement, rec.ppl)
    assert rec.layer_equivalents_per_token >= lazy.layer_equivalents_per_token
    assert lazy.layer_equivalents_per_token <= LAYERS + cost.head * 2
