"""Reliability (issue 10): interruptions, corrupt files, bad input, determinism, concurrency, fuzzed configs.

All on the micro tiny model; outputs are copied from the session's micro run so each test starts from a
finished pipeline and breaks one thing."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from pipeline.orchestration.errors import USER_ERRORS
from pipeline.orchestration.runner import Runner
from pipeline.orchestration.store import SUCCESS_FILE, StageOutputError

from .micro import REPO, compose_micro, micro_command, run_micro

TIMING_METRICS = ("seconds", "tokens_per_s", "speedup", "wall")
LABELS = ["stage", "setting", "split", "confidence", "calibration", "fill"]


def _entry(root: Path, stage: str) -> tuple[Path, Path]:
    runner = Runner(compose_micro(root))
    final = runner.store.entry(stage, "tiny", runner.keys[stage])
    return final, final.with_name(final.name + ".partial")


def _drop(root: Path, *stages: str) -> None:
    for stage in stages:
        shutil.rmtree(root / "cache" / stage, ignore_errors=True)


def _kill_when(root: Path, overrides: list[str], ready, timeout: float = 300) -> None:
    """Start `python -m pipeline`, SIGKILL it as soon as `ready()` is true; fail if it ends first."""
    proc = subprocess.Popen(
        micro_command(root, *overrides),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the pipeline finished (rc={proc.returncode}) before it could be interrupted")
            if time.time() > deadline:
                pytest.fail("timed out waiting for the interruption point")
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _files(record_dir: Path) -> dict:
    return {k: v["sha256"] for k, v in json.loads((record_dir / SUCCESS_FILE).read_text())["files"].items()}


# --- 1. interruption ------------------------------------------------------------------------------------------


def test_sigkill_during_extraction_then_rerun_recomputes_only_extraction(micro_run, micro_copy):
    original, _ = _entry(micro_run[0], "extract")
    _drop(micro_copy, "extract", "heads", "metrics", "calibrate", "early_exit", "decoding")
    final, partial = _entry(micro_copy, "extract")
    # batch_size is volatile (not in the key): one sequence per forward makes extraction last long enough.
    _kill_when(
        micro_copy,
        ["stages=[extract]", "extract.batch_size=1"],
        lambda: (partial / "train" / "hidden_00000.npy").is_file(),
    )
    assert partial.is_dir() and not final.exists()  # nothing that looks finished
    runner = Runner(compose_micro(micro_copy, "stages=[extract]"))
    runner.run()
    assert runner.status == {"backbone": "reused", "extract": "computed"}
    assert not partial.exists()

    def shards(files):
        return {name: digest for name, digest in files.items() if name.endswith(".npy") or "index" in name}

    assert shards(_files(final)) == shards(_files(original))  # exactly the uninterrupted run's shards


def test_sigkill_during_head_training_resumes_from_checkpoint(micro_run, micro_copy, caplog):
    original, _ = _entry(micro_run[0], "heads")
    _drop(micro_copy, "heads", "metrics", "calibrate", "early_exit", "decoding")
    final, partial = _entry(micro_copy, "heads")
    _kill_when(micro_copy, ["stages=[heads]"], lambda: (partial / "checkpoints" / "last.ckpt").is_file())
    assert not final.exists()
    with caplog.at_level(logging.INFO):
        runner = Runner(compose_micro(micro_copy, "stages=[heads]"))
        runner.run()
    assert runner.status == {"backbone": "reused", "extract": "reused", "heads": "computed"}
    assert "resuming head training" in caplog.text
    assert _files(final)["heads.safetensors"] == _files(original)["heads.safetensors"]


def test_sigkill_during_decoding_then_rerun_reuses_upstream(micro_copy):
    _drop(micro_copy, "decoding")
    final, partial = _entry(micro_copy, "decoding")
    _kill_when(micro_copy, ["stages=[decoding]"], lambda: partial.is_dir())
    assert not final.exists()
    runner = Runner(compose_micro(micro_copy, "stages=[decoding]"))
    runner.run()
    assert runner.status["decoding"] == "computed"
    assert all(status == "reused" for name, status in runner.status.items() if name != "decoding")
    assert (final / SUCCESS_FILE).is_file()


# --- 2. corruption --------------------------------------------------------------------------------------------


def test_truncated_shard_is_detected_before_use(micro_copy):
    final, _ = _entry(micro_copy, "extract")
    shard = final / "train" / "hidden_00001.npy"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(StageOutputError, match=r"hidden_00001\.npy.*truncated.*force=\[extract\]"):
        Runner(compose_micro(micro_copy, "stages=[heads]", "force=[heads]")).run()


def test_altered_heads_file_is_detected_before_use(micro_copy):
    final, _ = _entry(micro_copy, "heads")
    weights = final / "heads.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(StageOutputError, match=r"heads\.safetensors.*checksum.*force=\[heads\]"):
        Runner(compose_micro(micro_copy, "stages=[metrics]", "force=[metrics]")).run()


def test_altered_thresholds_file_is_detected_in_a_real_run(micro_copy):
    final, _ = _entry(micro_copy, "calibrate")
    thresholds = final / "thresholds.json"
    thresholds.write_text(thresholds.read_text().replace('"entropy"', '"max_prob"'))
    result = run_micro(micro_copy, "stages=[early_exit]", "force=[early_exit]")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "thresholds.json" in output and "force=[calibrate]" in output
    assert "Traceback" not in output


# --- 3. bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.head_layers=[0,9]"], "out of range"),
        (["calibrate.eps=[0.9,1.5]"], "outside"),
        (["decoding.eps=[0]"], "outside"),
        (["data.budgets.validation=100000000"], "cannot come from the validation split"),
        (["data.seq_len=4096"], "maximum sequence length"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, overrides, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.time()
    with pytest.raises(USER_ERRORS, match=message):
        Runner(compose_micro(tmp_path / "out", *overrides)).run()
    assert time.time() - started < 30
    assert not list((tmp_path / "out").rglob(SUCCESS_FILE))


def test_hub_model_without_network_fails_fast(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from .micro import CONF_DIR

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["model=pythia-70m", "data=minipile", "logger=none", f"paths.root={tmp_path}"],
        )
    started = time.time()
    with pytest.raises(USER_ERRORS, match="unreachable.*model=tiny"):
        Runner(cfg).run()
    assert time.time() - started < 30


def test_disk_too_small_for_extraction(tmp_path, monkeypatch):
    import pipeline.stages.extract as extract

    monkeypatch.setattr(extract.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(extract.DiskSpaceError, match="data.budgets"):
        Runner(compose_micro(tmp_path / "out")).run()


def test_unknown_model_on_the_command_line(tmp_path):
    result = run_micro(tmp_path / "out", "model=pythia-7b")
    assert result.returncode != 0
    assert "pythia-70m" in result.stderr and "Traceback" not in result.stderr


def test_wandb_online_without_network_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    import pipeline.orchestration.tracking as tracking

    monkeypatch.setattr(tracking, "_wandb_reachable", lambda: False)
    cfg = compose_micro(tmp_path / "out", "logger=wandb", "logger.mode=online")
    with caplog.at_level(logging.WARNING), tracking.make_tracker(cfg, "extract", "test") as tracker:
        assert tracker.run.settings.mode == "offline"
        tracker.log({"x": 1.0})
    assert "falling back" in caplog.text or "offline instead" in caplog.text
    assert list((tmp_path / "out" / "wandb").rglob("*.wandb"))


# --- 5. concurrency -------------------------------------------------------------------------------------------


def test_two_processes_needing_the_same_extraction_compute_it_once(micro_copy):
    _drop(micro_copy, "extract", "heads", "metrics", "calibrate", "early_exit", "decoding")
    procs = [
        subprocess.Popen(
            micro_command(micro_copy, "stages=[extract]"),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    computed = sum("stage extract    tiny: computing" in out for out in outputs)
    # The second process either waited on the lock ("finished by another process") or, when the first one
    # finished before it looked, found the output complete ("finished output reused"): computed once either way.
    reused = sum(
        "stage extract    tiny: finished by another process" in out
        or "stage extract    tiny: finished output reused" in out
        for out in outputs
    )
    assert (computed, reused) == (1, 1), outputs


# --- 6. determinism -------------------------------------------------------------------------------------------


def test_same_config_and_seed_give_identical_artifacts(micro_run, tmp_path):
    root, first_runner, first = micro_run
    second_runner = Runner(
        compose_micro(tmp_path / "again", "stages=[backbone,extract,heads,metrics,calibrate]")
    )
    second = second_runner.run()
    assert second_runner.keys["calibrate"] == first_runner.keys["calibrate"]
    for stage, name in [
        ("backbone", "model/model.safetensors"),
        ("heads", "heads.safetensors"),
        ("calibrate", "thresholds.json"),
    ]:
        a = _files(first_runner.store.entry(stage, "tiny", first_runner.keys[stage]))
        b = _files(second_runner.store.entry(stage, "tiny", second_runner.keys[stage]))
        assert a[name] == b[name], f"{stage}/{name} differs between identical runs"

    def stable(frame):
        keep = ~frame["metric"].astype(str).str.contains("|".join(TIMING_METRICS))
        keep &= frame["stage"].isin(["backbone", "extract", "heads", "metrics", "calibrate"])
        return frame[keep].sort_values([*LABELS, "metric", "head", "eps"]).reset_index(drop=True)

    a, b = stable(first), stable(second)
    assert len(a) == len(b)
    assert a[LABELS + ["metric"]].equals(b[LABELS + ["metric"]])
    assert (a["value"].fillna(-1) == b["value"].fillna(-1)).all()


# --- 7. fuzzed config surface ---------------------------------------------------------------------------------

INVALID = [
    "calibrate.eps=[1.5]",
    "calibrate.eps=[-0.2]",
    "calibrate.delta=2",
    "model.head_layers=[10]",
    "model.head_layers=[2,1]",
    "data.seq_len=100000",
    "heads.max_steps=-1",
    "decoding.eps=[0]",
    "stages=[nope]",
    "force=[nope]",
    "model.dtype=float8",
    "data.budgets.train=1",
    "heads.head_type=foo",
    "calibrate.metric=bogus",
    "heads.init=xavier",
    "decoding.max_draft=0",
    "early_exit.eps=[0.123]",
    "evaluate.eps=[0.8]",  # renamed to early_exit (issue 13)
    "calibrate.rc_points=11",  # moved to metrics (issue 13)
    "metrics.metrics=[bogus]",
    "extract.batch_size=0",
    "decoding.n_prompts=abc",
    "device=tpu",
    "model=nope",
    "trainer=nope",
    "heads.lr=abc",
    "decoding.layerskip_d=[0]",
    "calibrate.methods=[magic]",
    "model.head_layers=[]",
]


def test_random_invalid_overrides_give_clear_errors_and_no_outputs(tmp_path):
    rng = random.Random(0)
    for i, override in enumerate(rng.sample(INVALID, len(INVALID))):
        root = tmp_path / f"out{i}"
        try:
            Runner(compose_micro(root, "stages=[all]", override)).validate()
        except (*USER_ERRORS, HydraException, OmegaConfBaseException, ValueError) as err:
            assert str(err).strip(), f"{override}: empty message"
        else:
            pytest.fail(f"{override} was accepted")
        assert not list(root.rglob(SUCCESS_FILE))


@pytest.mark.parametrize(
    "override, message",
    [
        ("calibrate.eps=[1.5]", "outside"),
        ("device=tpu", "tpu"),
        ("heads.head_type=foo", "heads.head_type=foo: choose one of"),
        ("evaluate.limit=8", "renamed to `early_exit` (issue 13): use early_exit.limit=8"),
        ("metrics.bogus=1", "metrics.bogus"),
    ],
)
def test_invalid_override_on_the_command_line_has_no_traceback(tmp_path, override, message):
    result = run_micro(tmp_path / "out", override)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output and message in output, output  # Hydra's own errors or `ConfigError: ...`
    assert not list((tmp_path / "out").rglob(SUCCESS_FILE))
