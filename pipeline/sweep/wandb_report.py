"""The sweep report on Weights & Biases: one `report` run per variant carrying the panels' numbers, a
`sweep/summary` run with the panel tables and the summary as an artifact, and a wandb-workspaces Report over
those runs, saved (published) only when W&B is online; offline its JSON definition is written instead."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from pipeline.sweep.compare import variant_order
from pipeline.sweep.panels import Panel, params_by_variant

log = logging.getLogger(__name__)

WANDB_REPORT_JSON = "wandb_report.json"
REPORT_JOB_TYPE = "report"


def wandb_online(mode: str) -> bool:
    """True when a report can be saved: online mode, an API key, and the W&B API reachable."""
    if mode != "online":
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    )
    if not has_key:
        return False
    from pipeline.orchestration.tracking import _wandb_reachable

    return _wandb_reachable()


def log_report_runs(
    panels: list[Panel],
    summary: pd.DataFrame,
    wandb_cfg: DictConfig,
    group: str,
    summary_path: Path | None = None,
) -> list[str]:
    """One W&B run per variant (job_type `report`) holding the panels' numbers, so W&B panels can plot them
    across models; plus one `sweep/summary` run with the panel tables and the summary as an artifact."""
    import wandb

    directory = Path(str(wandb_cfg.get("dir", "outputs/wandb")))
    directory.mkdir(parents=True, exist_ok=True)
    mode = (
        "online"
        if wandb_online(str(wandb_cfg.mode))
        else ("disabled" if wandb_cfg.mode == "disabled" else "offline")
    )
    params = params_by_variant(summary)
    models = summary.drop_duplicates("variant").set_index("variant")["model"].to_dict()
    common = {
        "project": str(wandb_cfg.project),
        "entity": wandb_cfg.get("entity"),
        "group": group,
        "dir": str(directory),
        "mode": mode,
        "reinit": "finish_previous",
        "tags": list(wandb_cfg.get("tags") or []),
        "settings": wandb.Settings(console="off", x_disable_stats=True, init_timeout=60),
    }
    names = []
    for variant in variant_order(summary):
        run = wandb.init(
            name=f"{variant}/report",
            job_type=REPORT_JOB_TYPE,
            config={"variant": variant, "model": models.get(variant)},
            **common,
        )
        try:
            for panel in panels:
                for row in panel.wandb_history.get(variant, []):
                    run.log(row)
            numbers = {"n_params": params.get(variant, 0.0)}
            for panel in panels:
                numbers.update(panel.wandb_keys.get(variant, {}))
            run.summary.update(numbers)
            names.append(run.name)
        finally:
            run.finish()
    run = wandb.init(name="sweep/summary", job_type="summary", **common)
    try:
        for panel in panels:
            if not panel.table.empty:
                table = (
                    panel.table.reset_index()
                    if not isinstance(panel.table.index, pd.RangeIndex)
                    else panel.table
                )
                run.log(
                    {
                        f"report/{panel.key}": wandb.Table(
                            dataframe=table.astype(
                                {c: str for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])}
                            )
                        )
                    }
                )
        if summary_path is not None and summary_path.is_file():
            artifact = wandb.Artifact(name=f"summary-{group}".replace("/", "-"), type="results")
            artifact.add_file(str(summary_path))
            run.log_artifact(artifact)
    finally:
        run.finish()
    return names


def build_wandb_report(panels: list[Panel], project: str, entity: str | None, group: str, title: str):
    """A wandb-workspaces Report over this sweep's `report` runs, or None when the package is missing."""
    try:
        import wandb_workspaces.reports.v2 as wr
        from wandb_workspaces import expr
    except ImportError:
        log.info("wandb-workspaces is not installed (pip install '.[report]'): no W&B report object")
        return None
    runset = wr.Runset(
        entity=entity or "",
        project=project,
        name=group,
        filters=[expr.Metric("JobType") == REPORT_JOB_TYPE, expr.Metric("Group") == group],
    )
    by_key = {panel.key: panel for panel in panels}
    auroc_metrics = sorted({k for keys in by_key["auroc"].wandb_keys.values() for k in keys}) or [
        "auroc/entropy"
    ]
    speed_metrics = sorted({k for keys in by_key["speedup"].wandb_keys.values() for k in keys}) or [
        "speedup/dssd"
    ]
    acc_y = next(
        (
            k
            for rows in by_key["accuracy_vs_compute"].wandb_history.values()
            for row in rows
            for k in row
            if k.startswith("accuracy_vs_compute/") and k != "accuracy_vs_compute/x"
        ),
        "accuracy_vs_compute/accuracy",
    )
    plots = [
        wr.BarPlot(title=by_key["auroc"].title, metrics=auroc_metrics, orientation="v"),
        wr.LinePlot(title=by_key["accuracy_vs_compute"].title, x="accuracy_vs_compute/x", y=[acc_y]),
        wr.BarPlot(
            title=by_key["acceptance"].title,
            metrics=["acceptance/dssd", "acceptance/layerskip"],
            orientation="v",
        ),
        *[
            wr.ScatterPlot(
                title=f"{by_key['speedup'].title}: {m.split('/', 1)[1]}", x="n_params", y=m, log_x=True
            )
            for m in speed_metrics
        ],
    ]
    blocks: list[Any] = [
        wr.H1(title),
        wr.P(
            "Built by pipeline/sweep/report.py from the sweep's summary; "
            "one `report` run per model carries the numbers."
        ),
    ]
    for panel in panels:
        blocks += [wr.H2(panel.title), wr.P(panel.description)]
    blocks.append(wr.PanelGrid(runsets=[runset], panels=plots))
    return wr.Report(
        project=project,
        entity=entity or "",
        title=title,
        description=f"Sweep {group}: early exits and DSSD across Pythia sizes",
        blocks=blocks,
    )


def save_wandb_report(report, files: Path, mode: str) -> str | None:
    """Publish when online; otherwise write the report's JSON (the same panels) into `files` and return None."""
    if report is None:
        return None
    files.mkdir(parents=True, exist_ok=True)
    (files / WANDB_REPORT_JSON).write_text(report._to_model().model_dump_json(indent=1, by_alias=True))
    if not wandb_online(mode):
        log.info("W&B offline: report not saved; its definition is in %s", files / WANDB_REPORT_JSON)
        return None
    report.save()
    log.info("W&B report saved: %s", report.url)
    return report.url
