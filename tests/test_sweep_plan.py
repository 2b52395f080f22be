"""`python -m pipeline.sweep --plan` (issue 15): one line per job a command would run, nothing run; the
full sweep's budgets against MiniPile's splits; and the estimate's disk/time terms for the head checkpoint,
the model download and hashing."""

from __future__ import annotations

import pytest

from pipeline.command_line import compose_jobs
from pipeline.sweep.__main__ import main
from pipeline.sweep.estimate import CHECKPOINT_COPIES, DOWNLOAD_GB_PER_S, HASH_GB_PER_S, estimate_table
from pipeline.sweep.plan import plan_rows, plan_table

from .test_preflight import MINIPILE_SPLITS

FULL_SWEEP_MODELS = ["pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b", "pythia-1.4b", "pythia-2.8b"]
# Pythia's tokenizer on MiniPile: ~4.1 bytes per token (validation: ~0.68M tokens from 2.78 MB).
PYTHIA_BYTES_PER_TOKEN = 4.1


@pytest.fixture(scope="module")
def full_sweep():
    return compose_jobs(["+experiment=full_sweep"])


def test_full_sweep_plan_has_one_line_per_job(full_sweep):
    table = plan_rows(full_sweep)
    assert list(table.model) == FULL_SWEEP_MODELS
    first = table.iloc[0]
    assert (first.model, first.heads, first.head_layers) == ("pythia-70m", "linear", "1,2,3,4")
    assert (first.train, first.validation, first.test) == ("16.0M", "0.5M", "1.0M")
    assert first.checkpoint_gb == pytest.approx(1.24, abs=0.01)  # issue 15 measured last.ckpt: 1.24 GB
    assert (table.shards_gb <= 100).all() and (table.gpu_h > 0).all()
    assert (table.disk_gb > table.shards_gb + table.checkpoint_gb).all()


def test_full_sweep_budgets_fit_minipile_with_margin(full_sweep):
    """Every job's budget is at most 80% of its MiniPile split's estimated Pythia token count (validation:
    ~0.68M tokens, so at most ~0.54M)."""
    for job in full_sweep:
        for split, budget in job.data.budgets.items():
            n_bytes, _ = MINIPILE_SPLITS[split]
            assert int(budget) <= 0.8 * n_bytes / PYTHIA_BYTES_PER_TOKEN, (job.model.name, split, budget)


def test_cli_plan_runs_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["--plan", "+experiment=smoke"])
    out = capsys.readouterr().out
    assert "2 job(s), nothing run" in out and "ESTIMATE" in out
    assert "(1 extraction(s), shared" in out  # both head types read one extraction
    assert [line.split()[2] for line in out.splitlines() if line.strip()[:1] in "01"] == ["linear", "mlp"]
    assert list(tmp_path.iterdir()) == []


def test_plan_narrows_with_overrides_typed_anywhere():
    table = plan_table(["+experiment=full_sweep", "-m", "model=pythia-70m", "seed=0,1"])
    assert list(table.model) == ["pythia-70m", "pythia-70m"]
    assert ["seed=0" in table.overrides[0], "seed=1" in table.overrides[1]] == [True, True]
    single = plan_table(["data.budgets.train=4096"])
    assert len(single) == 1 and single.train[0] == "4,096"


def test_estimate_counts_checkpoint_model_download_and_hashing():
    table = estimate_table(["pythia-70m", "pythia-2.8b"])
    for _, row in table.iterrows():
        assert row.checkpoint_gb == pytest.approx(CHECKPOINT_COPIES * row.heads_gb)
        assert row.disk_gb == pytest.approx(row.extract_gb + row.heads_gb + row.checkpoint_gb + row.model_gb)
        assert row.hash_h == pytest.approx((row.extract_gb + row.model_gb) / HASH_GB_PER_S / 3600)
        assert row.download_h == pytest.approx(row.model_gb / DOWNLOAD_GB_PER_S / 3600)
    # pythia-70m's model.safetensors on the hub: 166 MB (fp16 weights + six 2048² causal masks).
    assert table.loc["pythia-70m", "model_gb"] == pytest.approx(0.166, abs=0.002)
    assert table.loc["pythia-2.8b", "checkpoint_gb"] == pytest.approx(6.2, abs=0.05)  # issue 15: 6.2 GB
