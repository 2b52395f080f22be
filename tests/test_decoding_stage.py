"""The `decoding` stage: config checks, the rows of a micro pipeline run, and the benchmark on its outputs
(the harness itself: tests/test_decoding_harness.py)."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.orchestration.validation import ConfigError
from pipeline.stages import decoding

from .micro import compose_micro


def _validate(tmp_path, *overrides):
    decoding.STAGE.validate(compose_micro(tmp_path / "out", *overrides))


def test_micro_config_is_valid(tmp_path):
    _validate(tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["decoding.eps=[0]"], "outside"),
        (["decoding.eps=[1.2]"], "outside"),
        (["decoding.eps=[0.83]"], "not calibrated"),
        (["decoding.calibration_method=ltt", "calibrate.methods=[empirical]"], "not calibrated"),
        (["decoding.max_draft=0"], "max_draft"),
        (["decoding.layerskip_d=[0]"], "layerskip_d"),
        (["decoding.layerskip_d=[2,-1]"], "layerskip_d"),
        (["decoding.layerskip_d=[]"], "layerskip_d"),
        (["decoding.dssd_max_draft=[1,0]"], "dssd_max_draft"),
        (["decoding.dssd_max_draft=[]"], "dssd_max_draft"),
        (["decoding.dssd_gamma=[1.5]"], "dssd_gamma"),
        (["decoding.n_prompts=0"], "n_prompts"),
        (["decoding.n_tune_prompts=0"], "n_tune_prompts"),
        (["decoding.prompt_len=100", "decoding.max_new_tokens=64"], "maximum sequence length"),
        (["decoding.layerskip_select=speed"], "layerskip_select"),
        (["decoding.early_exit_fill=magic"], "early_exit_fill"),
    ],
)
def test_validate_rejects(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _validate(tmp_path, *overrides)


# --- on the micro pipeline ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows(micro_run):
    _, _, results = micro_run
    dec = results[results["stage"] == "decoding"]
    if dec.empty:
        pytest.skip("decoding stage absent")
    return dec


def _values(rows, method, metric, head=None):
    part = rows[(rows["setting"] == method) & (rows["metric"] == metric)]
    part = part[part["head"].isna()] if head is None else part[part["head"] == str(head)]
    return part


def test_rows_for_every_method_and_eps(rows):
    eps = {0.8, 0.9}
    for method in ("generate", "greedy", "layerskip", "layerskip_nobonus", "dssd_tuned"):
        for metric in ("tokens_per_s", "speedup_vs_generate", "identical"):
            assert len(_values(rows, method, metric)) == 1, (method, metric)
    for method in ("dssd", "early_exit"):
        got = _values(rows, method, "layer_equiv_per_token")
        assert set(got["eps"].round(6)) == eps, method
    for metric in ("identical", "speedup_vs_generate", "drafted_per_token"):
        assert set(_values(rows, "dssd", metric)["eps"].round(6)) == eps, metric
    # Acceptance exists wherever DSSD drafted (an ε at which no head is confident drafts nothing).
    drafted = _values(rows, "dssd", "drafted_per_token")
    drafting_eps = set(drafted[drafted["value"] > 0]["eps"].round(6))
    for metric in ("acceptance_rate", "accepted_per_verification"):
        assert set(_values(rows, "dssd", metric)["eps"].round(6)) == drafting_eps, metric
    assert len(_values(rows, "layerskip", "acceptance_rate")) == 1
    assert set(_values(rows, "early_exit", "agreement")["eps"].round(6)) == eps
    assert _values(rows, "early_exit", "identical").empty  # lossy: agreement, never "identical"
    assert float(_values(rows, "generate", "speedup_vs_generate")["value"].iloc[0]) == pytest.approx(1.0)


def test_everything_lossless_is_identical(rows):
    identical = rows[rows["metric"] == "identical"]
    lossless = {
        "generate",
        "greedy",
        "dssd",
        "dssd_tuned",
        "layerskip",
        "layerskip_nobonus",
        "layerskip_grid",
    }
    assert lossless | {"oracle"} <= set(identical["setting"])
    assert (identical["value"] == 1).all()


def test_ratios_and_oracle(rows):
    ratios = rows[rows["setting"] == "dssd_vs_layerskip"]
    for metric in ("acceptance_ratio", "accepted_per_verification_ratio", "layer_equiv_ratio", "speed_ratio"):
        part = ratios[ratios["metric"] == metric]
        assert set(part["eps"].round(6)) == {0.8, 0.9}, metric
        assert (part["value"].dropna() > 0).all()
    assert ratios[ratios["metric"] == "layer_equiv_ratio"]["value"].notna().all()
    grid = rows[rows["setting"] == "layerskip_grid"]
    assert {"acceptance_rate", "accepted_per_verification", "speedup_vs_generate"} <= set(grid["metric"])
    assert float(_values(rows, "oracle", "acceptance_rate")["value"].iloc[0]) == 1.0
    oracle = float(_values(rows, "oracle", "layer_equiv_per_token")["value"].iloc[0])
    greedy = float(_values(rows, "greedy", "layer_equiv_per_token")["value"].iloc[0])
    assert oracle <= greedy + 1e-9
    assert float(_values(rows, "oracle", "exit_frac", head="all")["value"].iloc[0]) <= 1.0


def test_layerskip_grid_and_tuned_setting(rows):
    grid = rows[(rows["setting"] == "layerskip_grid") & (rows["metric"] == "layer_equiv_per_token")]
    assert len(grid) == 3 * 2  # 3 heads × d in {1, 2}
    assert set(pd.to_numeric(grid["draft_len"]).astype(int)) == {1, 2}
    assert set(grid["head"]) == {"0", "1", "2"}
    head = int(_values(rows, "layerskip", "draft_head")["value"].iloc[0])
    d = int(_values(rows, "layerskip", "draft_len")["value"].iloc[0])
    # The tuned setting is the grid's cheapest per token (layerskip_select=layer_equiv_per_token).
    best = grid.loc[grid["value"].idxmin()]
    chosen = grid[(grid["head"] == str(head)) & (pd.to_numeric(grid["draft_len"]) == d)]
    assert float(chosen["value"].iloc[0]) == pytest.approx(float(best["value"]))


def test_tuned_dssd_and_the_no_bonus_baseline(rows):
    """dssd_tuned names its choice (ε, draft cap, consulted heads) from the micro config's grid; the no-bonus
    LayerSkip baseline runs the tuned (head, d) and never emits a bonus token."""
    eps = float(_values(rows, "dssd_tuned", "tuned_eps")["value"].iloc[0])
    assert round(eps, 6) in {0.8, 0.9}
    assert set(_values(rows, "dssd_tuned", "identical")["eps"].round(6)) == {round(eps, 6)}
    # tests/micro.py's caps, or the calibrated choice's (calibrate.dssd.max_draft, 16 by default)
    assert int(_values(rows, "dssd_tuned", "max_draft")["value"].iloc[0]) in {1, 2, 16}
    consulted = rows[(rows["setting"] == "dssd_tuned") & (rows["metric"] == "consulted")]
    assert set(consulted["head"]) == {"0", "1", "2"} and set(consulted["value"]) <= {0.0, 1.0}
    nobonus = _values(rows, "layerskip_nobonus", "layer_equiv_per_token")
    tuned = _values(rows, "layerskip", "layer_equiv_per_token")
    assert len(nobonus) == 1 and len(tuned) == 1


def test_paper_rule_and_improved_dssd_rows(rows, micro_run):
    """dssd_paper (every head, cap decoding.max_draft) and dssd (the calibrate stage's exit set and γ) per ε,
    both lossless; the dssd rows name exactly the heads and γ stored in thresholds.json."""
    from pipeline.exits.thresholds import ExitThresholds

    root, _, _ = micro_run
    for method in ("dssd_paper", "dssd"):
        assert set(_values(rows, method, "identical")["eps"].round(6)) == {0.8, 0.9}, method
        assert (_values(rows, method, "identical")["value"] == 1).all()
    (path,) = list((root / "cache" / "calibrate").rglob("dssd_thresholds.json"))  # the improved DSSD's signal
    thresholds = ExitThresholds.load(path)
    for eps in (0.8, 0.9):
        choice = thresholds.exit_set("empirical", eps)
        at = rows[(rows["setting"] == "dssd") & (rows["eps"].round(6) == eps)]
        consulted = at[at["metric"] == "consulted"].set_index("head")["value"]
        assert [k for k in range(3) if consulted[str(k)] == 1.0] == list(choice.heads)
        assert float(at[at["metric"] == "min_chain_prob"]["value"].iloc[0]) == choice.min_chain_prob
        assert int(at[at["metric"] == "max_draft"]["value"].iloc[0]) == choice.max_draft
    assert thresholds.draft_accuracy is not None and thresholds.draft_accuracy.n_heads == 3


def test_rows_name_the_signal_they_exit_on(rows, micro_run):
    """Early exit and dssd_paper exit on the paper's signal (calibrate.metric), dssd and dssd_tuned on the
    improved DSSD's (calibrate.dssd.metric: 12.5% of the micro model's 1,024 tokens)."""
    for setting, signal in [
        ("early_exit", "entropy"),
        ("dssd_paper", "entropy"),
        ("dssd", "logit_margin@top128"),
        ("dssd_tuned", "logit_margin@top128"),
    ]:
        measured = rows[(rows["setting"] == setting) & (rows["metric"] == "layer_equiv_per_token")]
        assert len(measured) and set(measured["confidence"]) == {signal}, setting


def test_per_prompt_table(micro_run):
    root, _, results = micro_run
    if "decoding" not in set(results["stage"]):
        pytest.skip("decoding stage absent")
    tables = list((root / "cache" / "decoding").rglob("tables/per_prompt.parquet"))
    assert len(tables) == 1
    table = pd.read_parquet(tables[0])
    test = table[table["split"] == "test"]
    assert set(test["prompt"]) == {0, 1, 2}
    assert {
        "generate",
        "greedy",
        "dssd_paper",
        "dssd",
        "dssd_tuned",
        "layerskip",
        "layerskip_nobonus",
        "early_exit",
    } <= set(test["method"])
    assert "dssd_grid" in set(table[table["split"] == "tune"]["method"])
    assert (test["n_tokens"] == 8).all()
    assert set(table[table["split"] == "tune"]["prompt"]) == {0, 1}


def test_a_lossy_dssd_is_an_error_not_a_footnote(micro_copy, monkeypatch):
    """A DSSD that changes one token stops the stage with LosslessnessError and leaves no finished output."""
    from pipeline.engine import DSSD, Engine
    from pipeline.orchestration.runner import Runner
    from pipeline.orchestration.store import SUCCESS_FILE

    if not (micro_copy / "cache" / "decoding").exists():
        pytest.skip("decoding stage absent")
    original = Engine.generate

    def corrupt(self, input_ids, strategy, max_new_tokens, eos_token_id=None):
        result = original(self, input_ids, strategy, max_new_tokens, eos_token_id)
        if isinstance(strategy, DSSD):
            result.tokens[-1] = (result.tokens[-1] + 1) % 7
        return result

    monkeypatch.setattr(Engine, "generate", corrupt)
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(micro_copy / "cache" / "decoding")
    with pytest.raises(decoding.LosslessnessError, match="dssd"):
        Runner(compose_micro(micro_copy, "stages=[decoding]")).run()
    assert not list((micro_copy / "cache" / "decoding").rglob(SUCCESS_FILE))


# --- benchmarks/decoding_speed.py on the pipeline's own outputs ---------------------------------------------


def test_benchmark_from_pipeline_outputs(micro_run, tmp_path):
    """The benchmark finds the micro run's entries through the store and runs the shared harness on them."""
    from benchmarks.decoding_speed import find_pipeline_outputs, main

    root, _, _ = micro_run
    outputs = find_pipeline_outputs(root, "tiny")
    upstream = outputs.record("calibrate")["upstream"]
    assert outputs.keys["heads"] == upstream["heads"] and outputs.keys["backbone"] == upstream["backbone"]
    assert outputs.keys["extract"] == upstream["extract"]
    frame = main(
        [
            "--from-outputs",
            str(root),
            "--n-prompts",
            "2",
            "--n-tune-prompts",
            "1",
            "--prompt-len",
            "8",
            "--new-tokens",
            "6",
            "--repeats",
            "1",
            "--layerskip-d",
            "1",
            "2",
            "--eps",
            "0.8",
            "--dssd-max-draft",
            "1",
            "2",
            "--csv",
            str(tmp_path / "bench.csv"),
        ]
    )
    assert (tmp_path / "bench.csv").is_file()
    lossless = frame[
        frame["method"].isin(
            [
                "greedy",
                "layerskip",
                "layerskip_nobonus",
                "dssd_paper",
                "dssd",
                "dssd_tuned",
                "assistant_early_exit",
            ]
        )
    ]
    assert lossless["identical_to_greedy"].all()
    assert {
        "generate",
        "greedy",
        "early_exit",
        "layerskip",
        "dssd_paper",
        "dssd",
        "dssd_tuned",
        "layerskip_nobonus",
        "oracle_bound",
        "assistant_early_exit",
    } <= set(frame["method"])
    llama = frame[frame["model"].str.startswith("llama")]
    assert {"generate", "greedy", "layerskip", "layerskip_nobonus", "assistant_early_exit"} == set(
        llama["method"]
    )
