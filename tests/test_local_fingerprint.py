"""Local backbones are keyed by content (issue 15): different weights saved into the same directory must not
reuse the old backbone or extraction; a local directory records no revision; a hub model keeps its pin."""

from __future__ import annotations

import json
import time

import pytest
from hydra import compose, initialize_config_dir

from pipeline.data.checksums import remembered_sha256
from pipeline.models.backbone import BACKBONE_RECORD, local_model_fingerprint
from pipeline.models.tiny_model import train_tokenizer
from pipeline.orchestration.runner import Runner, available_stages, plan_keys

from .conftest import tiny_gpt_neox
from .micro import CONF_DIR


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"def f{i}(x):\n    return x + {i}\n" * 3 for i in range(40)]
    return train_tokenizer(iter(texts), vocab_size=128, model_max_length=256)


def _save(directory, tokenizer, seed: int) -> None:
    tiny_gpt_neox(num_layers=4, d_model=32, vocab=128, seed=seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _config(source, root, *extra: str):
    overrides = [
        "model=pythia-70m",  # pins revision step143000, which must not apply to a local directory
        f"model.source={source}",
        "model.num_layers=4",
        "model.d_model=32",
        "model.head_layers=[0,1,2]",
        "model.max_seq_len=256",
        "data.seq_len=64",
        "data.budgets.train=1024",
        "data.budgets.validation=256",
        "data.budgets.test=256",
        "logger=none",
        "progress=false",
        "figures=false",
        f"paths.root={root}",
        *extra,
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _keys(cfg) -> dict[str, str]:
    return plan_keys(cfg, available_stages())[0]


def test_resaved_weights_change_the_backbone_and_extract_keys(tmp_path, tokenizer):
    model_dir = tmp_path / "model"
    _save(model_dir, tokenizer, seed=0)
    cfg = _config(model_dir, tmp_path / "out")
    first = _keys(cfg)
    _save(model_dir, tokenizer, seed=0)  # same weights written again: new mtimes, same content
    assert _keys(cfg) == first
    _save(model_dir, tokenizer, seed=1)  # different weights, same directory
    second = _keys(cfg)
    assert second["backbone"] != first["backbone"] and second["extract"] != first["extract"]
    assert all(second[stage] != first[stage] for stage in second)  # every stage reads the backbone
    # The tokenizer is part of the content too.
    (model_dir / "tokenizer.json").write_text(
        (model_dir / "tokenizer.json").read_text().replace("128", "129", 1)
    )
    assert _keys(cfg)["backbone"] != second["backbone"]


def test_local_directory_records_no_revision_and_resaving_recomputes(tmp_path, tokenizer):
    model_dir = tmp_path / "model"
    _save(model_dir, tokenizer, seed=0)
    root = tmp_path / "out"
    cfg = _config(model_dir, root, "stages=[backbone]")
    assert cfg.model.revision == "step143000"
    runner = Runner(cfg)
    runner.run()
    assert runner.status["backbone"] == "computed"
    record = json.loads(
        (runner.store.entry("backbone", "pythia-70m", runner.keys["backbone"]) / BACKBONE_RECORD).read_text()
    )
    assert record["revision"] is None and record["local"] is False
    assert runner.key_configs["backbone"]["revision"] is None

    again = Runner(cfg)
    again.run()
    assert again.status["backbone"] == "reused"

    _save(model_dir, tokenizer, seed=1)
    resaved = Runner(cfg)
    resaved.run()
    assert resaved.status["backbone"] == "computed"
    entry = resaved.store.entry("backbone", "pythia-70m", resaved.keys["backbone"])
    assert json.loads((entry / BACKBONE_RECORD).read_text())["fingerprint"] != record["fingerprint"]


def test_hub_model_keeps_its_pinned_revision(tmp_path):
    cfg = _config("EleutherAI/pythia-70m", tmp_path / "out")
    _, key_configs = plan_keys(cfg, available_stages())
    assert key_configs["backbone"] == {"source": "EleutherAI/pythia-70m", "revision": "step143000"}


def test_file_digests_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import pipeline.data.checksums as checksums

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    memo = tmp_path / "cache" / "file_hashes.json"
    first = remembered_sha256(weights, memo)
    hashed = []
    real = checksums.file_sha256
    monkeypatch.setattr(checksums, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert remembered_sha256(weights, memo) == first and hashed == []  # unchanged: read from the memo
    time.sleep(0.05)  # past the file system's timestamp granularity, as any real re-save is
    weights.write_bytes(b"b" * 1000)  # same size, new content and mtime
    assert remembered_sha256(weights, memo) != first and len(hashed) == 1
    memo.write_text("{not json")  # a damaged memo is ignored, never trusted
    assert remembered_sha256(weights, memo) == real(weights)


def test_a_directory_without_model_files_is_a_clear_error(tmp_path):
    from pipeline.models.backbone import BackboneError

    (tmp_path / "README.md").write_text("no weights here")
    with pytest.raises(BackboneError, match="holds no model files"):
        local_model_fingerprint(tmp_path)
