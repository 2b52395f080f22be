"""train_heads / evaluate_heads on a tiny random GPT-NeoX: loss goes down, trained heads beat the logit lens,
artifact round trip, resume, NaN stop, trainer configs (incl. DDP on gloo as a slow test)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from lightning_modules.heads_module import NonFiniteLossError
from pipeline.data.shards import ShardReader
from pipeline.exits.heads import EarlyExitHeads, HeadsMismatchError
from pipeline.exits.training import build_trainer, evaluate_heads, heads_settings, logit_lens, train_heads
from tests.test_lightning_modules import HEAD_LAYERS, tiny_backbone, write_extract

REPO = Path(__file__).resolve().parents[1]
CPU = {
    "accelerator": "cpu",
    "devices": 1,
    "strategy": "auto",
    "precision": "32-true",
    "log_every_n_steps": 10,
}
# Random-init heads, a learning rate suited to a 32-wide model, a few hundred steps (~5 s on one core).
HEADS = {
    "init": "random",
    "lr": 1e-2,
    "warmup_steps": 10,
    "batch_tokens": 256,
    "max_steps": 300,
    "val_tokens": 512,
    "val_every_n_steps": 100,
    "eval_batch_tokens": 512,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These matmuls are tiny: on a shared 2-core machine, intra-op threads only add contention (10x slower).
    # Module scope, so it is in place before the module-scoped training fixture runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_backbone()
    return model, write_extract(model, tmp_path_factory.mktemp("extract") / "train")


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    model, directory = tiny
    out = tmp_path_factory.mktemp("heads")
    heads, metrics = train_heads(
        model, HEAD_LAYERS, directory, HEADS, CPU, seed=0, out_dir=out, progress=False
    )
    return heads, metrics, out


def test_trained_heads_beat_logit_lens_and_lower_the_loss(tiny, trained):
    model, directory = tiny
    heads, metrics, out = trained
    assert metrics["steps"] == 300 and metrics["train_tokens"] == 300 * 256
    assert metrics["train_tokens_per_s"] > 0 and metrics["eval_tokens"] == 512
    # Loss went down: the same random heads before training are far worse on the held-out tokens.
    untrained = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, "linear", "random", seed=0)
    before = evaluate_heads(untrained, ShardReader(directory), model.get_output_embeddings(), 512)
    for b, t, lens in zip(before, metrics["trained"], metrics["logit_lens"], strict=True):
        assert t["layer"] == lens["layer"] and t["n_tokens"] == lens["n_tokens"] == 512
        assert t["kl"] < 0.2 * b["kl"]
        # Bounds that fail if training is broken: measured 0.22/0.11 vs 0.95/0.49 (KL), 0.74/0.80 vs 0.38/0.54.
        assert t["kl"] < 0.5 * lens["kl"], (t, lens)
        assert t["agree"] > lens["agree"] + 0.1, (t, lens)


def test_logged_metric_names(trained):
    _, _, out = trained
    with open(out / "logs" / "version_0" / "metrics.csv") as handle:
        columns = set(next(csv.reader(handle)))
    for i in range(len(HEAD_LAYERS)):
        assert {f"train/kl_head{i}", f"val/kl_head{i}", f"val/agree_head{i}"} <= columns
    assert {"train/loss", "val/loss"} <= columns


def test_artifact_round_trip_and_fingerprint(tiny, trained):
    model, directory = tiny
    heads, _, out = trained
    loaded = EarlyExitHeads.load(out, model)
    hidden = ShardReader(directory).slice(0, 64)[0]
    with torch.no_grad():
        for i in range(len(HEAD_LAYERS)):
            assert torch.equal(loaded(i, hidden[:, i]), heads(i, hidden[:, i]))
    # The teacher's unembedding is not part of the heads artifact.
    assert json.loads((out / "heads.json").read_text())["layers"] == HEAD_LAYERS
    with pytest.raises(HeadsMismatchError, match="fingerprint"):
        EarlyExitHeads.load(out, tiny_backbone(seed=1))


def test_evaluate_logit_lens_matches_direct_computation(tiny):
    model, directory = tiny
    reader = ShardReader(directory)
    scores = evaluate_heads(logit_lens(model, HEAD_LAYERS), reader, model.get_output_embeddings(), 300, 128)
    head_hidden, final_hidden, _ = reader.slice(len(reader) - 300, len(reader))
    norm, unembed = model.gpt_neox.final_layer_norm, model.get_output_embeddings()
    with torch.no_grad():
        teacher = unembed(final_hidden).log_softmax(-1)
        for i, row in enumerate(scores):
            lens = unembed(norm(head_hidden[:, i])).log_softmax(-1)
            kl = (teacher.exp() * (teacher - lens)).sum(-1).mean()
            assert row["kl"] == pytest.approx(float(kl), rel=1e-4)
            assert row["agree"] == pytest.approx(
                float((lens.argmax(-1) == teacher.argmax(-1)).float().mean())
            )


class _StopAt(Callback):
    """Simulates an interruption (or corrupts a weight) once `step` optimizer steps are done."""

    def __init__(self, step: int, action: str):
        self.step, self.action = step, action

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step != self.step:
            return
        if self.action == "interrupt":
            raise RuntimeError("simulated interruption")
        with torch.no_grad():
            next(pl_module.parameters()).fill_(float("nan"))


def test_resume_from_last_checkpoint_equals_uninterrupted_run(tiny, tmp_path):
    model, directory = tiny
    cfg = {**HEADS, "head_type": "mlp", "max_steps": 30, "val_every_n_steps": 10}
    straight, _ = train_heads(model, HEAD_LAYERS, directory, cfg, CPU, 0, tmp_path / "a", progress=False)
    with pytest.raises(RuntimeError, match="simulated"):
        train_heads(
            model,
            HEAD_LAYERS,
            directory,
            cfg,
            CPU,
            0,
            tmp_path / "b",
            progress=False,
            callbacks=[_StopAt(20, "interrupt")],
        )
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "b" / "heads.safetensors").exists()
    resumed, metrics = train_heads(model, HEAD_LAYERS, directory, cfg, CPU, 0, tmp_path / "b", progress=False)
    assert metrics["resumed_from"].endswith("last.ckpt") and metrics["steps"] == 30
    # Same data stream, optimizer and schedule state: the resumed heads are the uninterrupted ones.
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nonfinite_loss_stops_training_and_keeps_last_good_checkpoint(tiny, tmp_path):
    model, directory = tiny
    cfg = {**HEADS, "max_steps": 30, "val_every_n_steps": 10}
    with pytest.raises(NonFiniteLossError, match="loss is nan at global step 15"):
        train_heads(
            model,
            HEAD_LAYERS,
            directory,
            cfg,
            CPU,
            0,
            tmp_path,
            progress=False,
            callbacks=[_StopAt(15, "nan")],
        )
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # plain hparams load safely
    assert ckpt["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (tmp_path / "heads.safetensors").exists()


def test_bf16_mixed_precision_trains_on_cpu(tiny, tmp_path):
    model, directory = tiny
    cfg = {**HEADS, "max_steps": 5, "val_every_n_steps": 5}
    heads, metrics = train_heads(
        model, HEAD_LAYERS, directory, cfg, {**CPU, "precision": "bf16-mixed"}, 0, tmp_path, progress=False
    )
    assert metrics["steps"] == 5 and all(p.dtype == torch.float32 for p in heads.parameters())
    assert all(row["kl"] > 0 for row in metrics["trained"])


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


def test_trainer_configs_compose_and_build(tmp_path):
    gpu = _compose("trainer=gpu").trainer
    assert (gpu.accelerator, gpu.precision) == ("gpu", "bf16-mixed")
    cfg = _compose("trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "heads=mlp")
    assert (cfg.trainer.strategy, cfg.trainer.devices) == ("ddp", 2)
    assert heads_settings(cfg.heads)["head_type"] == "mlp"
    trainer = build_trainer(cfg.trainer, cfg.heads, tmp_path / "checkpoints", logger=False, progress=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
    assert trainer.max_steps == cfg.heads.max_steps
    with pytest.raises(ValueError, match="must not set"):
        build_trainer({**CPU, "max_steps": 3}, cfg.heads, tmp_path, logger=False)
    with pytest.raises(ValueError, match="unknown heads config"):
        heads_settings({"lr": 1e-3, "learning_rate": 1e-3})


DDP_HEADS = dict(
    init="random",
    lr=1e-2,
    warmup_steps=5,
    batch_tokens=128,
    max_steps=20,
    val_tokens=512,
    val_every_n_steps=10,
    eval_batch_tokens=256,
)
DDP_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {repo!r})
from pathlib import Path
from tests.test_lightning_modules import tiny_backbone, HEAD_LAYERS
from pipeline.exits.training import train_heads

torch.set_num_threads(1)
trainer_cfg = dict(accelerator="cpu", devices=2, strategy={strategy!r}, precision="32-true")
# ddp: Lightning re-runs this script for rank 1; ddp_spawn: it spawns workers that run only the fit.
# Only global rank 0 (the main process) writes.
if __name__ == "__main__":
    heads, metrics = train_heads(tiny_backbone(), HEAD_LAYERS, {extract!r}, {heads_cfg!r}, trainer_cfg, 0,
                                 Path({out!r}) / "heads", progress=False)
    if metrics["global_rank"] == 0:
        (Path({out!r}) / "metrics.json").write_text(json.dumps(metrics))
"""


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_two_cpu_processes_on_gloo_equals_one_process_with_twice_the_batch(tiny, tmp_path, strategy):
    model, directory = tiny
    script = tmp_path / "ddp_train.py"
    script.write_text(
        DDP_SCRIPT.format(
            repo=str(REPO), extract=str(directory), heads_cfg=DDP_HEADS, out=str(tmp_path), strategy=strategy
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MASTER_PORT": "29517"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["train_tokens"] == 20 * 128 * 2
    ddp = EarlyExitHeads.load(tmp_path / "heads", model)
    # Rank r's batch k is slice 2k+r of the epoch permutation, so the two ranks together see exactly the
    # tokens of one process's 256-token batch k, and the all-reduced gradient is that batch's gradient.
    single, _ = train_heads(
        model,
        HEAD_LAYERS,
        directory,
        {**DDP_HEADS, "batch_tokens": 256},
        CPU,
        0,
        tmp_path / "single",
        progress=False,
    )
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)


# --- the heads stage -------------------------------------------------------------------------------------------


def _stage_cfg(**heads_overrides):
    cfg = _compose("trainer=cpu", "logger=none")
    cfg.model.head_layers = HEAD_LAYERS
    cfg.model.source, cfg.model.revision, cfg.model.dtype = "tiny-test", None, "float32"
    cfg.data.budgets.train = 4096
    for key, value in {**HEADS, "max_steps": 40, "val_every_n_steps": 20, **heads_overrides}.items():
        cfg.heads[key] = value
    return cfg


def test_heads_stage_writes_heads_and_result_rows(tiny, tmp_path):
    from pipeline.models.backbone import BACKBONE_RECORD, LOCAL_MODEL_DIR
    from pipeline.orchestration.tracking import Tracker
    from pipeline.stages import heads as heads_stage
    from pipeline.stages.base import StageContext

    model, directory = tiny
    backbone_dir, extract_dir = tmp_path / "backbone", directory.parent
    model.save_pretrained(backbone_dir / LOCAL_MODEL_DIR)
    (backbone_dir / BACKBONE_RECORD).write_text(
        json.dumps({"local": True, "source": "tiny", "revision": None})
    )
    (extract_dir / "meta.json").write_text(json.dumps({"layers": HEAD_LAYERS}))
    cfg = _stage_cfg()
    heads_stage.STAGE.validate(cfg)
    out_dir = tmp_path / "heads.partial"
    out_dir.mkdir()
    ctx = StageContext(
        cfg=cfg,
        out_dir=out_dir,
        inputs={"backbone": backbone_dir, "extract": extract_dir},
        device=torch.device("cpu"),
        tracker=Tracker(),
        progress=False,
    )
    output = heads_stage.run(ctx)

    EarlyExitHeads.load(out_dir, model)  # what the metrics/calibrate stages do
    assert not (out_dir / "checkpoints").exists()
    rows = {(r["setting"], r["head"], r["metric"]): r for r in output.rows}
    for method in ("trained", "logit_lens"):
        for head, layer in enumerate(HEAD_LAYERS):
            for metric in ("kl", "agree"):
                assert rows[(method, head, metric)]["layer"] == layer
    assert rows[("trained", None, "train_tokens_per_s")]["value"] > 0
    assert output.metrics["steps"] == 40 and len(output.tables["heads_eval"]) == 2 * len(HEAD_LAYERS)


def test_heads_stage_key_and_validation():
    from hydra.errors import ConfigCompositionException

    from pipeline.orchestration.validation import ConfigError
    from pipeline.stages import heads as heads_stage

    base = heads_stage.STAGE.key_config(_stage_cfg())
    assert base == heads_stage.STAGE.key_config(_stage_cfg(num_workers=3, eval_batch_tokens=64))
    assert base != heads_stage.STAGE.key_config(_stage_cfg(lr=1e-3))
    ddp = _stage_cfg()
    ddp.trainer.devices = 2
    assert heads_stage.STAGE.key_config(ddp)["world_size"] == 2  # global batch doubles: other weights
    assert heads_stage.stage_trainer_cfg(_compose("trainer=ddp").trainer)["strategy"] == "ddp_spawn"
    for override, message in [
        ({"head_type": "conv"}, "head_type"),
        ({"lr": 0.0}, "lr"),
        ({"val_tokens": 4000}, "exceed"),
    ]:
        with pytest.raises(ConfigError, match=message):
            heads_stage.STAGE.validate(_stage_cfg(**override))
    with pytest.raises(ConfigCompositionException, match="learning_rate"):  # the schema has no such key
        _compose("heads.learning_rate=1.0")
