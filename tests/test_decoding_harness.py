"""The decoding harness on hand-built inputs and a tiny random model: oracle speculation, the losslessness
check, LayerSkip selection, per-repeat speeds, a whole run, and finding stage outputs in the store."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.evaluation.decoding_harness import (
    DecodingPlan,
    ExternalMethod,
    LosslessnessError,
    check_identical,
    hf_greedy,
    run_decoding,
)
from pipeline.evaluation.decoding_report import METHOD_COLUMN, Setting, oracle_speculation, speed_line
from pipeline.evaluation.decoding_tuning import consulting, dssd_grid, select_dssd, select_layerskip
from pipeline.evaluation.stage_outputs import finished_keys, latest_outputs
from pipeline.orchestration.store import StageStore

from .conftest import tiny_gpt_neox


@pytest.mark.parametrize(
    "earliest, max_draft, expected",
    [
        ([None, 0, 1, None, 2, None], 16, (3, 2)),  # runs [0,1] and [2], each ended by a full-model token
        ([0, 0, 0, 0, 0, 0, 0], 2, (4, 2)),  # capped at 2 drafts; the last token is never drafted
        ([None, None, None], 4, (0, 0)),
        ([1], 4, (0, 0)),  # the first token comes from the prompt's pass
        ([None, 0, 0, 0], 16, (2, 1)),  # the final token always comes from a verifying pass
    ],
)
def test_oracle_speculation(earliest, max_draft, expected):
    assert oracle_speculation(earliest, max_draft) == expected


def test_check_identical_names_the_method_prompt_and_first_difference():
    check_identical([1, 2, 3], [1, 2, 3], "dssd", "greedy", "test", 0)
    with pytest.raises(LosslessnessError) as err:
        check_identical([1, 2, 3, 4], [1, 2, 9, 4], "dssd eps=0.8", "greedy", "test", 5)
    message = str(err.value)
    assert "dssd eps=0.8 is not lossless" in message
    assert "test prompt 5" in message and "position 2" in message
    assert "[9, 4] vs [3, 4]" in message
    with pytest.raises(LosslessnessError, match="position 2"):  # a shorter output differs where it ends
        check_identical([1, 2, 3], [1, 2], "layerskip", "greedy", "tuning", 0)


def _stats(generated: int, layer_equivalents: float, accepted: int = 0, verifications: int = 0):
    return SimpleNamespace(
        generated=generated,
        layer_equivalents=layer_equivalents,
        latency_equivalents=layer_equivalents,
        drafted=accepted,
        accepted=accepted,
        verifications=verifications,
        full_passes=generated,
        prefill_tokens=1,
    )


def _grid_setting(head: int, d: int, layer_eq: float, wall: float, accepted: int = 0, verifications: int = 1):
    s = Setting("layerskip_grid", head=head, draft_len=d)
    s.tokens, s.wall = [[0] * 10], [wall]
    s.stats = [_stats(10, layer_eq, accepted, verifications)]
    return s


def test_select_layerskip_by_compute_then_acceptance_then_shallower():
    grid = [
        _grid_setting(0, 1, layer_eq=50.0, wall=0.1),  # fastest, not cheapest
        _grid_setting(1, 1, layer_eq=40.0, wall=0.5, accepted=2),
        _grid_setting(
            1, 2, layer_eq=40.0, wall=0.5, accepted=4
        ),  # same compute, more accepted per verification
        _grid_setting(2, 1, layer_eq=60.0, wall=0.2),
    ]
    best = select_layerskip(grid)
    assert (best.head, best.draft_len) == (1, 2)
    fastest = select_layerskip(grid, "tokens_per_s")
    assert (fastest.head, fastest.draft_len) == (0, 1)
    tie = [_grid_setting(2, 1, 40.0, 0.5), _grid_setting(0, 3, 40.0, 0.5), _grid_setting(0, 2, 40.0, 0.5)]
    assert (select_layerskip(tie).head, select_layerskip(tie).draft_len) == (0, 2)


def test_plan_rejects_an_unknown_criterion():
    with pytest.raises(ValueError, match="layerskip_select"):
        DecodingPlan(max_new_tokens=4, policies={}, layerskip_d=[1], layerskip_select="speed")
    with pytest.raises(ValueError, match="dssd_max_draft"):
        DecodingPlan(max_new_tokens=4, policies={}, layerskip_d=[1], dssd_max_draft=[2, 0])


def test_dssd_grid_consults_each_enabled_head_alone_and_all_together():
    from pipeline.exits.policy import ExitPolicy

    policies = {
        0.8: ExitPolicy((0, 1, 2), (1.0, None, 2.0)),  # head 1 disabled by calibration at this ε
        0.9: ExitPolicy((0, 1, 2), (None, None, 0.5)),  # one head: its single set is all heads
    }
    plan = DecodingPlan(max_new_tokens=4, policies=policies, layerskip_d=[1], dssd_max_draft=[1, 4])
    grid = dssd_grid(plan)
    seen = [(s.eps, tuple(s.strategy.policy.thresholds), s.strategy.max_draft) for s in grid]
    assert seen == [
        (0.8, (1.0, None, None), 1),
        (0.8, (1.0, None, None), 4),
        (0.8, (None, None, 2.0), 1),
        (0.8, (None, None, 2.0), 4),
        (0.8, (1.0, None, 2.0), 1),
        (0.8, (1.0, None, 2.0), 4),
        (0.9, (None, None, 0.5), 1),
        (0.9, (None, None, 0.5), 4),
    ]
    assert grid[4].label == "dssd_grid eps=0.8 heads=0,2 max_draft=1"
    assert consulting(policies[0.8], [2]).metric == policies[0.8].metric


def _dssd_setting(eps: float, heads: tuple, cap: int, layer_eq: float, wall: float, accepted: int = 0):
    from pipeline.engine import DSSD
    from pipeline.exits.policy import ExitPolicy

    policy = ExitPolicy((0, 1, 2), tuple(1.0 if k in heads else None for k in range(3)))
    s = Setting("dssd_grid", eps=eps, strategy=DSSD(policy, max_draft=cap))
    s.tokens, s.wall = [[0] * 10], [wall]
    s.stats = [_stats(10, layer_eq, accepted, 1)]
    return s


def test_select_dssd_by_the_same_criterion_then_smaller_cap_and_fewer_heads():
    grid = [
        _dssd_setting(0.8, (0, 1, 2), 16, layer_eq=30.0, wall=0.5),
        _dssd_setting(0.9, (0,), 2, layer_eq=30.0, wall=0.4),  # as cheap, smaller cap: wins the tie
        _dssd_setting(0.9, (0, 1), 2, layer_eq=30.0, wall=0.3),  # same cap, more heads
        _dssd_setting(0.6, (2,), 4, layer_eq=45.0, wall=0.1),  # fastest
    ]
    best = select_dssd(grid)
    assert (best.eps, best.strategy.policy.enabled, best.strategy.max_draft) == (0.9, [0], 2)
    assert select_dssd(grid, "tokens_per_s").eps == 0.6


def test_speeds_per_repeat_and_ratios_to_generate():
    generate, greedy = Setting("generate"), Setting("greedy")
    for setting, walls in ((generate, [[1.0, 2.0], [1.0, 2.0]]), (greedy, [[0.5, 0.5], [0.5, 2.0]])):
        setting.tokens = [[1] * 10, [1] * 10]
        setting.repeat_walls = walls
        setting.wall = [sorted(w)[len(w) // 2] for w in walls]
    assert generate.tokens_per_s_by_repeat() == [10.0, 5.0]
    assert greedy.tokens_per_s_by_repeat() == [20.0, 8.0]
    line = speed_line(greedy, generate, "m")
    assert line["tokens_per_s"] == pytest.approx(14.0)  # median of two repeats
    assert (line["tok_s_min"], line["tok_s_max"]) == (8.0, 20.0)
    assert line["ratio_vs_generate"] == pytest.approx((2.0 + 1.6) / 2)
    assert line["identical_to_greedy"] and line["setting"] == "engine"


# --- a whole run on a tiny random model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from pipeline.engine import Engine
    from pipeline.exits.heads import EarlyExitHeads

    model = tiny_gpt_neox(num_layers=4, d_model=32, vocab=64, seed=3)
    heads = EarlyExitHeads.from_backbone(model, [0, 1, 2], init="unembedding").eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 64, (6,), generator=gen) for _ in range(3)]
    return model, Engine(model, heads), prompts


def _policies(engine):
    """Head 2 exits every token (the random model's entropies are all about ln 64 = 4.159): DSSD drafts."""
    from pipeline.exits.policy import ExitPolicy

    return {0.8: ExitPolicy(tuple(engine.head_layers), (None, None, 4.16), "entropy")}


def test_run_decoding_rows_tables_and_external_methods(tiny):
    model, engine, prompts = tiny

    def external(tuned: Setting) -> list[ExternalMethod]:
        return [ExternalMethod("reference_again", "hf", lambda p: hf_greedy(model, p, 5))]

    plan = DecodingPlan(
        max_new_tokens=5,
        policies=_policies(engine),
        layerskip_d=[1, 2],
        max_draft=3,
        early_exit_fills=("lazy", "copy"),
        repeats=2,
        external=external,
    )
    report = run_decoding(engine, model, prompts[:2], prompts[2:], plan)
    rows = report.rows()
    methods = {r[METHOD_COLUMN] for r in rows}
    assert {
        "generate",
        "greedy",
        "early_exit",
        "layerskip",
        "dssd_paper",
        "layerskip_grid",
        "oracle",
    } <= methods
    assert "dssd" not in methods  # the improved DSSD needs the calibrate stage's exit sets (none here)
    assert {"dssd_vs_layerskip", "dssd_tuned", "layerskip_nobonus"} <= methods
    # The tuned DSSD: chosen on the tuning prompts from the grid (only head 2 is enabled: 4 draft caps), its
    # choice reported in rows, checked lossless on the test prompts like the paper's DSSD.
    tuned = report.test.dssd_tuned
    assert len(report.dssd_tuning.grid) == 4 and tuned.strategy.policy.enabled == [2]
    choice = {(r["metric"], r["head"]): r["value"] for r in rows if r[METHOD_COLUMN] == "dssd_tuned"}
    assert choice[("tuned_eps", None)] == 0.8 == tuned.eps
    assert choice[("max_draft", None)] == tuned.strategy.max_draft in (1, 2, 4, 16)
    assert [choice[("consulted", k)] for k in range(3)] == [0.0, 0.0, 1.0]
    assert choice[("identical", None)] == 1.0
    nobonus = report.test.layerskip_nobonus
    assert (nobonus.head, nobonus.draft_len) == (report.tuning.best.head, report.tuning.best.draft_len)
    assert nobonus.total("bonus") == 0 and nobonus.tokens == report.test.generate.tokens
    dssd = {r["metric"]: r["value"] for r in rows if r[METHOD_COLUMN] == "dssd_paper" and r["head"] is None}
    assert dssd["drafted_per_token"] > 0 and 0 < dssd["acceptance_rate"] < 1
    # Both cost measures: equal for greedy (one row per call); a verification over k rows is one call.
    greedy = {r["metric"]: r["value"] for r in rows if r[METHOD_COLUMN] == "greedy"}
    assert greedy["latency_equiv_per_token"] == pytest.approx(greedy["layer_equiv_per_token"])
    assert dssd["latency_equiv_per_token"] < dssd["layer_equiv_per_token"]
    identical = [r for r in rows if r["metric"] == "identical"]
    assert identical and all(r["value"] == 1.0 for r in identical)
    assert (
        len([r for r in rows if r[METHOD_COLUMN] == "layerskip_grid" and r["metric"] == "identical"]) == 3 * 2
    )
    # Two fills of early exit: two settings per ε, told apart in their labels.
    assert [s.label for s in report.test.early_exit] == [
        "early_exit eps=0.8 fill=lazy",
        "early_exit eps=0.8 fill=copy",
    ]
    table = report.per_prompt_table()
    # tuning: generate, greedy, 6 LayerSkip and 4 DSSD grid settings on 1 prompt; test: generate, greedy, 2
    # early exit, layerskip, dssd_paper, layerskip_nobonus, dssd_tuned, dssd_perfect_gate and the external
    # method on 2 prompts
    assert len(table) == 12 + 2 * 10
    # The perfect gate drafts exactly the tokens some head gets right (the oracle's), each one accepted.
    gate = report.test.perfect_gate
    assert gate.tokens == report.test.greedy.tokens
    oracle_drafts = sum(h is not None for b in report.test.bounds for h in b.earliest_head[1:])
    assert gate.total("drafted") == gate.total("accepted") > 0
    assert gate.total("drafted") <= oracle_drafts
    assert all(len(s.repeat_walls[0]) == 2 for s in (report.test.generate, report.test.dssd_paper[0]))
    speed = report.speed_table("tiny")
    assert speed.loc[speed["method"] == "reference_again", "identical_to_greedy"].item()
    assert "oracle_bound" in set(speed["method"])
    summary = report.summary_table()
    assert set(summary["method"]) >= {"generate", "greedy", "layerskip", "dssd_paper", "dssd_tuned", "oracle"}
    metrics = report.metrics()
    assert not math.isnan(metrics["greedy_speedup_vs_generate"])
    assert metrics["dssd_tuned_heads"] == "2" and metrics["dssd_tuned_speed_vs_greedy"] > 0


def test_run_decoding_raises_when_a_lossless_method_changes_a_token(tiny, monkeypatch):
    from pipeline.engine import Engine, LayerSkip

    model, engine, prompts = tiny
    original = Engine.generate

    def corrupt(self, input_ids, strategy, max_new_tokens, eos_token_id=None):
        result = original(self, input_ids, strategy, max_new_tokens, eos_token_id)
        if isinstance(strategy, LayerSkip):
            result.tokens[1] = (result.tokens[1] + 1) % 64
        return result

    monkeypatch.setattr(Engine, "generate", corrupt)
    plan = DecodingPlan(max_new_tokens=4, policies={}, layerskip_d=[1], oracle=False)
    with pytest.raises(
        LosslessnessError, match=r"layerskip_grid head=0 d=1 is not lossless: on tuning prompt 0"
    ):
        run_decoding(engine, model, prompts[:1], prompts[1:2], plan)


# --- finding stage outputs ----------------------------------------------------------------------------------


def _finish(store: StageStore, stage: str, key: str, upstream: dict[str, str]) -> None:
    with store.lock(stage, "m", key), store.writing(stage, "m", key, {"upstream": upstream}) as (work, _):
        (work / "out.txt").write_text(key)


def test_latest_outputs_takes_the_newest_calibrate_entry_with_its_upstream(tmp_path):
    store = StageStore(tmp_path / "cache")
    assert latest_outputs(store, "m") is None
    _finish(store, "backbone", "b1", {})
    _finish(store, "heads", "h1", {"backbone": "b1"})
    assert latest_outputs(store, "m").keys == {"backbone": "b1", "heads": "h1"}  # no thresholds yet
    _finish(store, "calibrate", "c1", {"backbone": "b1", "heads": "h1"})
    _finish(store, "heads", "h2", {"backbone": "b1"})
    _finish(store, "calibrate", "c2", {"backbone": "b1", "heads": "h2"})
    _finish(store, "calibrate", "c3", {"backbone": "b1", "heads": "missing"})  # newest, but incomplete
    (store.entry("calibrate", "m", "c0.partial")).mkdir()  # work in progress is never listed
    assert finished_keys(store, "calibrate", "m") == ["c3", "c2", "c1"]
    outputs = latest_outputs(store, "m")
    assert outputs.keys == {"backbone": "b1", "heads": "h2", "calibrate": "c2"}
    assert outputs.entry("heads") == store.entry("heads", "m", "h2") and outputs.entry("extract") is None
    outputs.verify()
    (outputs.entry("heads") / "out.txt").write_text("altered")
    with pytest.raises(Exception, match="checksum|bytes"):
        outputs.verify()


def test_hf_greedy_ignores_the_models_own_eos_unless_given():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = GPTNeoXForCausalLM(config).eval()
    prompt = torch.tensor([1, 2, 3])
    free = hf_greedy(model, prompt, 12)
    model.generation_config.eos_token_id = free[0]  # as a tokenizer's EOS would be, in a saved model
    assert hf_greedy(model, prompt, 12) == free  # the engine decodes max_new_tokens: so must the reference
    assert hf_greedy(model, prompt, 12, eos_token_id=free[0]) == free[:1]
    assert model.generation_config.eos_token_id == free[0]
