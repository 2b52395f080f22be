import json

import pytest

from pipeline.orchestration.store import SUCCESS_FILE, StageOutputError, StageStore, stage_key


def test_stage_key_is_stable_and_sensitive():
    base = stage_key("heads", {"lr": 1e-4, "steps": 10}, {"extract": "abc"})
    assert base == stage_key("heads", {"steps": 10, "lr": 1e-4}, {"extract": "abc"})  # order-free
    assert base != stage_key("heads", {"lr": 2e-4, "steps": 10}, {"extract": "abc"})
    assert base != stage_key("heads", {"lr": 1e-4, "steps": 10}, {"extract": "abd"})
    assert base != stage_key("metrics", {"lr": 1e-4, "steps": 10}, {"extract": "abc"})


def test_writing_publishes_only_on_success(tmp_path):
    store = StageStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.lock("s", "m", "k"), store.writing("s", "m", "k", {}) as (work, _):
            (work / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash")
    assert not store.is_complete("s", "m", "k")
    assert not store.entry("s", "m", "k").exists()
    with store.lock("s", "m", "k"), store.writing("s", "m", "k", {"config": {"a": 1}}) as (work, _):
        assert not (work / "half.bin").exists()  # a non-resumable stage starts clean
        (work / "out.txt").write_text("done")
    assert store.is_complete("s", "m", "k")
    record = json.loads((store.entry("s", "m", "k") / SUCCESS_FILE).read_text())
    assert record["files"]["out.txt"]["bytes"] == 4
    assert {"versions", "git_revision", "seconds", "config"} <= set(record)
    store.verify("s", "m", "k")


def test_verify_detects_truncation_and_alteration(tmp_path):
    store = StageStore(tmp_path)
    with store.lock("s", "m", "k"), store.writing("s", "m", "k", {}) as (work, _):
        (work / "a.bin").write_bytes(b"0123456789")
    path = store.entry("s", "m", "k") / "a.bin"
    path.write_bytes(b"01234")
    with pytest.raises(StageOutputError, match="truncated"):
        store.verify("s", "m", "k")
    path.write_bytes(b"0123456780")
    with pytest.raises(StageOutputError, match=r"checksum.*force=\[s\]"):
        store.verify("s", "m", "k")


def test_forced_rewrite_keeps_old_output_until_new_one_is_complete(tmp_path):
    store = StageStore(tmp_path)
    with store.lock("s", "m", "k"), store.writing("s", "m", "k", {}) as (work, _):
        (work / "v.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with store.lock("s", "m", "k"), store.writing("s", "m", "k", {}) as (work, _):
            (work / "v.txt").write_text("new")
            raise RuntimeError("crash during recompute")
    assert (store.entry("s", "m", "k") / "v.txt").read_text() == "old"
    with store.lock("s", "m", "k"), store.writing("s", "m", "k", {}) as (work, _):
        (work / "v.txt").write_text("new")
    assert (store.entry("s", "m", "k") / "v.txt").read_text() == "new"
    assert [p.name for p in store.entry("s", "m", "k").parent.iterdir() if p.is_dir()] == ["k"]
