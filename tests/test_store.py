import json
import os
from pathlib import Path

import pytest

from pipeline.orchestration.store import SUCCESS_FILE, StageOutputError, StageStore, stage_key, verify_tree


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


def _count_reads(monkeypatch, suffix: str) -> list[str]:
    """Record every opening for reading of a file whose name ends with `suffix`."""
    import builtins
    import io

    reads: list[str] = []
    real_open = builtins.open

    def spying_open(file, mode="r", *args, **kwargs):
        if "r" in mode and str(file).endswith(suffix):
            reads.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spying_open)
    monkeypatch.setattr(io, "open", spying_open)
    return reads


def test_shards_are_hashed_once_as_they_are_written(tmp_path, monkeypatch):
    """Writing a split and publishing the stage output reads no shard back: each shard's sha256 is computed
    while its bytes go to disk, and the completion record reuses it."""
    import numpy as np
    import torch

    from pipeline.data.checksums import file_sha256
    from pipeline.data.shards import ShardWriter

    store = StageStore(tmp_path)
    reads = _count_reads(monkeypatch, ".npy")
    with store.lock("extract", "m", "k"), store.writing("extract", "m", "k", {}) as (work, _):
        writer = ShardWriter(work / "train", n_slots=2, d_model=4, shard_tokens=8)
        writer.add(torch.randn(20, 2, 4), torch.arange(20))
        index = writer.close()
    assert reads == []
    monkeypatch.undo()
    record = store.record("extract", "m", "k")
    final = store.entry("extract", "m", "k")
    assert len(index["shards"]) == 3
    for shard in index["shards"]:
        for name in (shard["hidden"], shard["tokens"]):
            path = final / "train" / name
            assert shard["sha256"][name] == file_sha256(path) == record["files"][f"train/{name}"]["sha256"]
            assert shard["bytes"][name] == path.stat().st_size
    assert np.load(final / "train" / "hidden_00002.npy").shape == (4, 2, 4)
    store.verify("extract", "m", "k", full=True)


def _publish_large_file(store, monkeypatch) -> Path:
    from pipeline.orchestration import store as store_module

    monkeypatch.setattr(store_module, "LARGE_FILE_BYTES", 1000)  # a.bin counts as large, b.txt as small
    with store.lock("s", "m", "k"), store.writing("s", "m", "k", {}) as (work, _):
        (work / "a.bin").write_bytes(bytes(range(256)) * 8)
        (work / "b.txt").write_text("small")
    return store.entry("s", "m", "k") / "a.bin"


def _alter_in_place(path: Path, keep_mtime: bool) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    else:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_reuse_rehashes_a_large_file_only_when_its_size_or_mtime_changed(tmp_path, monkeypatch):
    store = StageStore(tmp_path)
    large = _publish_large_file(store, monkeypatch)
    reads = _count_reads(monkeypatch, "a.bin")
    store.verify("s", "m", "k")
    assert reads == []  # size and mtime as recorded: no re-read of the large file
    _alter_in_place(large, keep_mtime=False)
    reads.clear()
    with pytest.raises(StageOutputError, match=r"a\.bin.*checksum"):
        store.verify("s", "m", "k")
    assert len(reads) == 1  # mtime changed: re-hashed
    large.write_bytes(large.read_bytes()[:-1])
    with pytest.raises(StageOutputError, match=r"a\.bin.*truncated"):
        store.verify("s", "m", "k")


def test_explicit_full_verify_catches_what_the_cheap_check_cannot(tmp_path, monkeypatch):
    """The documented trade-off: a same-size in-place change of a large file that also restores its mtime
    passes the cheap check on reuse; `full=True` (python -m pipeline.orchestration.store) catches it."""
    store = StageStore(tmp_path)
    large = _publish_large_file(store, monkeypatch)
    _alter_in_place(large, keep_mtime=True)
    store.verify("s", "m", "k")
    with pytest.raises(StageOutputError, match=r"a\.bin.*checksum"):
        store.verify("s", "m", "k", full=True)
    assert verify_tree(tmp_path) == [f"{large} does not match its checksum (altered or corrupt)"]


def test_small_files_are_always_rehashed_on_reuse(tmp_path, monkeypatch):
    store = StageStore(tmp_path)
    _publish_large_file(store, monkeypatch)
    small = store.entry("s", "m", "k") / "b.txt"
    stat = small.stat()
    small.write_text("SMALL")
    os.utime(small, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(StageOutputError, match=r"b\.txt.*checksum"):
        store.verify("s", "m", "k")
