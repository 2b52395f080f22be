"""The sweep comparison report: four panels built from a sweep's summary table (pipeline/sweep.py).

  1. AUROC of each confidence metric, by model (does entropy separate correct from incorrect exits best?)
  2. Accuracy vs compute for each ε, by model (benchmarks; falls back to token-level agreement)
  3. DSSD vs tuned LayerSkip token acceptance, by model size
  4. Speedup over `generate` vs model size

Always written locally next to the summary: `report.md`, `report.html` and PNG plots under `report_files/`.
With W&B enabled, one `report` run per model variant carries the panels' numbers (summary keys and a per-ε
history), and a wandb-workspaces Report over those runs is built; it is saved (published) only when W&B is
online (API key + network), otherwise its JSON is written to `report_files/wandb_report.json` so nothing is
lost: rebuild and save it later with `python -m pipeline.report <sweep dir> --wandb online`.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from pipeline.sweep import read_summary, size_of, variant_order

log = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FILES_DIR = "report_files"
WANDB_REPORT_JSON = "wandb_report.json"
REPORT_JOB_TYPE = "report"


@dataclass
class Panel:
    key: str  # file stem and W&B key prefix
    title: str
    description: str
    table: pd.DataFrame  # what the Markdown/HTML report shows (empty: stage not run yet)
    plot: Callable[[Any], None] | None = None  # draws on a matplotlib Axes
    wandb_keys: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> {summary key: value}
    wandb_history: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # variant -> rows


def _rows(
    summary: pd.DataFrame, stage: str, metric: str | None = None, prefix: str | None = None
) -> pd.DataFrame:
    sel = summary[summary["stage"] == stage]
    metric_col = sel["metric"].astype(str)
    if metric is not None:
        sel = sel[metric_col == metric]
    if prefix is not None:
        sel = sel[metric_col.str.startswith(prefix)]
    sel = sel.copy()
    sel["method"] = sel["method"].fillna("").astype(str)
    sel["eps"] = pd.to_numeric(sel["eps"], errors="coerce")
    return sel


def _params_by_variant(summary: pd.DataFrame) -> dict[str, float]:
    params = _rows(summary, "backbone", "n_params").groupby("variant")["value"].max().to_dict()
    models = summary.drop_duplicates("variant").set_index("variant")["model"].to_dict()
    return {v: params.get(v, size_of(models.get(v, v))) for v in variant_order(summary)}


# --- panels -----------------------------------------------------------------------------------------------


def auroc_panel(summary: pd.DataFrame) -> Panel:
    rows = _rows(summary, "metrics", "auroc")
    order = variant_order(summary)
    table = pd.DataFrame()
    if not rows.empty:
        table = rows.pivot_table(index="variant", columns="method", values="value", aggfunc="mean")
        table = table.reindex([v for v in order if v in table.index])
        table.columns.name = None
    panel = Panel(
        "auroc",
        "AUROC of each confidence metric, by model",
        "Mean over heads of the AUROC separating tokens where the head agrees with the full model "
        "from those where it does not (metrics stage, held-out split). Higher is better.",
        table,
    )
    if not table.empty:
        panel.wandb_keys = {
            v: {f"auroc/{m}": float(table.loc[v, m]) for m in table.columns if pd.notna(table.loc[v, m])}
            for v in table.index
        }

        def plot(ax) -> None:
            table.plot.bar(ax=ax, rot=0)
            ax.set_ylabel("AUROC (mean over heads)")
            ax.set_ylim(0.5, 1.0)
            ax.legend(fontsize="small", ncol=2)

        panel.plot = plot
    return panel


def accuracy_compute_panel(summary: pd.DataFrame) -> Panel:
    """Benchmark accuracy vs compute fraction per ε (mean over tasks); token-level agreement vs
    layer-equivalents where no benchmark rows exist; calibration accuracy vs coverage as the last resort."""
    acc = _rows(summary, "early_exit", prefix="acc/")
    acc = acc[~acc["metric"].str.startswith("acc_stderr/")]
    compute = _rows(summary, "early_exit", prefix="compute_frac/")
    source, x_label, y_label = "benchmarks (mean over tasks)", "compute fraction", "accuracy"
    if not acc.empty and not compute.empty:
        keys = ["variant", "method", "eps"]
        table = (
            acc.groupby(keys, dropna=False)["value"]
            .mean()
            .rename(y_label)
            .to_frame()
            .join(compute.groupby(keys, dropna=False)["value"].mean().rename(x_label), how="left")
        )
        table = table.reset_index()
        table.loc[table["method"] == "full", x_label] = table.loc[table["method"] == "full", x_label].fillna(
            1.0
        )
    else:
        token = _rows(summary, "early_exit")
        agree = token[token["metric"] == "agreement"]
        layers = token[token["metric"] == "layer_equiv_per_token"]
        if not agree.empty:
            source, x_label, y_label = (
                "token level (agreement with the full model)",
                "layer-equivalents/token",
                "agreement",
            )
            a, c = agree, layers
        else:
            source, x_label, y_label = (
                "calibration test split (whole exit policy)",
                "coverage (exit fraction)",
                "accuracy",
            )
            cal = _rows(summary, "calibrate")
            cal = cal[cal["head"].astype(str) == "all"]
            a, c = cal[cal["metric"] == "accuracy"], cal[cal["metric"] == "coverage"]
        keys = ["variant", "method", "eps"]
        table = (
            a.groupby(keys, dropna=False)["value"]
            .mean()
            .rename(y_label)
            .to_frame()
            .join(c.groupby(keys, dropna=False)["value"].mean().rename(x_label), how="left")
            .reset_index()
        )
    panel = Panel(
        "accuracy_vs_compute",
        "Accuracy vs compute for each ε, by model",
        f"Source: {source}. One point per (model, calibration method, ε); the full model is the reference.",
        table,
    )
    if table.empty:
        return panel
    order = [v for v in variant_order(summary) if v in set(table["variant"])]
    table["variant"] = pd.Categorical(table["variant"], order, ordered=True)
    panel.table = table.sort_values(["variant", "method", "eps"]).reset_index(drop=True)
    curves = panel.table[panel.table["eps"].notna() & panel.table[x_label].notna()]
    y_key = f"{panel.key}/{y_label.replace(' ', '_')}"
    panel.wandb_history = {
        str(variant): [
            {"eps": float(r["eps"]), y_key: float(r[y_label]), f"{panel.key}/x": float(r[x_label])}
            for r in group.sort_values(x_label).to_dict("records")
        ]
        for variant, group in curves.groupby("variant", observed=True)
    }

    def plot(ax) -> None:
        for (variant, method), group in curves.groupby(["variant", "method"], observed=True):
            group = group.sort_values(x_label)
            ax.plot(group[x_label], group[y_label], marker="o", label=f"{variant} ({method})")
            for r in group.to_dict("records"):
                ax.annotate(
                    f"{r['eps']:g}",
                    (r[x_label], r[y_label]),
                    fontsize="x-small",
                    xytext=(2, 2),
                    textcoords="offset points",
                )
        for value in panel.table.loc[panel.table["method"] == "full", y_label]:
            ax.axhline(value, linestyle=":", linewidth=0.8, color="grey")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.legend(fontsize="x-small")

    panel.plot = plot
    return panel


def acceptance_panel(summary: pd.DataFrame) -> Panel:
    rows = _rows(summary, "decoding", "acceptance_rate")
    ratio = _rows(summary, "decoding", "acceptance_ratio")
    table = pd.DataFrame()
    if not rows.empty:
        order = [v for v in variant_order(summary) if v in set(rows["variant"])]
        dssd = rows[rows["method"] == "dssd"]
        best = dssd.loc[dssd.groupby("variant")["value"].idxmax()] if not dssd.empty else dssd
        table = pd.DataFrame(index=order)
        table["DSSD acceptance (best ε)"] = best.set_index("variant")["value"]
        table["DSSD ε"] = best.set_index("variant")["eps"]
        layerskip = rows[rows["method"] == "layerskip"].groupby("variant")["value"].max()
        table["LayerSkip acceptance (tuned)"] = layerskip
        if not ratio.empty:
            table["DSSD / LayerSkip (best ε)"] = ratio.groupby("variant")["value"].max()
        table = table.dropna(how="all")
    panel = Panel(
        "acceptance",
        "DSSD vs LayerSkip acceptance, by model size",
        "Accepted / drafted tokens on the evaluation prompts. LayerSkip uses its best (head, draft "
        "length) from the grid on the tuning prompts; DSSD is shown at its best ε. The paper reports "
        "1.66× on Pythia 70M–2.8B.",
        table,
    )
    if not table.empty:
        panel.wandb_keys = {
            v: {
                k: float(val)
                for k, val in {
                    "acceptance/dssd": table.loc[v].get("DSSD acceptance (best ε)"),
                    "acceptance/layerskip": table.loc[v].get("LayerSkip acceptance (tuned)"),
                    "acceptance/ratio": table.loc[v].get("DSSD / LayerSkip (best ε)"),
                }.items()
                if val is not None and pd.notna(val)
            }
            for v in table.index
        }
        shown = [c for c in ("DSSD acceptance (best ε)", "LayerSkip acceptance (tuned)") if c in table]

        def plot(ax) -> None:
            table[shown].plot.bar(ax=ax, rot=0)
            ax.set_ylabel("acceptance rate")
            ax.set_ylim(0, 1)
            ax.legend(fontsize="small")

        panel.plot = plot
    return panel


def speedup_panel(summary: pd.DataFrame) -> Panel:
    rows = _rows(summary, "decoding", "speedup_vs_generate")
    table = pd.DataFrame()
    if not rows.empty:
        params = _params_by_variant(summary)
        table = rows.pivot_table(index="variant", columns="method", values="value", aggfunc="max")
        table.columns.name = None
        table.insert(0, "parameters (M)", [params.get(v, 0.0) / 1e6 for v in table.index])
        table = table.sort_values("parameters (M)")
    panel = Panel(
        "speedup",
        "Speedup over generate vs model size",
        "Wall-clock tokens/s relative to HF `generate` (greedy), best ε for ε-dependent methods. DSSD "
        "and LayerSkip are lossless; early exit is not.",
        table,
    )
    if not table.empty:
        methods = [c for c in table.columns if c != "parameters (M)"]
        panel.wandb_keys = {
            v: {f"speedup/{m}": float(table.loc[v, m]) for m in methods if pd.notna(table.loc[v, m])}
            for v in table.index
        }

        def plot(ax) -> None:
            for method in methods:
                ax.plot(table["parameters (M)"], table[method], marker="o", label=method)
            ax.set_xscale("log")
            ax.axhline(1.0, linestyle=":", color="grey", linewidth=0.8)
            ax.set_xlabel("parameters (M)")
            ax.set_ylabel("speedup vs generate")
            ax.legend(fontsize="small")

        panel.plot = plot
    return panel


PANELS: tuple[Callable[[pd.DataFrame], Panel], ...] = (
    auroc_panel,
    accuracy_compute_panel,
    acceptance_panel,
    speedup_panel,
)


def build_panels(summary: pd.DataFrame) -> list[Panel]:
    return (
        [make(summary) for make in PANELS]
        if not summary.empty
        else [
            Panel(make.__name__.removesuffix("_panel"), make.__name__, "no rows", pd.DataFrame())
            for make in PANELS
        ]
    )


# --- local report -----------------------------------------------------------------------------------------


def _save_plot(panel: Panel, directory: Path) -> Path | None:
    if panel.plot is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    try:
        panel.plot(ax)
        ax.set_title(panel.title, fontsize="medium")
        fig.tight_layout()
        path = directory / f"{panel.key}.png"
        fig.savefig(path, dpi=110)
        return path
    except Exception:  # noqa: BLE001 - a plot must never cost the tables
        log.exception("plot %s failed; the table is still in the report", panel.key)
        return None
    finally:
        plt.close(fig)


def _fmt_table(table: pd.DataFrame) -> pd.DataFrame:
    return table.map(
        lambda v: f"{v:.4g}" if isinstance(v, float) and pd.notna(v) else ("" if pd.isna(v) else v)
    )


def write_local_report(panels: list[Panel], out_dir: Path, title: str) -> tuple[Path, Path]:
    files = out_dir / FILES_DIR
    files.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", "Comparison across models, built from `summary.csv` by `pipeline/report.py`.", ""]
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
        plot = _save_plot(panel, files)
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


# --- W&B --------------------------------------------------------------------------------------------------


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
    params = _params_by_variant(summary)
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
            "Built by pipeline/report.py from the sweep's summary; "
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


def save_wandb_report(report, out_dir: Path, mode: str) -> str | None:
    """Publish when online; otherwise write the report's JSON (the same panels) and return None."""
    if report is None:
        return None
    files = out_dir / FILES_DIR
    files.mkdir(parents=True, exist_ok=True)
    (files / WANDB_REPORT_JSON).write_text(report._to_model().model_dump_json(indent=1, by_alias=True))
    if not wandb_online(mode):
        log.info("W&B offline: report not saved; its definition is in %s", files / WANDB_REPORT_JSON)
        return None
    report.save()
    log.info("W&B report saved: %s", report.url)
    return report.url


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
    md_path, html_path = write_local_report(panels, out_dir, title)
    result: dict[str, Any] = {
        "markdown": md_path,
        "html": html_path,
        "panels": panels,
        "wandb_report": None,
        "url": None,
    }
    if wandb_cfg is not None and wandb_cfg.get("enabled", True) and wandb_cfg.get("mode") != "disabled":
        log_report_runs(panels, summary, wandb_cfg, group, summary_path=out_dir / "summary.parquet")
        report = build_wandb_report(panels, str(wandb_cfg.project), wandb_cfg.get("entity"), group, title)
        result["wandb_report"] = report
        result["url"] = save_wandb_report(report, out_dir, str(wandb_cfg.mode))
    log.info("report: %s, %s", md_path, html_path)
    return result


def main(argv: list[str] | None = None) -> None:
    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.report", description="Rebuild a sweep's comparison report from its summary."
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
