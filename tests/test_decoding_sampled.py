"""Sampled decoding (`decoding.sampling`, issue 16): the harness part on a tiny random model (reproducible by
seed, LayerSkip tuned per temperature), the stage on the micro pipeline (rows per temperature, greedy rows
unchanged), the config check and the temperature figure. Exactness in distribution: tests/test_sampling.py."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.evaluation.decoding_harness import DecodingPlan, run_decoding
from pipeline.evaluation.decoding_rows import SAMPLED_PREFIX
from pipeline.evaluation.decoding_sampled import run_sampled_decoding
from pipeline.orchestration.validation import ConfigError
from pipeline.stages import decoding

from .conftest import tiny_gpt_neox
from .micro import compose_micro

TIMING = ("tokens_per_s", "speedup", "speed_ratio", "wall")


@pytest.fixture(scope="module")
def tiny():
    from pipeline.engine import Engine
    from pipeline.exits.heads import EarlyExitHeads
    from pipeline.exits.policy import ExitPolicy

    model = tiny_gpt_neox(num_layers=4, d_model=32, vocab=64, seed=3)
    heads = EarlyExitHeads.from_backbone(model, [0, 1, 2], init="unembedding").eval()
    engine = Engine(model, heads)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 64, (6,), generator=gen) for _ in range(4)]
    # Head 2 exits every token (the random model's entropies are all about ln 64): DSSD drafts.
    plan = DecodingPlan(
        max_new_tokens=6,
        policies={0.8: ExitPolicy(tuple(engine.head_layers), (None, None, 4.16), "entropy")},
        layerskip_d=[1, 2],
        max_draft=3,
        dssd_max_draft=[2],
        early_exit_fills=(),
        oracle=False,
    )
    greedy = run_decoding(engine, model, prompts[:2], prompts[2:], plan)
    return engine, prompts, plan, greedy


def _sampled(tiny, temperatures, seed):
    engine, prompts, plan, greedy = tiny
    return run_sampled_decoding(engine, greedy, prompts[:2], prompts[2:], plan, temperatures, seed)


def _deterministic(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame = frame[~frame["metric"].str.contains("|".join(TIMING))]
    return frame.sort_values(["temperature", "setting", "eps", "head", "metric", "draft_len"]).reset_index(
        drop=True
    )


def test_sampled_runs_are_reproducible_by_seed_and_tuned_per_temperature(tiny):
    run = _sampled(tiny, [0.0, 0.7, 1.5], seed=5)
    assert [r.temperature for r in run.runs] == [0.7, 1.5]  # 0 is the greedy run, not repeated
    again = _sampled(tiny, [0.7, 1.5], seed=5)
    pd.testing.assert_frame_equal(_deterministic(run.rows()), _deterministic(again.rows()))
    for a, b in zip(run.runs, again.runs, strict=True):
        assert [s.tokens for s in a.test_settings] == [s.tokens for s in b.test_settings]
    other = _sampled(tiny, [1.5], seed=6)
    assert [s.tokens for s in other.runs[0].test_settings] != [s.tokens for s in run.runs[1].test_settings]
    for sampled in run.runs:
        # LayerSkip is the grid's cheapest at this temperature (layerskip_select=layer_equiv_per_token).
        costs = {(s.head, s.draft_len): s.summary()["layer_equiv_per_token"] for s in sampled.layerskip_grid}
        assert costs[(sampled.layerskip.head, sampled.layerskip.draft_len)] == min(costs.values())
        # DSSD runs the greedy run's very strategies; every prompt i draws with seed + i.
        _, _, _, greedy = tiny
        assert [s.strategy for s in sampled.dssd_paper] == [s.strategy for s in greedy.test.dssd_paper]
        test = [r for r in sampled.records if r["split"] == "test"]
        assert {(r["prompt"], r["seed"]) for r in test} == {(0, 5), (1, 6)}


def test_sampled_rows_and_tables(tiny):
    run = _sampled(tiny, [1.0], seed=0)
    rows = pd.DataFrame(run.rows())
    assert (rows["temperature"] == 1.0).all()
    assert rows["setting"].str.startswith(SAMPLED_PREFIX).all()
    assert "identical" not in set(rows["metric"])  # sampled outputs differ by design: no identity check
    for method in ("layerskip", "layerskip_nobonus", "dssd_paper"):
        part = rows[(rows["setting"] == SAMPLED_PREFIX + method) & rows["head"].isna()]
        assert {"acceptance_rate", "accepted_per_verification", "latency_equiv_per_token"} <= set(
            part["metric"]
        )
    greedy = rows[rows["setting"] == SAMPLED_PREFIX + "greedy"]
    speedup = greedy[greedy["metric"] == "speedup_vs_greedy"]["value"]
    assert float(speedup.iloc[0]) == pytest.approx(1.0)
    drafted = rows[
        (rows["setting"] == SAMPLED_PREFIX + "dssd_paper") & (rows["metric"] == "drafted_per_token")
    ]
    assert float(drafted["value"].iloc[0]) > 0  # head 2 always confident: DSSD drafted, acceptance measured
    summary = run.summary_table()
    assert set(summary["method"]) == {"greedy", "layerskip", "layerskip_nobonus", "dssd_paper"}
    table = run.per_prompt_table()
    assert set(table["split"]) == {"tune", "test"} and (table["temperature"] == 1.0).all()
    assert run.metrics()["layerskip_head@T=1"] == run.runs[0].layerskip.head


@pytest.mark.parametrize("value", ["[-0.5]", "[0.0,-1]", "[inf]"])
def test_config_rejects_bad_temperatures(tmp_path, value):
    with pytest.raises(ConfigError, match="decoding.sampling"):
        decoding.STAGE.validate(compose_micro(tmp_path / "out", f"decoding.sampling={value}"))


# --- the stage on the micro pipeline ------------------------------------------------------------------------


def test_micro_decoding_stage_with_sampling(micro_run, micro_copy):
    """decoding.sampling=[0.0,0.8] on the micro pipeline's cached upstream: sampled rows at 0.8 for every
    method, LayerSkip tuned at 0.8, and the greedy rows equal the run without sampling (timing aside)."""
    from pipeline.orchestration.runner import Runner

    _, _, plain = micro_run
    if "decoding" not in set(plain["stage"]):
        pytest.skip("decoding stage absent")
    shutil.rmtree(micro_copy / "cache" / "decoding", ignore_errors=True)
    results = Runner(compose_micro(micro_copy, "stages=[decoding]", "decoding.sampling=[0.0,0.8]")).run()
    dec = results[results["stage"] == "decoding"]
    sampled = dec[dec["setting"].str.startswith(SAMPLED_PREFIX)]
    assert set(sampled["temperature"]) == {0.8}
    assert {
        SAMPLED_PREFIX + m
        for m in ("greedy", "layerskip", "layerskip_nobonus", "dssd_paper", "dssd", "layerskip_grid")
    } <= set(sampled["setting"])
    for method in ("dssd_paper", "dssd"):
        part = sampled[
            (sampled["setting"] == SAMPLED_PREFIX + method) & (sampled["metric"] == "layer_equiv_per_token")
        ]
        assert set(part["eps"].round(6)) == {0.8, 0.9}, method
    grid = sampled[
        (sampled["setting"] == SAMPLED_PREFIX + "layerskip_grid")
        & (sampled["metric"] == "latency_equiv_per_token")  # the micro's layerskip_select
    ]
    assert len(grid) == 3 * 2
    choice = sampled[sampled["setting"] == SAMPLED_PREFIX + "layerskip"].set_index("metric")["value"]
    chosen = grid[
        (grid["head"] == str(int(choice["draft_head"]))) & (grid["draft_len"] == choice["draft_len"])
    ]
    assert float(chosen["value"].iloc[0]) == pytest.approx(float(grid["value"].min()))
    assert not (sampled["metric"] == "identical").any()

    def greedy_rows(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame[(frame["stage"] == "decoding") & ~frame["setting"].str.startswith(SAMPLED_PREFIX)]
        frame = frame[~frame["metric"].str.contains("|".join(TIMING))]
        key = ["setting", "eps", "head", "metric", "draft_len"]
        return frame[[*key, "value"]].sort_values(key).reset_index(drop=True)

    a, b = greedy_rows(results), greedy_rows(plain)
    assert len(a) == len(b) and np.allclose(a["value"], b["value"], equal_nan=True)
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))


# --- the figure -----------------------------------------------------------------------------------------------


def _frame(temperatures: list[float]) -> pd.DataFrame:
    from pipeline.orchestration.results import normalize, row

    rows = []
    for t in [0.0, *temperatures]:
        prefix, extra = (SAMPLED_PREFIX, {"temperature": t}) if t > 0 else ("", {})
        rows += [
            row("latency_equiv_per_token", 4.0, setting=prefix + "greedy", **extra),
            row("tokens_per_s", 100.0, setting=prefix + "greedy", **extra),
        ]
        for method, acc, cost in (("dssd_paper", 0.8 - t / 4, 3.0 + t), ("layerskip", 0.7 - t / 5, 3.5)):
            eps = 0.8 if method == "dssd_paper" else None
            rows += [
                row("acceptance_rate", acc, setting=prefix + method, eps=eps, **extra),
                row("latency_equiv_per_token", cost, setting=prefix + method, eps=eps, **extra),
                row("tokens_per_s", 400 / cost, setting=prefix + method, eps=eps, **extra),
            ]
    frame = pd.DataFrame(rows).assign(model="tiny", stage="decoding")
    return normalize(frame)


def test_temperature_figure(tmp_path):
    from analysis.data import Results
    from analysis.plots import FIGURES, SkipFigure
    from analysis.plots.sampling import temperature_table

    frame = _frame([0.7, 1.0])
    table = temperature_table(frame)
    ls = table[table["method"] == "layerskip"].set_index("temperature")
    assert list(ls.index) == [0.0, 0.7, 1.0]
    assert ls.loc[0.7, "acceptance_rate"] == pytest.approx(0.56)
    assert ls.loc[1.0, "latency_speedup"] == pytest.approx(4.0 / 3.5)
    paths = FIGURES["decoding_sampling"](Results(frame, {}, tmp_path), tmp_path)
    assert {p.name for p in paths} >= {"decoding_sampling_tiny.png"}
    with pytest.raises(SkipFigure, match="sampl"):  # greedy-only results: no figure
        FIGURES["decoding_sampling"](Results(_frame([]), {}, tmp_path), tmp_path)
