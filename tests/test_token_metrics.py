"""Per-token metrics on a tiny random GPT-NeoX: correctness and metric values against an independent
computation, metric directions, and the AUROC table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data.shards import ShardReader, ShardWriter
from pipeline.exits.confidence import METRICS, get_metric
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.separation import auroc
from pipeline.exits.token_metrics import auroc_table, best_metric_per_head, compute_token_metrics, wide
from tests.conftest import tiny_gpt_neox

LAYERS = [0, 1, 2]
ALL_METRICS = list(METRICS)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    model = tiny_gpt_neox(num_layers=4, d_model=32, vocab=128, seed=0)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (3, 40))
    with torch.no_grad():
        hidden_states = model(input_ids=ids, output_hidden_states=True).hidden_states
    slots = torch.stack([hidden_states[layer + 1] for layer in LAYERS] + [hidden_states[-1]], dim=2).flatten(
        0, 1
    )
    directory = tmp_path_factory.mktemp("shards") / "validation"
    writer = ShardWriter(directory, n_slots=len(LAYERS) + 1, d_model=32, shard_tokens=50)  # several shards
    writer.add(slots, ids.flatten())
    writer.close()
    # The logit lens (heads = the backbone's own unembedding): some heads agree with the full model, some not.
    heads = EarlyExitHeads.from_backbone(model, LAYERS, init="unembedding")
    return model, heads, ShardReader(directory), slots


def test_correctness_and_metrics_match_independent_computation(tiny_setup):
    model, heads, reader, slots = tiny_setup
    table = compute_token_metrics(reader, heads, model, ALL_METRICS, batch_size=37)  # ragged batches
    n = len(reader)
    assert len(table) == n * len(LAYERS)
    assert list(table.columns[:4]) == ["token", "head", "layer", "correct"]
    # Independent path: the stored values are fp16, so round the same way; then one big forward, no batching.
    stored = slots.to(torch.float16).float()
    with torch.no_grad():
        teacher = model.get_output_embeddings()(stored[:, -1]).argmax(-1)
        correct = wide(table, "correct")
        for k, layer in enumerate(LAYERS):
            logits = heads(k, stored[:, k])
            np.testing.assert_array_equal(correct[:, k], (logits.argmax(-1) == teacher).numpy())
            rows = table[table["head"] == k]
            assert (rows["layer"] == layer).all()
            np.testing.assert_array_equal(rows["token"].to_numpy(), np.arange(n))
            for name in ("entropy", "max_prob", "prob_margin", "logit_margin"):
                np.testing.assert_allclose(
                    rows[name].to_numpy(), get_metric(name)(logits).numpy(), rtol=1e-5, atol=1e-6
                )
            if k == 0:
                assert rows["saturation"].isna().all()  # no previous head input at the first head
            else:
                expected = torch.nn.functional.cosine_similarity(stored[:, k], stored[:, k - 1], dim=-1)
                np.testing.assert_allclose(
                    rows["saturation"].to_numpy(), expected.numpy(), rtol=1e-5, atol=1e-6
                )
    assert 0 < correct.mean() < 1  # both classes present, so AUROCs are defined


def test_subset_of_tokens_in_given_order(tiny_setup):
    model, heads, reader, _ = tiny_setup
    idx = np.array([100, 3, 57, 3])
    table = compute_token_metrics(reader, heads, model.get_output_embeddings(), ["entropy"], indices=idx)
    full = compute_token_metrics(reader, heads, model, ["entropy"])
    assert wide(table, "entropy").shape == (4, len(LAYERS))  # one row per requested token, duplicates kept
    np.testing.assert_allclose(
        table[table["head"] == 1]["entropy"].to_numpy(),
        full[full["head"] == 1].set_index("token").loc[idx, "entropy"].to_numpy(),
    )


def test_mismatched_heads_and_shards_fail(tiny_setup):
    model, _, reader, _ = tiny_setup
    two_heads = EarlyExitHeads.from_backbone(model, [0, 1])
    with pytest.raises(ValueError, match="different head layers"):
        compute_token_metrics(reader, two_heads, model, ["entropy"])


def test_auroc_table_and_winner(tiny_setup):
    model, heads, reader, _ = tiny_setup
    table = compute_token_metrics(reader, heads, model, ALL_METRICS)
    aucs = auroc_table(table, ALL_METRICS)
    assert len(aucs) == len(LAYERS) * len(ALL_METRICS)
    assert {"head", "layer", "metric", "auroc", "aurc", "accuracy", "n", "best"} <= set(aucs.columns)
    # AUROC of the confidence score, i.e. with the metric's direction applied (entropy: lower = confident).
    rows = table[table["head"] == 1]
    ent = aucs[(aucs["head"] == 1) & (aucs["metric"] == "entropy")]["auroc"].item()
    assert ent == pytest.approx(auroc(-rows["entropy"].to_numpy(), rows["correct"].to_numpy()))
    sat0 = aucs[(aucs["head"] == 0) & (aucs["metric"] == "saturation")]
    assert np.isnan(sat0["auroc"].item()) and sat0["n"].item() == 0
    winners = best_metric_per_head(aucs)
    assert winners["head"].tolist() == [0, 1, 2]
    for _, w in winners.iterrows():
        assert w["auroc"] == aucs[aucs["head"] == w["head"]]["auroc"].max()


def test_auroc_table_known_winner():
    rng = np.random.default_rng(0)
    correct = rng.uniform(size=4000) < 0.5
    informative = np.where(
        correct, rng.normal(0.0, 1.0, 4000), rng.normal(2.0, 1.0, 4000)
    )  # low when correct
    table = pd.DataFrame(
        {
            "token": np.arange(4000),
            "head": 0,
            "layer": 3,
            "correct": correct,
            "entropy": informative,
            "max_prob": rng.uniform(size=4000),
        }
    )
    aucs = auroc_table(table, ["entropy", "max_prob"])
    assert best_metric_per_head(aucs)["metric"].tolist() == ["entropy"]
    assert aucs.set_index("metric").loc["entropy", "auroc"] > 0.85
    assert abs(aucs.set_index("metric").loc["max_prob", "auroc"] - 0.5) < 0.05


def test_metric_directions_on_peaked_vs_flat_logits():
    peaked = torch.tensor([[8.0, 0.0, 0.0, 0.0, 0.0]])
    flat = torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.6]])
    for name, metric in METRICS.items():
        if metric.needs_hidden:
            continue
        v_peaked, v_flat = metric(peaked), metric(flat)
        assert metric.confidence(v_peaked) > metric.confidence(v_flat), name
        # A threshold between the two admits the peaked token and not the flat one.
        mid = float((v_peaked + v_flat) / 2)
        assert bool(metric.is_confident(v_peaked, mid)) and not bool(metric.is_confident(v_flat, mid)), name
    assert METRICS["entropy"].lower_is_confident
    assert not any(
        METRICS[m].lower_is_confident for m in ("max_prob", "prob_margin", "logit_margin", "saturation")
    )
    # Saturation: an unchanged residual stream is more confident than one that turned around.
    h = torch.tensor([[1.0, 0.0]])
    sat = METRICS["saturation"]
    assert sat.confidence(sat(None, h, h)) > sat.confidence(sat(None, h, -h))
