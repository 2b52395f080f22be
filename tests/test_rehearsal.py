"""The Pythia-shaped rehearsal (pipeline/models/rehearsal.py, conf/experiment/pythia_rehearsal.yaml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from pipeline.data.tokens import make_text_source
from pipeline.models.rehearsal import (
    RECORD,
    build_rehearsal_model,
    ensure_rehearsal_model,
    rehearsal_settings,
)
from pipeline.orchestration.results import RESULTS_FILE
from pipeline.orchestration.validation import ConfigError

from .conftest import ListSource
from .micro import CONF_DIR, REPO

PYTHIA_70M_PARAMS = 70_426_624  # EleutherAI/pythia-70m


def test_settings_reject_unknown_keys_and_shapes():
    with pytest.raises(ConfigError, match="unknown rehearsal key"):
        rehearsal_settings({"shapes": "pythia-70m"})
    with pytest.raises(ConfigError, match="pythia-160m"):
        rehearsal_settings({"shape": "pythia-7b"})
    with pytest.raises(ConfigError, match="embedding rows"):
        rehearsal_settings({"vocab_size": 60_000})


@pytest.mark.slow  # two 70M-parameter builds: ~45 s on a busy 2-core machine
def test_the_model_has_pythia_70m_shape_and_rebuilds_identically(tmp_path):
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    text = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 50
    source = ListSource({"train": [text]}, fingerprint="code")
    settings = {"vocab_size": 300, "tokenizer_max_bytes": 10_000}
    first = build_rehearsal_model(settings, source, tmp_path / "a")
    second = build_rehearsal_model(settings, source, tmp_path / "b")

    model = GPTNeoXForCausalLM.from_pretrained(first)
    assert sum(p.numel() for p in model.parameters()) == PYTHIA_70M_PARAMS
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (
        512,
        6,
        50304,
    )
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert tokenizer.decode(tokenizer.encode(text[:40])) == text[:40]
    assert model.config.eos_token_id == tokenizer.eos_token_id
    # Same settings, same files: the backbone's content fingerprint (and every cached stage) stays valid.
    for name in ("model.safetensors", "tokenizer.json", RECORD):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert not list(tmp_path.glob("*.partial"))


def test_ensure_reuses_a_finished_directory(tmp_path, monkeypatch):
    import pipeline.models.rehearsal as rehearsal

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["+experiment=pythia_rehearsal", f"paths.root={tmp_path}"]
        )
    out_dir = tmp_path / "models" / "pythia-70m-rehearsal"
    assert str(cfg.model.source) == str(out_dir)
    built = []
    monkeypatch.setattr(rehearsal, "build_rehearsal_model", lambda s, src, d: built.append(d) or d)
    ensure_rehearsal_model(cfg)
    assert built == [out_dir]  # nothing there yet
    settings = rehearsal_settings(dict(cfg.rehearsal))
    fingerprint = make_text_source(cfg.data).fingerprint
    out_dir.mkdir(parents=True)
    (out_dir / RECORD).write_text(json.dumps({"settings": settings, "corpus_fingerprint": fingerprint}))
    ensure_rehearsal_model(cfg)
    assert built == [out_dir]  # finished, same settings and corpus: reused
    cfg.rehearsal.seed = 1
    ensure_rehearsal_model(cfg)
    assert built == [out_dir, out_dir]  # other weights asked for: rebuilt


@pytest.mark.slow
def test_rehearsal_runs_every_stage(tmp_path):
    """The whole rehearsal through the command line, with budgets smaller still (about 5 minutes on 2 cores)."""
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "+experiment=pythia_rehearsal",
        f"paths.root={tmp_path}",
        "logger=none",
        "progress=false",
        "figures=false",
        "heads.max_steps=4",
        "heads.val_every_n_steps=4",
        "heads.checkpoint_every_n_steps=4",
        "early_exit.limit=2",
        "decoding.n_prompts=1",
        "decoding.max_new_tokens=8",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    stages = ("backbone", "extract", "heads", "metrics", "calibrate", "early_exit", "decoding")
    for stage in stages:
        assert f"stage {stage:<10} pythia-70m-rehearsal: done in" in output, stage
    (results,) = (tmp_path / "runs").rglob(RESULTS_FILE)
    frame = pd.read_csv(results)
    assert set(frame["stage"]) == set(stages)
    backbone = frame[(frame["stage"] == "backbone") & (frame["metric"] == "n_params")]
    assert backbone["value"].tolist() == [PYTHIA_70M_PARAMS]
