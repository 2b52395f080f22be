"""The comparison report: panels from a summary, local Markdown/HTML/PNG, W&B runs and Report offline."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.sweep.collect import write_summary
from pipeline.sweep.panels import build_panels
from pipeline.sweep.report import FILES_DIR, REPORT_HTML, REPORT_MD, build_report
from pipeline.sweep.wandb_report import WANDB_REPORT_JSON, build_wandb_report, wandb_online
from tests.test_sweep import make_fake_sweep

MODELS = ["pythia-70m", "pythia-160m", "pythia-1b"]


def read_wandb_run(path: Path) -> dict:
    """Name, group, job type and the summary/history keys of an offline W&B run file (`run-<id>.wandb`).

    wandb 0.31 has no Python reader (the writer is Go); the file is a LevelDB-style log of protobuf
    `Record`s: a 7-byte header, then 32 KiB blocks of chunks (crc32, length, type: full/first/middle/last).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, records, partial = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            records.append(partial + chunk)
    out: dict = {"summary": set(), "history": set()}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(name=record.run.display_name, group=record.run.run_group, job_type=record.run.job_type)
        elif kind in ("summary", "history"):
            items = record.summary.update if kind == "summary" else record.history.item
            out[kind] |= {item.key or "/".join(item.nested_key) for item in items}
    return out


def wandb_runs(directory: Path) -> list[dict]:
    return [read_wandb_run(p) for p in sorted(directory.rglob("offline-run-*/run-*.wandb"))]


@pytest.fixture
def summary_and_dir(tmp_path):
    sweep = make_fake_sweep(tmp_path, [(m, {"seed": "0"}) for m in MODELS])
    summary, _ = write_summary(sweep)
    return summary, sweep


def test_panels_cover_the_four_comparisons(summary_and_dir):
    summary, _ = summary_and_dir
    panels = {p.key: p for p in build_panels(summary)}
    assert list(panels) == ["auroc", "accuracy_vs_compute", "acceptance", "speedup"]
    auroc = panels["auroc"].table
    assert list(auroc.index) == MODELS and {"entropy", "max_prob"} <= set(auroc.columns)
    acc = panels["accuracy_vs_compute"].table
    assert {"variant", "setting", "calibration", "eps", "accuracy", "compute fraction"} <= set(acc.columns)
    assert "fill" not in acc  # benchmark rows have no KV fill: the empty label is left out
    assert set(acc["setting"]) == {"full", "early_exit"}
    assert set(acc["calibration"]) == {"", "empirical"}
    assert acc.loc[acc["setting"] == "full", "compute fraction"].eq(1.0).all()
    acceptance = panels["acceptance"].table
    assert list(acceptance.index) == MODELS
    assert acceptance["DSSD / LayerSkip (best ε)"].eq(1.5).all()
    speed = panels["speedup"].table
    assert list(speed["parameters (M)"]) == sorted(speed["parameters (M)"])
    assert {"dssd", "layerskip"} <= set(speed.columns)
    # The numbers the W&B report runs carry.
    assert set(panels["auroc"].wandb_keys["pythia-70m"]) == {"auroc/entropy", "auroc/max_prob"}
    assert panels["accuracy_vs_compute"].wandb_history["pythia-1b"][0]["eps"] in (0.8, 0.9)


def test_accuracy_panel_falls_back_to_calibration_without_benchmarks(summary_and_dir):
    summary, _ = summary_and_dir
    panel = build_panels(summary[summary["stage"] != "early_exit"])[1]
    assert "calibration" in panel.description and not panel.table.empty


def test_local_report_without_wandb(summary_and_dir):
    summary, sweep = summary_and_dir
    result = build_report(summary, sweep)
    md = (sweep / REPORT_MD).read_text()
    for title in ("AUROC", "Accuracy vs compute", "DSSD vs LayerSkip", "Speedup"):
        assert title in md
    assert "pythia-1b" in md and (sweep / REPORT_HTML).read_text().startswith("<!doctype html>")
    # The panels' figures are the analysis figures, drawn once per panel and linked from the report.
    pngs = sorted(p.name for p in (sweep / FILES_DIR).glob("*.png"))
    assert pngs == [
        "accuracy_compute.png",
        "confidence_auroc.png",
        "decoding_summary.png",
        "size_scaling.png",
    ]
    for name in pngs:
        assert f"]({FILES_DIR}/{name})" in md
    assert result["wandb_report"] is None


def test_report_figures_are_the_analysis_figures(summary_and_dir, tmp_path):
    """Same rows, same figure function: the report's PNG equals `analysis` drawing the summary with one
    "model" per variant (no second plotting code)."""
    from analysis import build_figures
    from analysis.data import Results
    from pipeline.orchestration.results import normalize

    summary, sweep = summary_and_dir
    build_report(summary, sweep)
    res = Results(normalize(summary.assign(model=summary["variant"])))
    (direct,) = build_figures(res, tmp_path, names=["confidence_auroc"], formats=["png"], strict=True)
    assert direct.read_bytes() == (sweep / FILES_DIR / "confidence_auroc.png").read_bytes()


def test_report_of_partial_sweep_says_what_is_missing(summary_and_dir):
    summary, sweep = summary_and_dir
    build_report(summary[summary["stage"].isin(["backbone", "extract"])], sweep)
    assert (sweep / REPORT_MD).read_text().count("No rows yet") == 4


def test_wandb_report_builds_offline_and_is_not_saved(summary_and_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb_workspaces")
    monkeypatch.setenv("WANDB_MODE", "offline")
    summary, sweep = summary_and_dir
    wandb_cfg = OmegaConf.create(
        {
            "enabled": True,
            "mode": "offline",
            "project": "test-project",
            "entity": None,
            "tags": ["test"],
            "dir": str(tmp_path / "wandb"),
        }
    )
    result = build_report(summary, sweep, wandb_cfg=wandb_cfg, group="fake")
    assert result["url"] is None  # offline: not saved
    spec = json.loads((sweep / FILES_DIR / WANDB_REPORT_JSON).read_text())
    text = json.dumps(spec)
    for key in (
        "auroc/entropy",
        "acceptance/dssd",
        "acceptance/layerskip",
        "accuracy_vs_compute/x",
        "n_params",
    ):
        assert key in text
    runs = {run["name"]: run for run in wandb_runs(tmp_path / "wandb")}
    assert set(runs) == {f"{m}/report" for m in MODELS} | {"sweep/summary"}
    report_run = runs["pythia-1b/report"]
    assert report_run["group"] == "fake" and report_run["job_type"] == "report"
    assert {
        "n_params",
        "auroc/entropy",
        "acceptance/dssd",
        "acceptance/layerskip",
        "speedup/dssd",
    } <= report_run["summary"]
    assert {"eps", "accuracy_vs_compute/accuracy", "accuracy_vs_compute/x"} <= report_run["history"]
    assert any(key.startswith("report/auroc/") for key in runs["sweep/summary"]["history"])  # a wandb.Table


def test_wandb_report_object_has_the_panels(summary_and_dir):
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    summary, _ = summary_and_dir
    report = build_wandb_report(build_panels(summary), "p", None, "g", "title")
    grid = [b for b in report.blocks if isinstance(b, wr.PanelGrid)][0]
    assert len(grid.panels) >= 4 and grid.runsets[0].project == "p"


def test_online_requires_online_mode_and_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert not wandb_online("offline")
    assert not wandb_online("online")
