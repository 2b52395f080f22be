"""The sweep comparison report, built from a sweep's summary table (pipeline/sweep/collect.py): the four
panels of pipeline/sweep/panels.py, each a table of numbers and a figure drawn by `analysis.plots` (the same
figures as `python -m analysis`, one "model" per variant: a model plus the other swept values).

Always written locally next to the summary: `report.md`, `report.html` and the figures (PNG) under
`report_files/`. With W&B enabled, the report also goes to W&B (pipeline/sweep/wandb_report.py); offline its
definition is kept in `report_files/wandb_report.json`: rebuild and save it later with
`python -m pipeline.sweep.report <sweep dir> --wandb online`.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from analysis.build import build_figures
from analysis.data import Results
from pipeline.orchestration.results import normalize
from pipeline.sweep.collect import SUMMARY_PARQUET, read_summary
from pipeline.sweep.panels import Panel, build_panels
from pipeline.sweep.wandb_report import build_wandb_report, log_report_runs, save_wandb_report

log = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FILES_DIR = "report_files"


# --- local report -----------------------------------------------------------------------------------------


def draw_figures(panels: list[Panel], summary: pd.DataFrame, directory: Path) -> dict[str, Path]:
    """The analysis figures of the panels that have rows, as PNG, one "model" per variant; by figure name.
    A figure that fails or lacks data is logged and left out: a plot must never cost the tables."""
    names = [p.figure for p in panels if not p.table.empty]
    if not names or summary.empty:
        return {}
    results = Results(normalize(summary.assign(model=summary["variant"])), source=directory)
    paths = build_figures(results, directory, names=names, formats=["png"])
    return {path.stem: path for path in paths}


def _fmt_table(table: pd.DataFrame) -> pd.DataFrame:
    return table.map(
        lambda v: f"{v:.4g}" if isinstance(v, float) and pd.notna(v) else ("" if pd.isna(v) else v)
    )


def write_local_report(
    panels: list[Panel], summary: pd.DataFrame, out_dir: Path, title: str
) -> tuple[Path, Path]:
    files = out_dir / FILES_DIR
    files.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(panels, summary, files)
    md = [
        f"# {title}",
        "",
        "Comparison across models, built from `summary.csv` by `pipeline/sweep/report.py`.",
        "",
    ]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for panel in panels:
        md += [f"## {panel.title}", "", panel.description, ""]
        body += [f"<h2>{html.escape(panel.title)}</h2>", f"<p>{html.escape(panel.description)}</p>"]
        if panel.table.empty:
            md += ["_No rows yet: the stage that produces them has not run in this sweep._", ""]
            body.append(
                "<p><em>No rows yet: the stage that produces them has not run in this sweep.</em></p>"
            )
            continue
        shown = _fmt_table(panel.table)
        index = not isinstance(panel.table.index, pd.RangeIndex)
        md += [shown.to_markdown(index=index), ""]
        body.append(shown.to_html(index=index, border=0, classes="panel"))
        plot = figures.get(panel.figure)
        if plot is not None:
            rel = plot.relative_to(out_dir).as_posix()
            md += [f"![{panel.title}]({rel})", ""]
            body.append(f'<img src="{html.escape(rel)}" alt="{html.escape(panel.title)}">')
    md_path, html_path = out_dir / REPORT_MD, out_dir / REPORT_HTML
    md_path.write_text("\n".join(md))
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:auto} table.panel{border-collapse:collapse}"
        " table.panel td,table.panel th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}"
        " img{max-width:100%}"
    )
    html_path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
    return md_path, html_path


# --- entry points -----------------------------------------------------------------------------------------


def build_report(
    summary: pd.DataFrame,
    out_dir: str | Path,
    wandb_cfg: DictConfig | None = None,
    group: str | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Local Markdown/HTML report always; W&B report runs and Report object when `wandb_cfg` is given."""
    out_dir = Path(out_dir)
    group = group or out_dir.name
    title = title or f"Early exits and DSSD across models: {group}"
    panels = build_panels(summary)
    md_path, html_path = write_local_report(panels, summary, out_dir, title)
    result: dict[str, Any] = {
        "markdown": md_path,
        "html": html_path,
        "panels": panels,
        "wandb_report": None,
        "url": None,
    }
    if wandb_cfg is not None and wandb_cfg.get("enabled", True) and wandb_cfg.get("mode") != "disabled":
        log_report_runs(panels, summary, wandb_cfg, group, summary_path=out_dir / SUMMARY_PARQUET)
        report = build_wandb_report(panels, str(wandb_cfg.project), wandb_cfg.get("entity"), group, title)
        result["wandb_report"] = report
        result["url"] = save_wandb_report(report, out_dir / FILES_DIR, str(wandb_cfg.mode))
    log.info("report: %s, %s", md_path, html_path)
    return result


def main(argv: list[str] | None = None) -> None:
    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sweep.report",
        description="Rebuild a sweep's comparison report from its summary.",
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument(
        "--wandb",
        choices=["off", "offline", "online"],
        default="off",
        help="also log the report runs and build the W&B report (online: save it)",
    )
    parser.add_argument("--project", default="dssd-early-exit")
    parser.add_argument("--entity", default=None)
    parser.add_argument(
        "--wandb-dir", default=os.path.join(os.environ.get("PIPELINE_OUTPUTS", "outputs"), "wandb")
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wandb_cfg = None
    if args.wandb != "off":
        wandb_cfg = OmegaConf.create(
            {
                "enabled": True,
                "mode": args.wandb,
                "project": args.project,
                "entity": args.entity,
                "dir": args.wandb_dir,
            }
        )
    build_report(read_summary(args.sweep_dir), args.sweep_dir, wandb_cfg=wandb_cfg)


if __name__ == "__main__":
    main()
