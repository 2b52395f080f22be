"""Cheap confidence (issue 14): vocabulary-pruned views of the heads, their signals, cost, calibration and use in
the engine (pipeline/exits/vocab_pruning.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.data.shards import ShardWriter
from pipeline.engine import DSSD, EarlyExit, Engine, Greedy
from pipeline.exits.confidence import entropy, get_metric
from pipeline.exits.cost import CostModel, exit_head_evals
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ALWAYS, FULL, ExitPolicy, head_inputs_of
from pipeline.exits.thresholds import ExitThresholds
from pipeline.exits.vocab_pruning import (
    CandidateSet,
    PrunedHeads,
    parse_signal,
    pruned_signal_name,
    pruned_sizes,
    rank_tokens,
    resolve_signal,
    vocab_share,
)
from pipeline.orchestration.validation import ConfigError
from pipeline.stages import calibrate as calibrate_stage
from pipeline.stages import metrics as metrics_stage
from tests.conftest import tiny_gpt_neox
from tests.test_stages_metrics_calibrate import LAYERS, context, make_cfg, upstream  # noqa: F401 (fixture)

VOCAB = 128


@pytest.fixture(scope="module")
def model_and_heads():
    model = tiny_gpt_neox(num_layers=4, d_model=32, vocab=VOCAB, seed=0)
    heads = EarlyExitHeads.from_backbone(model, LAYERS, head_type="mlp", seed=0).eval()
    with torch.no_grad():  # an MLP head that is not the identity, so the view must run it
        for head in heads.heads:
            head.mlp[2].weight.normal_(std=0.05)
    return model, heads


def candidates(k: int, seed: int = 0) -> CandidateSet:
    ids = np.random.default_rng(seed).permutation(VOCAB)[:k]
    return CandidateSet(tuple(int(i) for i in ids), VOCAB, "test")


# --- the view ---------------------------------------------------------------------------------------------------


def test_view_equals_the_full_head_on_the_candidates_and_is_minus_inf_elsewhere(model_and_heads):
    _, heads = model_and_heads
    cands = candidates(24)
    view = PrunedHeads(heads, cands)
    ids = torch.tensor(cands.token_ids)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[ids] = False
    hidden = torch.randn(50, 32)
    with torch.no_grad():
        for k in range(len(heads)):
            full, pruned = heads(k, hidden), view(k, hidden)
            assert pruned.shape == full.shape
            torch.testing.assert_close(pruned[:, ids], full[:, ids], rtol=1e-5, atol=1e-5)
            assert torch.isneginf(pruned[:, outside]).all()
            restricted = full.masked_fill(outside, float("-inf"))
            assert torch.equal(pruned.argmax(-1), restricted.argmax(-1))


def test_pruned_signals_are_metrics_on_the_view():
    metric = get_metric("logit_margin@top64")
    assert (metric.name, metric.candidates, metric.lower_is_confident) == ("logit_margin@top64", 64, False)
    assert parse_signal("entropy@top512") == ("entropy", 512) and parse_signal("entropy") == ("entropy", None)
    assert pruned_signal_name("prob_margin", 8) == "prob_margin@top8"
    for bad in ("saturation@top8", "logit_margin@top1", "logit_margin@topx", "bogus@top8"):
        with pytest.raises(KeyError):
            get_metric(bad)
    # Entropy over a view (-inf outside the set) is the entropy of the softmax over the candidates alone.
    logits = torch.randn(5, 40)
    masked = torch.full((5, VOCAB), float("-inf"))
    masked[:, :40] = logits
    torch.testing.assert_close(entropy(masked), entropy(logits))
    assert pruned_sizes([0.125, 0.03125, 0.03], 4096) == [123, 128, 512]


def test_token_ranking_counts_the_split_ties_by_id(tmp_path):
    tokens = torch.tensor([5, 3, 5, 7, 3, 5, 0, 9])
    writer = ShardWriter(tmp_path / "train", n_slots=2, d_model=4, shard_tokens=3)
    writer.add(torch.zeros(len(tokens), 2, 4), tokens)
    writer.close()
    ranking = rank_tokens(tmp_path / "train", 12)
    assert ranking.ranked_ids[:5] == (5, 3, 0, 7, 9) and ranking.counts[:3] == (3, 2, 1)
    top = ranking.top(2)
    assert top.token_ids == (5, 3) and top.cost_fraction == 2 / 12 and ranking.mass(2) == 5 / 8
    with pytest.raises(ValueError, match="vocabulary"):
        rank_tokens(tmp_path / "train", 8)  # token 9 does not fit


# --- policy, cost, thresholds -------------------------------------------------------------------------------------


def test_policy_needs_the_candidate_set_of_its_signal():
    with pytest.raises(ValueError, match="candidate set of 16"):
        ExitPolicy(LAYERS, (1.0, None, None), "logit_margin@top16")
    with pytest.raises(ValueError, match="no candidate set"):
        ExitPolicy(LAYERS, (1.0, None, None), "logit_margin", candidates(16))
    with pytest.raises(ValueError, match="candidate set of 16"):
        ExitPolicy(LAYERS, (1.0, None, None), "logit_margin@top16", candidates(8))
    assert ExitPolicy.disabled(LAYERS, "logit_margin@top16").enabled == []  # the full model needs no set
    policy = ExitPolicy(LAYERS, (1.0, None, 2.0), "logit_margin@top16", candidates(16))
    assert policy.head_cost == 16 / VOCAB and policy.describe()["candidates"] == 16
    assert ExitPolicy(LAYERS, (1.0, None, 2.0)).head_cost == 1.0


def test_cost_of_a_pruned_policy_counts_each_head_at_k_over_v():
    f = 16 / VOCAB
    policy = ExitPolicy(LAYERS, (1.0, None, 2.0), "logit_margin@top16", candidates(16))
    # Scoring (the cascade) pays the exiting head's full logits; the engine's drafts do not.
    np.testing.assert_allclose(exit_head_evals(policy), [f + 1, f + 1, 2 * f + 1, 2 * f + 1])
    np.testing.assert_allclose(exit_head_evals(policy, exit_logits=False), [f, f, 2 * f, 2 * f + 1])
    full = ExitPolicy(LAYERS, (1.0, None, 2.0), "logit_margin")
    np.testing.assert_array_equal(exit_head_evals(full), [1, 1, 2, 3])
    cost = CostModel(head=3.0)
    np.testing.assert_allclose(
        cost.exit_costs(policy, 4, exit_logits=False),
        np.array([1, 2, 3, 4]) + 3.0 * np.array([f, f, 2 * f, 2 * f + 1]),
    )


def test_thresholds_carry_the_candidate_set(tmp_path):
    cands = candidates(16)
    table = {"empirical": {"0.90": [1.5, None, 2.0]}}
    thresholds = ExitThresholds(
        "logit_margin@top16", False, LAYERS, [0.9], 0.05, True, table, candidates=cands
    )
    thresholds.save(tmp_path / "t.json")
    loaded = ExitThresholds.load(tmp_path / "t.json")
    assert loaded.candidates == cands
    assert loaded.for_eps("empirical", 0.9).candidates == cands
    with pytest.raises(ValueError, match="disagree"):
        ExitThresholds("logit_margin@top16", False, LAYERS, [0.9], 0.05, True, table)
    with pytest.raises(ValueError, match="disagree"):
        ExitThresholds("logit_margin", False, LAYERS, [0.9], 0.05, True, table, candidates=cands)


def test_cascade_decides_on_the_view_and_scores_the_full_head(model_and_heads):
    model, heads = model_and_heads
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        inputs = head_inputs_of(out.hidden_states, LAYERS)
        cands = candidates(32)
        margins = get_metric("logit_margin@top32")(PrunedHeads(heads, cands)(0, inputs[0]))
        policy = ExitPolicy(LAYERS, (float(margins.median()), None, None), "logit_margin@top32", cands)
        logits, exit_head = policy.cascade(heads, inputs, out.logits)
        exited = exit_head == 0
        assert torch.equal(exited, margins >= float(margins.median()))
        assert 0 < int(exited.sum()) < exited.numel() and bool((exit_head[~exited] == FULL).all())
        torch.testing.assert_close(logits[exited], heads(0, inputs[0][exited]))  # finite: a distribution
        assert torch.equal(logits[~exited], out.logits[~exited])


def test_engine_counts_a_pruned_head_at_k_over_v_and_emits_the_candidate_argmax(model_and_heads):
    model, heads = model_and_heads
    engine = Engine(model, heads)
    cands = candidates(32)
    prompt = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(2))
    never = ExitPolicy(LAYERS, (math.inf,) * 3, "logit_margin@top32", cands)
    result = engine.generate(prompt, EarlyExit(never), 6)
    s = result.stats
    s.check()
    assert s.head_evals == pytest.approx(5 * 3 * 32 / VOCAB)  # 5 steps after the prefill, 3 heads each
    assert result.tokens == engine.generate(prompt, Greedy(), 6).tokens
    full_cost = engine.cost.layer_equivalents(s.block_rows, s.head_evals + s.lm_head_rows)
    assert s.layer_equivalents == pytest.approx(full_cost)
    always = ExitPolicy(LAYERS, (ALWAYS, None, None), "logit_margin@top32", cands)
    # Lossy early exit emits the exiting head's own prediction (its full logits: one more head evaluation).
    lossy = engine.generate(prompt, EarlyExit(always), 6)
    assert lossy.tokens == engine.generate(prompt, EarlyExit(ExitPolicy.fixed_head(LAYERS, 0)), 6).tokens
    assert lossy.stats.head_evals == pytest.approx(5 * (32 / VOCAB + 1))
    # The step itself (DSSD's drafts) emits the best candidate, and verification keeps DSSD lossless.
    with torch.inference_mode():
        session = engine.session(prompt, 4)
        step = session.step(len(prompt), session.prefill(), always)
    assert step.head == 0 and step.token in cands.token_ids
    assert engine.generate(prompt, DSSD(always), 6).tokens == result.tokens


# --- the stages and a round trip --------------------------------------------------------------------------------


def test_metrics_stage_reports_pruned_signals_with_their_cost(upstream, tmp_path):  # noqa: F811
    cfg = make_cfg(metrics={"metrics": ["entropy", "saturation"], "pruned_vocab": [0.25, 0.0625]})
    out = metrics_stage.run(context(cfg, upstream, tmp_path / "metrics"))
    rows = {(r["confidence"], r["head"], r["metric"]): r["value"] for r in out.rows}
    full = rows[("entropy", 0, "cost_blocks")]
    assert full == pytest.approx(32 * VOCAB / (12 * 32**2)) and rows[("saturation", 1, "cost_blocks")] == 0
    for name, k in [("logit_margin@top32", 32), ("entropy@top8", 8)]:
        for head in range(len(LAYERS)):
            cost = rows[(name, head, "cost_blocks")]
            assert cost == pytest.approx(full * k / VOCAB) and cost <= full / 4
            assert 0 <= rows[(name, head, "auroc")] <= 1
    assert out.metrics["candidates/top32_train_mass"] > 32 / VOCAB  # the most frequent tokens, not any


def test_calibrate_with_a_pruned_signal_then_dssd_is_greedy(upstream, tmp_path):  # noqa: F811
    """The paper's signal (entropy) into thresholds.json, the improved DSSD's pruned one (as a share of the
    vocabulary) into dssd_thresholds.json with its candidate set, per-draft accuracy and exit sets; DSSD on
    the pruned thresholds, the paper's rule and the improved choice alike, reproduces greedy."""
    eps = [0.3, 0.6, 0.9]
    cfg = make_cfg(calibrate={"metric": "entropy", "dssd.metric": "logit_margin@top25%", "eps": eps})
    calibrate_stage.STAGE.validate(cfg)
    out_dir = tmp_path / "calibrate"
    out = calibrate_stage.run(context(cfg, upstream, out_dir))
    paper, thresholds = calibrate_stage.load_calibration(out_dir)
    assert paper.metric == "entropy" and paper.candidates is None and not paper.exit_sets
    assert thresholds.metric == "logit_margin@top32"  # 25% of 128 tokens
    ranking = rank_tokens(upstream["extract"] / "train", VOCAB)
    assert thresholds.candidates == ranking.top(32)
    assert thresholds.draft_accuracy is not None and thresholds.draft_accuracy.metric == thresholds.metric
    assert set(thresholds.exit_sets) == {"empirical", "ltt"}
    # Both signals' calibration rows, each labelled with its signal; the pruned one's policy table too.
    # The paper's rows carry no setting (what figures read), the improved DSSD's own signal's `setting=dssd`.
    labelled = {(r["confidence"], r["setting"], r["metric"]) for r in out.rows}
    for signal, setting in (("entropy", ""), ("logit_margin@top32", "dssd")):
        assert {(signal, setting, m) for m in ("threshold", "exit_frac", "accuracy", "coverage")} <= labelled
    assert {(c, s) for c, s, _ in labelled} == {("entropy", ""), ("logit_margin@top32", "dssd")}
    assert set(out.tables) == {"policy", "dssd_policy"}
    from pipeline.evaluation.decoding_tuning import improved_dssd
    from pipeline.models.backbone import load_from_stage_output

    model, _ = load_from_stage_output(
        upstream["backbone"], dtype="float32", device="cpu", with_tokenizer=False
    )
    engine = Engine(model, EarlyExitHeads.load(upstream["heads"], model))
    drafted = 0
    for seed in range(3):
        prompt = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(seed))
        greedy = engine.generate(prompt, Greedy(), 12).tokens
        for method in ("empirical", "ltt"):
            for e in eps:
                policy = thresholds.for_eps(method, e)
                choice = thresholds.exit_set(method, e)
                for strategy in (DSSD(policy), improved_dssd(policy, choice, thresholds.draft_accuracy)):
                    result = engine.generate(prompt, strategy, 12)
                    assert result.tokens == greedy, (method, e, seed, strategy)
                    drafted += result.stats.drafted
    assert drafted > 0  # the pruned gate did let drafts through: the round trip exercised it


def test_one_signal_for_both_gives_one_thresholds_file(upstream, tmp_path):  # noqa: F811
    cfg = make_cfg(
        calibrate={"metric": "logit_margin@top32", "dssd.metric": "logit_margin@top32", "eps": [0.6]}
    )
    out_dir = tmp_path / "calibrate"
    calibrate_stage.run(context(cfg, upstream, out_dir))
    assert not (out_dir / calibrate_stage.DSSD_THRESHOLDS_FILE).exists()
    paper, dssd = calibrate_stage.load_calibration(out_dir)
    assert paper is dssd and paper.exit_sets and paper.candidates.k == 32


def test_signal_shares_of_the_vocabulary():
    assert resolve_signal("logit_margin@top12.5%", 4096) == "logit_margin@top512"
    assert resolve_signal("entropy@top100%", 128) == "entropy@top128"
    assert resolve_signal("logit_margin@top512", 128) == "logit_margin@top512"  # a fixed K stays as given
    assert vocab_share("entropy") is None
    for bad in ("logit_margin@top0%", "logit_margin@top150%", "logit_margin@topx%"):
        with pytest.raises(KeyError, match="<P>%"):
            vocab_share(bad)
    with pytest.raises(ConfigError, match="vocabulary has 128"):
        calibrate_stage.signal_for_model("calibrate.dssd.metric", "logit_margin@top512", 128)
    # The config check accepts a share of a logit metric and names the problem otherwise.
    with pytest.raises(ConfigError, match="P <= 100"):
        calibrate_stage.STAGE.validate(make_cfg(calibrate={"dssd.metric": "logit_margin@top200%"}))
    with pytest.raises(ConfigError, match="hidden states"):
        calibrate_stage.STAGE.validate(make_cfg(calibrate={"dssd.metric": "saturation@top10%"}))
