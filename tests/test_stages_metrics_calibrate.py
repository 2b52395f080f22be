"""The metrics and calibrate stages on a tiny random GPT-NeoX, with hand-made upstream outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipeline.config import typed_group
from pipeline.data.shards import ShardWriter
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.thresholds import ExitThresholds
from pipeline.models.backbone import BACKBONE_RECORD, LOCAL_MODEL_DIR
from pipeline.orchestration.tracking import Tracker
from pipeline.orchestration.validation import ConfigError
from pipeline.stages import calibrate as calibrate_stage
from pipeline.stages import metrics as metrics_stage
from pipeline.stages.base import StageContext
from tests.conftest import tiny_gpt_neox

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [0, 1, 2]


def make_cfg(calibrate=None, metrics=None):
    """The two stages' groups at their schema defaults (pipeline/config), with dotted-key overrides."""
    groups = {}
    for group, overrides in (("calibrate", calibrate), ("metrics", metrics)):
        groups[group] = typed_group(group, {"batch_tokens": 100})
        for key, value in (overrides or {}).items():
            OmegaConf.update(groups[group], key, value)
    return OmegaConf.create({"model": {"name": "tiny-test", "dtype": "float32"}, "seed": 0, **groups})


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream")
    model = tiny_gpt_neox(num_layers=4, d_model=32, vocab=128, seed=0)
    backbone_dir = root / "backbone"
    model.save_pretrained(backbone_dir / LOCAL_MODEL_DIR)
    (backbone_dir / BACKBONE_RECORD).write_text(
        json.dumps({"local": True, "source": "tiny", "revision": None})
    )
    torch.manual_seed(0)
    for split in ("train", "validation", "test"):  # train: where pruned signals take their candidates
        ids = torch.randint(0, 128, (8, 64))
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        writer = ShardWriter(root / "extract" / split, n_slots=len(LAYERS) + 1, d_model=32, shard_tokens=300)
        writer.add(torch.stack([hs[i + 1] for i in LAYERS] + [hs[-1]], dim=2).flatten(0, 1), ids.flatten())
        writer.close()
    EarlyExitHeads.from_backbone(model, LAYERS).save(root / "heads")  # logit lens: a valid set of heads
    return {"backbone": backbone_dir, "extract": root / "extract", "heads": root / "heads"}


def context(cfg, upstream, out_dir: Path) -> StageContext:
    out_dir.mkdir(parents=True)
    return StageContext(
        cfg=cfg,
        out_dir=out_dir,
        inputs=upstream,
        device=torch.device("cpu"),
        tracker=Tracker(),
        progress=False,
    )


def test_metrics_stage(upstream, tmp_path):
    cfg = make_cfg()
    metrics_stage.STAGE.validate(cfg)
    out = metrics_stage.run(context(cfg, upstream, tmp_path / "metrics"))
    tokens, aucs, curves = out.tables["token_metrics"], out.tables["auroc"], out.tables["risk_coverage"]
    assert len(tokens) == 512 * len(LAYERS)
    signals = metrics_stage.signals(cfg.metrics, 128)  # the metrics, then the pruned signals
    assert set(aucs["metric"]) == set(signals) and aucs.groupby("head")["best"].sum().eq(1).all()
    assert len(curves) == len(LAYERS) * len(signals) * cfg.metrics.rc_points
    auroc_rows = [r for r in out.rows if r["metric"] == "auroc"]
    assert len(auroc_rows) == len(aucs) and {r["head"] for r in auroc_rows} == {0, 1, 2}
    assert all(isinstance(out.metrics[f"best_metric/head{h}"], str) for h in range(len(LAYERS)))


def test_metrics_stage_token_budget(upstream, tmp_path):
    out = metrics_stage.run(
        context(make_cfg(metrics={"max_tokens": 100, "metrics": ["entropy"]}), upstream, tmp_path / "m")
    )
    assert out.tables["token_metrics"]["token"].nunique() == 100


def test_calibrate_stage(upstream, tmp_path):
    cfg = make_cfg(calibrate={"eps": [0.6, 0.9, 1.0]})
    calibrate_stage.STAGE.validate(cfg)
    out_dir = tmp_path / "calibrate"
    out = calibrate_stage.run(context(cfg, upstream, out_dir))
    thresholds = ExitThresholds.load(out_dir / calibrate_stage.THRESHOLDS_FILE)
    assert thresholds.metric == "entropy" and thresholds.layers == LAYERS and thresholds.cascade
    assert thresholds.for_eps("ltt", 1.0).thresholds == (None, None, None)  # ε = 1 cannot be certified
    policy = out.tables["policy"]
    assert len(policy) == 2 * 3 and (policy["n_tokens"] == 512).all()
    rows = {  # the paper's signal's rows (the improved DSSD's own signal has rows of its own)
        (r["calibration"], r["eps"], r["head"], r["metric"]): r["value"]
        for r in out.rows
        if r["confidence"] == "entropy"
    }
    for method in ("empirical", "ltt"):
        for eps in (0.6, 0.9, 1.0):
            for head in range(len(LAYERS)):
                t = thresholds.for_eps(method, eps).thresholds[head]
                assert (
                    np.isnan(rows[(method, eps, head, "threshold")])
                    if t is None
                    else rows[(method, eps, head, "threshold")] == t
                )
            assert (method, eps, "all", "accuracy") in rows and (method, eps, "all", "coverage") in rows


@pytest.mark.parametrize(
    "override, message",
    [
        ({"eps": [0.9, 1.5]}, "outside"),
        ({"delta": 0.0}, "calibrate.delta"),
        ({"metric": "perplexity"}, "calibrate.metric=perplexity: choose one of"),
        ({"methods": ["conformal"]}, "methods"),
        ({"ltt.grid_fraction": 1.0}, "grid_fraction"),
    ],
)
def test_calibrate_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        calibrate_stage.STAGE.validate(make_cfg(calibrate=override))


def test_keys_ignore_batch_size():
    a, b = make_cfg(), make_cfg(calibrate={"batch_tokens": 7}, metrics={"batch_tokens": 7})
    assert calibrate_stage.STAGE.key_config(a) == calibrate_stage.STAGE.key_config(b)
    assert metrics_stage.STAGE.key_config(a) == metrics_stage.STAGE.key_config(b)
    assert calibrate_stage.STAGE.key_config(a) != calibrate_stage.STAGE.key_config(
        make_cfg(calibrate={"delta": 0.1})
    )
