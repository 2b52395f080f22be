"""The cost model: FLOP and latency layer-equivalents, counted by hand on small cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.engine import EarlyExit, Engine, Greedy, LayerSkip
from pipeline.exits.cost import CostModel, exit_depths, exit_head_evals, fill_costs, greedy_token_cost
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ExitPolicy
from tests.conftest import tiny_gpt_neox

L, HEADS = 4, [0, 1, 2]


@pytest.fixture(scope="module")
def engine(one_thread):
    model = tiny_gpt_neox(num_layers=L, vocab=96).requires_grad_(False)
    heads = EarlyExitHeads.from_backbone(model, HEADS, init="unembedding", seed=0)
    return Engine(model, heads, cost=CostModel(head=2.0, kv_only=0.5))


def test_fill_costs_by_hand():
    depths = np.array([4, 1, 1, 4])
    # lazy: each of the 4 blocks runs every position up to the last deep token.
    assert fill_costs(depths, 4, "lazy") == (16, 0)
    # copy: own blocks only (10), K/V written for the skipped ones (3 + 3).
    assert fill_costs(depths, 4, "copy") == (10, 6)
    # recompute: no cache, position p reruns positions 0..p through its own depth.
    assert fill_costs(depths, 4, "recompute") == (1 * 4 + 2 * 1 + 3 * 1 + 4 * 4, 0)
    full = np.full(5, 4)
    assert {fill_costs(full, 4, f)[0] for f in ("lazy", "copy")} == {20}
    assert fill_costs(full, 4, "recompute")[0] == 4 * (1 + 2 + 3 + 4 + 5)
    # Nothing after the last shallow tokens is ever filled lazily.
    assert fill_costs(np.array([4, 2, 2]), 4, "lazy") == (3 + 3 + 1 + 1, 0)
    with pytest.raises(ValueError, match="fill policy"):
        fill_costs(depths, 4, "magic")


def test_exit_and_oracle_costs_by_hand():
    cost = CostModel(head=2.0)
    policy = ExitPolicy([1, 2, 5], [1.0, None, 3.0])
    assert exit_depths(policy, 8).tolist() == [2, 3, 6, 8]
    # Heads evaluated on the way: enabled heads up to the exit; the full model adds its unembedding.
    assert exit_head_evals(policy).tolist() == [1, 1, 2, 3]
    assert cost.exit_costs(policy, 8).tolist() == [2 + 2.0, 3 + 2.0, 6 + 4.0, 8 + 6.0]
    assert cost.full_token(8) == 8 + 2.0
    oracle, cascade = cost.oracle_costs([0, None, 2], [1, 2, 5], 8)
    assert oracle == [2 + 2.0, 8 + 2.0, 6 + 2.0]
    assert cascade == [2 + 2.0, 8 + 4 * 2.0, 6 + 3 * 2.0]
    assert cost.layer_equivalents(10, 3, 4) == 10 + 6.0 + 0.25 * 4
    assert greedy_token_cost(6, 512, 50_304) == pytest.approx(6 + 512 * 50_304 / (12 * 512**2))
    assert CostModel.default(512, 50_304).head == pytest.approx(8.1875)


def test_layerskip_round_by_hand(engine):
    """One LayerSkip round with d = 2 at head 1 (block 1) of a 4-block model, after a 5-token prompt."""
    policy = ExitPolicy.fixed_head(HEADS, 1)
    sess = engine.session(torch.arange(5), max_new_tokens=8, extra_capacity=4)
    with torch.no_grad():
        token = sess.prefill()
        # Prefill: the prompt's last row (4 blocks, the unembedding) is the first token's cost.
        s = sess.stats
        assert (s.prefill_block_rows, s.block_rows, s.block_calls) == (16, 4, 4)
        assert (s.lm_head_rows, s.lm_head_calls) == (1, 1)
        first = sess.step(5, token, policy)
        second = sess.step(6, first.token, policy)
        assert first.head == second.head == 1
        # Verification: blocks 0-1 for the new row, blocks 2-3 for 3 pending rows, one unembedding call.
        final = sess.step(7, second.token, None, verify_from=5)
    assert len(final.final_tokens) == 3
    # Rows (FLOP): 4 + 2 + 2 + (1 + 1 + 3 + 3) = 16 blocks; 2 heads; 1 + 3 unembedded rows.
    assert (s.block_rows, s.head_evals, s.lm_head_rows) == (16, 2, 4)
    # Calls (latency): 4 + 2 + 2 + 4 = 12 block calls; 2 head calls; 2 unembedding calls.
    assert (s.block_calls, s.lm_head_calls) == (12, 2)
    assert s.layer_equivalents == 16 + 2.0 * (2 + 4)
    assert s.latency_equivalents == 12 + 2.0 * (2 + 2)


def test_generation_counts_calls(engine):
    prompt = torch.arange(7)
    greedy = engine.generate(prompt, Greedy(), 12).stats
    # Greedy: one row per call, so both measures are L + head per token.
    assert greedy.latency_equivalents_per_token == greedy.layer_equivalents_per_token == L + 2.0
    skip = engine.generate(prompt, LayerSkip(head=1, draft_length=2), 12).stats
    skip.check()
    exit_blocks = HEADS[1] + 1
    # Every draft makes exit_blocks block calls; every verification pass one call per block.
    assert skip.block_calls == L + skip.drafted * exit_blocks + skip.full_passes * L
    assert skip.lm_head_calls == 1 + skip.full_passes
    assert skip.latency_equivalents == pytest.approx(
        skip.block_calls + 2.0 * (skip.head_evals + skip.lm_head_calls)
    )
    assert skip.latency_equivalents < skip.layer_equivalents  # verification batches its rows
    record = skip.as_dict()
    assert record["latency_equivalents_per_token"] == skip.latency_equivalents_per_token
    assert record["block_calls"] == skip.block_calls
    # The copy fill writes K/V one layer, one row per call.
    copy = engine.generate(prompt, EarlyExit(ExitPolicy(HEADS, [10.0, None, None]), fill="copy"), 12).stats
    assert copy.exited > 0 and copy.kv_only_calls == copy.kv_only_rows == copy.exited * (L - 1)
    assert copy.latency_equivalents == pytest.approx(
        copy.block_calls + 2.0 * (copy.head_evals + copy.lm_head_calls) + 0.5 * copy.kv_only_calls
    )


def test_oracle_bound_uses_the_cost_model(engine):
    bound = engine.oracle_bound(torch.arange(6), 10)
    oracle, cascade = engine.cost.oracle_costs(bound.earliest_head, HEADS, L)
    assert bound.oracle_cost == oracle and bound.cascade_cost == cascade
    assert bound.full_cost == engine.cost.full_token(L)
