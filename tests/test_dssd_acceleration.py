"""DSSD beyond the paper: the per-draft accuracy curve, the adaptive draft length (γ) and the cost-aware exit set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.engine import DSSD, Engine, PerfectGate
from pipeline.exits.calibration import add_dssd_choices, calibrate
from pipeline.exits.confidence import entropy
from pipeline.exits.cost import CostModel
from pipeline.exits.draft_stop import DraftAccuracy, fit_draft_accuracy, pool_adjacent_violators
from pipeline.exits.exit_set import DraftCosts, ExitSetChoice, choose_exit_set, exits_at, simulate_dssd
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ExitPolicy
from pipeline.exits.thresholds import ExitThresholds

VOCAB = 256
HEAD_LAYERS = [0, 1, 2]
NEW_TOKENS = 20


# -- the per-draft accuracy curve -------------------------------------------------------------------------------


def test_pool_adjacent_violators_pools_each_violation_into_its_weighted_mean():
    assert pool_adjacent_violators([0.2, 0.5, 0.4, 0.9], [1, 1, 1, 1]).tolist() == pytest.approx(
        [0.2, 0.45, 0.45, 0.9]
    )
    # Weights: the heavier bin dominates the pooled value; a run of violations pools into one block.
    assert pool_adjacent_violators([0.9, 0.1, 0.5], [3, 1, 4]).tolist() == pytest.approx([0.6] * 3)
    assert pool_adjacent_violators([0.1, 0.2, 0.3], [5, 1, 1]).tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_draft_accuracy_matches_hand_made_data():
    # Entropy (lower = confident): head 0 is right exactly when its entropy is below 1; head 1 always right.
    values = np.array([[0.1, 5.0], [0.2, 5.0], [0.3, 5.0], [0.4, 5.0], [2.0, 5.0], [3.0, 5.0]])
    correct = np.array([[True, True]] * 4 + [[False, True]] * 2)
    curve = fit_draft_accuracy(values, correct, "entropy", n_bins=2)  # cut at the median, 0.4
    assert curve(0, 0.1) == 1.0 and curve(0, 0.35) == 1.0
    assert curve(0, 3.0) == 0.0 and curve(0, 50.0) == 0.0
    assert curve(0, float("nan")) == 0.0  # undefined: the least confident bin
    assert curve(1, 5.0) == 1.0 and curve(1, 0.0) == 1.0
    # The vectorised lookup agrees with the per-draft one.
    probe = np.array([0.05, 0.3, 1.0, 2.5, np.nan])
    assert curve.curve(0, probe).tolist() == [curve(0, v) for v in probe]


def test_draft_accuracy_is_monotone_in_confidence_on_noisy_data():
    rng = np.random.default_rng(0)
    margin = rng.uniform(0, 10, size=(5000, 2))  # logit margin: higher = confident
    correct = rng.random((5000, 2)) < 1 / (1 + np.exp(-(margin - 5)))  # noisy, increasing in the margin
    curve = fit_draft_accuracy(margin, correct, "logit_margin", n_bins=40)
    for k in range(2):
        acc = np.asarray(curve.accuracy[k])
        assert (np.diff(acc) >= 0).all() and len(acc) > 5
        assert acc[0] < 0.2 and acc[-1] > 0.8
        grid = curve.curve(k, np.linspace(0, 10, 101))
        assert (np.diff(grid) >= 0).all()


def test_a_decreasing_curve_is_refused():
    with pytest.raises(ValueError, match="not decrease"):
        DraftAccuracy("entropy", ((1.0,),), ((0.9, 0.1),))


# -- the simulation and the exit-set choice -------------------------------------------------------------------


COSTS = DraftCosts(layers=(0, 2), num_layers=4, unembedding=2.0, consult=(2.0, 2.0))


def test_simulated_rounds_price_what_the_engine_counts():
    """Six tokens exiting at head 0 (block 0), the third one wrong, no cap: round 1 drafts all six, keeps
    two and emits a correction; round 2 starts at token 3, drafts three and keeps them plus a bonus."""
    exit_head = np.zeros(6, dtype=int)
    correct = np.array([True, True, False, True, True, True])
    sim = simulate_dssd(exit_head, correct, np.ones(6), [0], COSTS, max_draft=16)
    # Latency: per draft block 0 + one head check; per verification 4 blocks + unembedding + the check of
    # the token that found no confident head. FLOPs: every draft row also runs all 4 blocks + the unembedding.
    assert sim.tokens == 7
    assert sim.latency_equiv_per_token == pytest.approx(((6 * 3 + 6 + 2) + (3 * 3 + 6 + 2)) / 7)
    assert sim.layer_equiv_per_token == pytest.approx(((7 * 6 + 6 * 2 + 2) + (4 * 6 + 3 * 2 + 2)) / 7)
    # With no consulted head DSSD is greedy decoding: L + the unembedding per token in both measures.
    greedy = simulate_dssd(np.full(6, -1), correct, np.ones(6), [], COSTS, max_draft=16)
    assert greedy.latency_equiv_per_token == greedy.layer_equiv_per_token == COSTS.greedy


def test_gamma_stops_the_chain_and_the_cap_skips_the_verifying_check():
    exit_head = np.zeros(8, dtype=int)
    # Accuracy 0.5 per draft, γ = 0.3: two drafts (0.25 < 0.3 after the second), then a forced verification.
    sim = simulate_dssd(
        exit_head, np.ones(8, bool), np.full(8, 0.5), [0], COSTS, max_draft=16, min_chain_prob=0.3
    )
    assert sim.tokens == 9  # rounds of 2 drafts + bonus from tokens 0, 3, 6 (the last one runs past the end)
    assert sim.latency_equiv_per_token == pytest.approx(3 * (2 * 3 + 6) / 9)


def test_exit_set_choice_picks_the_obviously_cheapest_subset():
    """Both heads exit on every token; head 0 is always wrong, head 1 always right: consulting head 1 alone
    is the cheapest (head 0 first would draft only rejected tokens)."""
    n = 400
    values = np.zeros((n, 2))
    correct = np.column_stack([np.zeros(n, bool), np.ones(n, bool)])
    policy = ExitPolicy((0, 2), (1.0, 1.0), "entropy")
    accuracy = fit_draft_accuracy(values, correct, "entropy")
    choice = choose_exit_set(policy, values, correct, accuracy, COSTS, 4, gammas=[0.0, 0.5], flop_budget=None)
    assert choice.heads == (1,)
    # Four drafts at block 2 (3 blocks + a check each) and a forced verification per five tokens.
    assert choice.latency_equiv_per_token == pytest.approx((4 * 5 + 6) / 5)
    # When the heads swap roles, head 0 alone wins.
    swapped = correct[:, ::-1]
    swapped_accuracy = fit_draft_accuracy(values, swapped, "entropy")
    assert choose_exit_set(policy, values, swapped, swapped_accuracy, COSTS, 4, flop_budget=None).heads == (
        0,
    )
    # Every draft row is also verified and every draft pays a check: a FLOP budget of 1.15 × greedy's rules
    # out drafting with checks this expensive; the empty set (greedy decoding) remains.
    assert choose_exit_set(policy, values, correct, accuracy, COSTS, 4, flop_budget=1.15).heads == ()


def test_thresholds_round_trip_the_dssd_choices(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.uniform(0, 3, size=(2000, 3))
    correct = rng.random((2000, 3)) < np.exp(-values)
    thresholds = calibrate(values, correct, "entropy", [0.6, 0.8], methods=["empirical"], layers=[0, 1, 2])
    add_dssd_choices(thresholds, values, correct, CostModel(head=2.0), num_layers=4, max_draft=8)
    assert set(thresholds.exit_sets["empirical"]) == {"0.60", "0.80"}
    thresholds.save(tmp_path / "t.json")
    loaded = ExitThresholds.load(tmp_path / "t.json")
    assert loaded.draft_accuracy == thresholds.draft_accuracy
    assert loaded.exit_set("empirical", 0.8) == thresholds.exit_set("empirical", 0.8)
    assert isinstance(loaded.exit_set("empirical", 0.6), ExitSetChoice)
    with pytest.raises(KeyError, match="rerun the calibrate stage"):
        loaded.exit_set("ltt", 0.8)


# -- the adaptive stop in the engine: lossless -------------------------------------------------------------------


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4)
    if kind == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, intermediate_size=256, initializer_range=0.3))
    else:
        model = LlamaForCausalLM(
            LlamaConfig(**common, num_key_value_heads=2, intermediate_size=128, initializer_range=0.3)
        )
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _engine(kind: str) -> tuple[torch.nn.Module, EarlyExitHeads, Engine]:
    """A random model of `kind`, logit-lens heads at HEAD_LAYERS and the engine over both."""
    model = _model(kind)
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init="unembedding", seed=0)
    return model, heads, Engine(model, heads)


def _greedy(model, prompt: torch.Tensor) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            prompt.view(1, -1),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=0,
            attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
        )
    return out[0, prompt.numel() :].tolist()


def _greedy_n(model, prompt: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            prompt.view(1, -1),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=0,
            attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
        )
    return out[0, prompt.numel() :].tolist()


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_adaptive_draft_length_is_lossless(kind, one_thread):
    model, heads, engine = _engine(kind)
    gen = torch.Generator().manual_seed(7)
    prompts = [
        torch.randint(0, VOCAB, (int(n),), generator=gen) for n in torch.randint(1, 12, (8,), generator=gen)
    ]
    # Calibration-like data from teacher-forced prompts: each head's entropy and agreement with the model.
    with torch.no_grad():
        values, correct = [], []
        for prompt in prompts[:4]:
            out = model(prompt.view(1, -1), output_hidden_states=True)
            final = out.logits[0].argmax(-1)
            logits = [heads(k, out.hidden_states[layer + 1][0]) for k, layer in enumerate(HEAD_LAYERS)]
            values.append(torch.stack([entropy(x) for x in logits], 1))
            correct.append(torch.stack([x.argmax(-1) == final for x in logits], 1))
    values, correct = torch.cat(values).numpy(), torch.cat(correct).numpy()
    accuracy = fit_draft_accuracy(values, correct, "entropy", n_bins=4)
    policy = ExitPolicy(HEAD_LAYERS, [float(np.quantile(values[:, k], 0.7)) for k in range(3)], "entropy")
    halves = DraftAccuracy("entropy", ((),) * 3, ((0.5,),) * 3)  # every draft: accepted with probability 0.5
    references = [_greedy(model, prompt) for prompt in prompts]
    drafted = {}
    for name, strategy in {
        "paper": DSSD(policy, max_draft=16),
        "gamma=0.3": DSSD(policy, 16, min_chain_prob=0.3, draft_accuracy=accuracy),
        "gamma=0.8": DSSD(policy, 16, min_chain_prob=0.8, draft_accuracy=accuracy),
        "halves": DSSD(policy, 16, min_chain_prob=0.3, draft_accuracy=halves),
        "subset": DSSD(policy.with_thresholds([None, policy.thresholds[1], None]), 4, 0.5, accuracy),
    }.items():
        total = {"drafted": 0, "verifications": 0}
        for prompt, reference in zip(prompts, references, strict=True):
            result = engine.generate(prompt, strategy, NEW_TOKENS)
            assert result.tokens == reference, f"{kind} {name} on {prompt.tolist()}"
            result.stats.check()
            total["drafted"] += result.stats.drafted
            total["verifications"] += result.stats.verifications
            if name == "halves":  # 0.5 after one draft, 0.25 < 0.3 after two: never more than two per round
                assert result.stats.drafted <= 2 * result.stats.verifications
            if name == "subset":
                assert result.stats.drafts_per_head[0] == result.stats.drafts_per_head[2] == 0
        drafted[name] = total
    assert drafted["paper"]["drafted"] > 0
    assert drafted["gamma=0.8"]["drafted"] <= drafted["gamma=0.3"]["drafted"] <= drafted["paper"]["drafted"]


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_the_perfect_gate_drafts_exactly_where_a_head_is_right(kind, one_thread):
    model, heads, engine = _engine(kind)
    gen = torch.Generator().manual_seed(11)
    for n in torch.randint(1, 12, (6,), generator=gen).tolist():
        prompt = torch.randint(0, VOCAB, (n,), generator=gen)
        bound = engine.oracle_bound(prompt, NEW_TOKENS)
        for cap in (1, 16):
            result = engine.generate(prompt, PerfectGate(bound.earliest_head, max_draft=cap), NEW_TOKENS)
            assert result.tokens == _greedy(model, prompt) == bound.tokens
            stats = result.stats
            stats.check()
            # Every draft is right; a token some head gets right is drafted unless a cap forced a verification.
            assert stats.accepted == stats.drafted and stats.corrections == 0
            right = bound.earliest_head[1:]  # token 0 comes from the prefill
            assert stats.drafted <= sum(h is not None for h in right)
            if cap == 16:
                for k in range(len(HEAD_LAYERS)):
                    drafted_here = stats.drafts_per_head[k]
                    assert drafted_here <= sum(h == k for h in right)
    with pytest.raises(ValueError, match="outside the engine's 3 heads"):
        engine.generate(prompt, PerfectGate([0, 5]), 2)


def test_gamma_needs_the_accuracy_curve_of_the_policys_metric():
    policy = ExitPolicy(HEAD_LAYERS, [1.0, 1.0, 1.0], "entropy")
    with pytest.raises(ValueError, match="needs draft_accuracy"):
        DSSD(policy, 16, min_chain_prob=0.5)
    with pytest.raises(ValueError, match="same metric"):
        DSSD(policy, 16, 0.5, DraftAccuracy("logit_margin", ((),) * 3, ((0.5,),) * 3))


# -- the decoding harness: the three DSSD rows and the extended tuning grid ---------------------------------------


def test_dssd_grid_adds_gamma_and_the_calibrated_exit_set():
    from pipeline.evaluation.decoding_harness import DecodingPlan
    from pipeline.evaluation.decoding_tuning import dssd_grid

    accuracy = DraftAccuracy("entropy", ((),) * 3, ((0.7,),) * 3)
    policies = {0.8: ExitPolicy((0, 1, 2), (1.0, None, 2.0))}
    stored = ExitSetChoice((0,), 0.4, 8, 5.0, 6.0)
    plan = DecodingPlan(
        max_new_tokens=4,
        policies=policies,
        layerskip_d=[1],
        dssd_max_draft=[1, 4],
        dssd_gamma=[0.0, 0.5],
        exit_sets={0.8: stored},
        draft_accuracy=accuracy,
    )
    seen = [
        (s.strategy.policy.enabled, s.strategy.max_draft, s.strategy.min_chain_prob) for s in dssd_grid(plan)
    ]
    # Each head set: cap 1 (γ cannot matter there), cap 4 × γ ∈ {0, 0.5}; then the calibrated choice.
    assert seen == [
        ([0], 1, 0.0),
        ([0], 4, 0.0),
        ([0], 4, 0.5),
        ([2], 1, 0.0),
        ([2], 4, 0.0),
        ([2], 4, 0.5),
        ([0, 2], 1, 0.0),
        ([0, 2], 4, 0.0),
        ([0, 2], 4, 0.5),
        ([0], 8, 0.4),
    ]
    with pytest.raises(ValueError, match="needs the per-draft accuracy"):
        DecodingPlan(max_new_tokens=4, policies=policies, layerskip_d=[1], dssd_gamma=[0.5])


def test_harness_reports_the_paper_rule_the_improved_and_the_tuned_dssd():
    from pipeline.evaluation.decoding_harness import DecodingPlan, run_decoding
    from pipeline.evaluation.decoding_report import METHOD_COLUMN

    from .conftest import tiny_gpt_neox

    model = tiny_gpt_neox(num_layers=4, d_model=32, vocab=64, seed=3)
    heads = EarlyExitHeads.from_backbone(model, [0, 1, 2], init="unembedding").eval()
    engine = Engine(model, heads)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 64, (6,), generator=gen) for _ in range(3)]
    policy = ExitPolicy((0, 1, 2), (4.16, 4.16, 4.16), "entropy")  # every head exits every token
    plan = DecodingPlan(
        max_new_tokens=6,
        policies={0.8: policy},
        layerskip_d=[1],
        max_draft=3,
        dssd_max_draft=[2],
        dssd_gamma=[0.0, 0.6],
        exit_sets={0.8: ExitSetChoice((1,), 0.5, 4, 5.0, 6.0)},
        draft_accuracy=DraftAccuracy("entropy", ((),) * 3, ((0.6,),) * 3),
        early_exit_fills=(),
        layerskip_select="latency_equiv_per_token",
        oracle=False,
    )
    report = run_decoding(engine, model, prompts[:2], prompts[2:], plan)
    rows = report.rows()
    by = {(r[METHOD_COLUMN], r["metric"], r["head"]): r["value"] for r in rows}
    for method in ("dssd_paper", "dssd", "dssd_tuned"):
        assert by[(method, "identical", None)] == 1.0
    # The improved DSSD consults head 1 only and stops after two drafts (chain 0.6 >= γ = 0.5, then 0.36).
    assert [by[("dssd", "consulted", k)] for k in range(3)] == [0.0, 1.0, 0.0]
    assert by[("dssd", "min_chain_prob", None)] == 0.5 and by[("dssd", "max_draft", None)] == 4
    improved = report.test.dssd[0]
    assert improved.total("drafted") <= 2 * improved.total("verifications")
    assert improved.per_head("drafts_per_head")[0] == improved.per_head("drafts_per_head")[2] == 0
    # The paper's rule drafts at head 0 (every head enabled, the shallowest exits first).
    assert report.test.dssd_paper[0].per_head("drafts_per_head")[0] > 0
    # dssd_tuned: the grid's cheapest in latency-equivalents, γ reported.
    grid_best = min(s.summary()["latency_equiv_per_token"] for s in report.dssd_tuning.grid)
    assert report.dssd_tuning.best.summary()["latency_equiv_per_token"] == grid_best
    assert ("dssd_tuned", "min_chain_prob", None) in by and ("dssd_tuned", "tuned_eps", None) in by
    # The paper's comparison with LayerSkip is on the paper rule.
    assert "dssd_paper" in set(report.summary_table()["method"])


# -- the decoding speed figure -------------------------------------------------------------------------------------


def test_decoding_speed_figure_ratios_to_greedy(tmp_path):
    from analysis.data import Results
    from analysis.plots.decoding_speed import decoding_speed, speed_ratios
    from pipeline.orchestration.results import row, to_frame

    rows = [row("tokens_per_s", 100.0, setting="greedy"), row("layer_equiv_per_token", 8.0, setting="greedy")]
    for setting, eps, speed, cost in (
        ("dssd_paper", 0.6, 50.0, 20.0),
        ("dssd_paper", 0.9, 70.0, 12.0),  # its fastest ε: the one shown
        ("dssd", 0.9, 120.0, 9.0),
        ("dssd_tuned", 0.8, 130.0, 9.2),
        ("layerskip", None, 110.0, 9.6),
        ("layerskip_nobonus", None, 90.0, 10.4),
    ):
        rows += [
            row("tokens_per_s", speed, setting=setting, eps=eps),
            row("speedup_vs_generate", speed / 80, setting=setting, eps=eps),
            row("layer_equiv_per_token", cost, setting=setting, eps=eps),
        ]
    frame = to_frame(rows, model="tiny", stage="decoding")
    table = speed_ratios(frame).set_index("method")
    assert list(table.index) == ["dssd_paper", "dssd", "dssd_tuned", "layerskip", "layerskip_nobonus"]
    assert table.loc["dssd_paper", "eps"] == 0.9 and table.loc["dssd_paper", "speed_ratio"] == pytest.approx(
        0.7
    )
    assert table.loc["dssd_tuned", "speed_ratio"] == pytest.approx(1.3)
    assert table.loc["layerskip_nobonus", "layer_equiv_ratio"] == pytest.approx(1.3)
    paths = decoding_speed(Results(frame), tmp_path)
    assert {p.name for p in paths} >= {"decoding_speed_tiny.png"}


def test_calibrate_config_rejects_a_flop_budget_below_greedy(tmp_path):
    from pipeline.orchestration.validation import ConfigError
    from pipeline.stages import calibrate

    from .micro import compose_micro

    with pytest.raises(ConfigError, match="flop_budget"):
        calibrate.STAGE.validate(compose_micro(tmp_path / "out", "calibrate.dssd.flop_budget=0.5"))
    with pytest.raises(ConfigError, match="gamma"):
        calibrate.STAGE.validate(compose_micro(tmp_path / "out", "calibrate.dssd.gamma=[0.2,1.5]"))


def test_the_simulation_prices_a_generation_like_the_engine(one_thread):
    """Replaying DSSD's rounds over a greedy generation's own per-position head values (what the engine's
    steps see) gives the engine's latency- and layer-equivalents per token exactly when every draft is made on
    the true prefix — one draft per round (max_draft=1) — up to the last round (the engine caps drafting by
    the tokens left). With longer drafts the engine keeps drafting after a rejected draft on a wrong prefix,
    whose confidence the calibration tokens do not hold: the simulation is then an estimate (exit_set.py)."""
    model = _model("neox")
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init="unembedding", seed=0)
    engine = Engine(model, heads)
    prompt, n_new = torch.arange(3, 9), 120
    with torch.no_grad():
        tokens = _greedy_n(model, prompt, n_new)
        ids = torch.cat([prompt, torch.tensor(tokens)])
        out = model(ids.view(1, -1), output_hidden_states=True)
        final = out.logits[0].argmax(-1)
        logits = [heads(k, out.hidden_states[layer + 1][0]) for k, layer in enumerate(HEAD_LAYERS)]
        values = torch.stack([entropy(x) for x in logits], 1).numpy()
        correct = torch.stack([x.argmax(-1) == final for x in logits], 1).numpy()
    # Position len(prompt) + i consumes generated token i and predicts token i + 1: the rounds' predictions.
    first = len(prompt)
    values, correct = values[first : first + n_new - 1], correct[first : first + n_new - 1]
    policy = ExitPolicy(HEAD_LAYERS, [float(np.quantile(values[:, k], 0.6)) for k in range(3)], "entropy")
    costs = DraftCosts.of(engine.cost, policy, engine.num_layers)
    rows = np.arange(len(values))
    for heads_used in ((0, 1, 2), (1,), (0, 2)):
        sub = policy.with_thresholds(
            [t if k in heads_used else None for k, t in enumerate(policy.thresholds)]
        )
        exit_head = exits_at(sub, values, heads_used)
        column = np.maximum(exit_head, 0)
        sim = simulate_dssd(exit_head, correct[rows, column], np.ones(len(rows)), heads_used, costs, 1)
        result = engine.generate(prompt, DSSD(sub, 1), n_new)
        assert result.tokens == tokens
        stats = result.stats
        # The engine's first token comes from the prompt's pass (greedy's cost): leave it out.
        latency = (stats.latency_equivalents - costs.greedy) / (stats.generated - 1)
        flops = (stats.layer_equivalents - costs.greedy) / (stats.generated - 1)
        assert stats.drafted > 10
        assert sim.latency_equiv_per_token == pytest.approx(latency, rel=0.01), heads_used
        assert sim.layer_equiv_per_token == pytest.approx(flops, rel=0.01), heads_used
