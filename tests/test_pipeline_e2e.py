"""Every stage end to end on the micro tiny model, in process: rows, artifacts, reuse on rerun."""

from __future__ import annotations

import json
import time

from pipeline.data.shards import ShardReader
from pipeline.exits.heads import EarlyExitHeads
from pipeline.models.backbone import load_from_stage_output
from pipeline.orchestration.runner import Runner, available_stages

from .micro import compose_micro


def test_every_stage_wrote_rows(micro_run):
    _, runner, results = micro_run
    assert set(results["stage"]) == set(available_stages())
    assert set(results["model"]) == {"tiny"}
    assert all(runner.status[name] == "computed" for name in runner.requested)


def test_backbone_and_extract_records(micro_run):
    root, runner, results = micro_run
    assert results.query("stage == 'backbone' and metric == 'val_ppl'")["value"].iloc[0] > 1
    extract_dir = runner.store.entry("extract", "tiny", runner.keys["extract"])
    meta = json.loads((extract_dir / "meta.json").read_text())
    assert meta["layers"] == [0, 1, 2] and meta["d_model"] == 64 and meta["dtype"] == "float16"
    assert {s: v["n_tokens"] for s, v in meta["splits"].items()} == {
        "train": 8192,
        "validation": 4096,
        "test": 4096,
    }
    reader = ShardReader(extract_dir / "train", verify=True)
    assert len(reader) == 8192 and reader.n_slots == 4
    record = json.loads((extract_dir / "_SUCCESS.json").read_text())
    assert record["upstream"] == {"backbone": runner.keys["backbone"]}
    assert "train/hidden_00000.npy" in record["files"]


def test_heads_beat_the_logit_lens(micro_run):
    _, runner, results = micro_run
    heads = results.query("stage == 'heads' and metric == 'kl'")
    trained = heads[heads.setting == "trained"].set_index("head")["value"]
    lens = heads[heads.setting == "logit_lens"].set_index("head")["value"]
    assert len(trained) == 3
    assert (trained < lens).all(), (trained, lens)
    backbone, _ = load_from_stage_output(
        runner.store.entry("backbone", "tiny", runner.keys["backbone"]), with_tokenizer=False
    )
    loaded = EarlyExitHeads.load(runner.store.entry("heads", "tiny", runner.keys["heads"]), backbone)
    assert loaded.layers == [0, 1, 2]


def test_metrics_and_calibration_rows(micro_run):
    _, _, results = micro_run
    auroc = results.query("stage == 'metrics' and metric == 'auroc'")
    assert {"entropy", "max_prob", "prob_margin", "logit_margin"} <= set(auroc["confidence"])
    assert auroc["value"].dropna().between(0, 1).all()  # saturation is undefined (NaN) at head 0
    policy = results.query("stage == 'calibrate' and head == 'all' and metric == 'accuracy'")
    assert set(policy["calibration"]) == {"empirical", "ltt"}


def test_benchmark_rows(micro_run):
    _, _, results = micro_run
    accuracy = results.query("stage == 'early_exit' and metric.str.startswith('acc/')", engine="python")
    assert set(accuracy["setting"]) == {"full", "early_exit"}
    assert {"", "empirical"} <= set(accuracy["calibration"])


def test_decoding_is_lossless(micro_run):
    _, _, results = micro_run
    identical = results.query("stage == 'decoding' and metric == 'identical'")
    assert len(identical) and (identical["value"] == 1).all()


def test_rerun_reuses_everything_in_seconds(micro_run):
    root, runner, results = micro_run
    started = time.time()
    again = Runner(compose_micro(root))
    rerun = again.run()
    assert all(status == "reused" for status in again.status.values())
    assert time.time() - started < 30
    assert len(rerun) == len(results)


def test_changing_one_stage_config_recomputes_only_that_stage(micro_copy):
    runner = Runner(compose_micro(micro_copy, "metrics.rc_points=11"))  # read by the metrics stage only
    runner.run()
    assert runner.status["metrics"] == "computed"
    assert all(status == "reused" for name, status in runner.status.items() if name != "metrics")


def test_run_directory_has_results_and_tables(micro_run):
    root, _, _ = micro_run
    assert (root / "run" / "results.csv").is_file()
    assert (root / "run" / "tables" / "metrics" / "token_metrics.parquet").is_file()
