"""Runner semantics on fake stages: skip on rerun, force, dependency-aware recompute, crash safety."""

import threading
import time

import pytest
from omegaconf import OmegaConf

import pipeline.orchestration.runner as runner_mod
from pipeline.orchestration.results import row
from pipeline.orchestration.runner import Runner
from pipeline.orchestration.validation import ConfigError
from pipeline.stages.base import Stage, StageOutput

CALLS: list[str] = []


def _stage(name, upstream=(), fail=None):
    def run(ctx):
        CALLS.append(name)
        for up in upstream:
            assert (ctx.inputs[up] / "out.txt").is_file()
        if fail and fail():
            raise RuntimeError(f"{name} crashed")
        (ctx.out_dir / "out.txt").write_text(str(ctx.cfg[name].value))
        return StageOutput(rows=[row("value", ctx.cfg[name].value)], metrics={"value": ctx.cfg[name].value})

    return Stage(name=name, upstream=upstream, run=run, group=name)  # a group without a schema: keyed whole


def make_cfg(tmp_path, **overrides):
    cfg = OmegaConf.create(
        {
            "paths": {"cache": str(tmp_path / "cache")},
            "model": {
                "name": "fake",
                "source": "x",
                "num_layers": 4,
                "head_layers": [1],
                "max_seq_len": 64,
                "dtype": "float32",
            },
            "data": {"seq_len": 8, "budgets": {"train": 64}},
            "logger": {"enabled": False, "mode": "disabled"},
            "stages": ["all"],
            "force": False,
            "seed": 0,
            "device": "cpu",
            "progress": False,
            "a": {"value": 1},
            "b": {"value": 2},
            "c": {"value": 3},
        }
    )
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))


@pytest.fixture
def fake_stages(monkeypatch):
    CALLS.clear()
    stages = {"a": _stage("a"), "b": _stage("b", ("a",)), "c": _stage("c", ("a",))}
    monkeypatch.setattr(runner_mod, "available_stages", lambda: stages)
    return stages


def test_rerun_skips_and_force_recomputes(tmp_path, fake_stages):
    results = Runner(make_cfg(tmp_path)).run(tmp_path / "run1")
    assert CALLS == ["a", "b", "c"]
    assert set(results["stage"]) == {"a", "b", "c"}
    assert (tmp_path / "run1" / "results.csv").is_file()
    CALLS.clear()
    again = Runner(make_cfg(tmp_path)).run()
    assert CALLS == []
    assert again.equals(results)  # rows of reused stages come back from their stored outputs
    Runner(make_cfg(tmp_path, force="[b]")).run()
    assert CALLS == ["b"]
    CALLS.clear()
    Runner(make_cfg(tmp_path, stages="[b]", force=True)).run()
    assert CALLS == ["b"]


def test_changed_config_recomputes_only_dependents(tmp_path, fake_stages):
    Runner(make_cfg(tmp_path)).run()
    CALLS.clear()
    Runner(make_cfg(tmp_path, **{"b.value": 5})).run()
    assert CALLS == ["b"]
    CALLS.clear()
    Runner(make_cfg(tmp_path, **{"a.value": 7})).run()
    assert CALLS == ["a", "b", "c"]


def test_requested_stage_runs_missing_upstream_only(tmp_path, fake_stages):
    Runner(make_cfg(tmp_path, stages="[c]")).run()
    assert CALLS == ["a", "c"]
    CALLS.clear()
    Runner(make_cfg(tmp_path, stages="[b]")).run()
    assert CALLS == ["b"]


def test_crash_leaves_nothing_finished(tmp_path, monkeypatch):
    CALLS.clear()
    crash = {"on": True}
    stages = {"a": _stage("a"), "b": _stage("b", ("a",), fail=lambda: crash["on"])}
    monkeypatch.setattr(runner_mod, "available_stages", lambda: stages)
    with pytest.raises(RuntimeError, match="b crashed"):
        Runner(make_cfg(tmp_path)).run()
    runner = Runner(make_cfg(tmp_path))
    assert runner.store.is_complete("a", "fake", runner.keys["a"])
    assert not runner.store.is_complete("b", "fake", runner.keys["b"])
    crash["on"] = False
    CALLS.clear()
    runner.run()
    assert CALLS == ["b"]


def test_unknown_stage_is_a_config_error(tmp_path, fake_stages):
    with pytest.raises(ConfigError, match="unknown stage"):
        Runner(make_cfg(tmp_path, stages="[nope]"))
    with pytest.raises(ConfigError, match="unknown stage"):
        Runner(make_cfg(tmp_path, force="[nope]"))


def test_concurrent_runs_compute_once(tmp_path, monkeypatch):
    CALLS.clear()
    slow = _stage("a")
    original = slow.run

    def slow_run(ctx):
        time.sleep(0.5)
        return original(ctx)

    stages = {"a": Stage("a", (), slow_run, group="a")}
    monkeypatch.setattr(runner_mod, "available_stages", lambda: stages)
    threads = [threading.Thread(target=lambda: Runner(make_cfg(tmp_path)).run()) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert CALLS == ["a"]


# --- the one cache-key rule on the real stages ------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_keys(tmp_path_factory):
    from pipeline.orchestration.runner import available_stages, plan_keys

    from .micro import compose_micro

    stages = available_stages()
    return stages, plan_keys(compose_micro(tmp_path_factory.mktemp("keys")), stages)[0]


@pytest.mark.parametrize(
    "override, changed",
    [
        # Volatile settings (schema metadata) leave every key alone.
        ("extract.batch_size=3", set()),
        ("extract.shard_tokens=1024", set()),
        ("heads.num_workers=2", set()),
        ("metrics.batch_tokens=64", set()),
        ("calibrate.batch_tokens=64", set()),
        ("early_exit.batch_size=2", set()),
        ("early_exit.token_eval.batch_size=2", set()),
        ("device=cpu", set()),
        # Any other setting changes its stage's key and those downstream of it, and no other.
        ("metrics.rc_points=11", {"metrics"}),
        ("decoding.repeats=2", {"decoding"}),
        ("early_exit.token_eval.n_tokens=128", {"early_exit"}),
        ("calibrate.ltt.grid_points=50", {"calibrate", "early_exit", "decoding"}),
        ("heads.lr=0.001", {"heads", "metrics", "calibrate", "early_exit", "decoding"}),
        ("seed=1", {"heads", "metrics", "calibrate", "early_exit", "decoding"}),
    ],
)
def test_one_key_rule_for_every_stage(micro_keys, tmp_path, override, changed):
    from pipeline.orchestration.runner import plan_keys

    from .micro import compose_micro

    stages, base = micro_keys
    keys, configs = plan_keys(compose_micro(tmp_path, override), stages)
    assert {name for name in stages if keys[name] != base[name]} == changed
    assert configs["calibrate"]["calibrate"]["eps"] == [0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99]
    assert "batch_tokens" not in configs["calibrate"]["calibrate"]  # volatile: not hashed, not recorded
