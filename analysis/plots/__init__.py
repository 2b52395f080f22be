"""Figures from the results tables: one function per figure, grouped by figure family, each reading only
`analysis.data.Results`.

Every figure function has the signature `fn(res, out_dir) -> list[Path]` and writes `<name>.png` and
`<name>.pdf` under the house style (analysis/plots/style.py, which says how figures stay byte-identical).
When the data a figure needs is absent it raises `SkipFigure` (per-model figures skip only the models that
lack data, and raise only when no model has any); `analysis.build` turns that into a logged notice, so a
partial run still gets every figure it has data for.

  style.py        house style, colours, display names, saving, shared drawing helpers
  confidence.py   (a) confidence-metric separation: confidence_histograms, confidence_auroc
  heads.py        (b) heads vs depth: heads_depth
  exits.py        (c) calibration of ε, (g) exit distribution: calibration, exit_distribution
  compute.py      (d) accuracy vs compute, (e) scaling with model size: accuracy_compute, size_scaling
  speculative.py  (f) DSSD vs LayerSkip: decoding, decoding_summary
  decoding_speed.py  (f) tokens/s and compute of every lossless decoder against greedy: decoding_speed
  sampling.py     (f) acceptance and speed-up vs temperature, DSSD vs LayerSkip: decoding_sampling (only
                  with decoding.sampling rows, T > 0)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from analysis.data import Results
from analysis.plots.compute import accuracy_compute, size_scaling
from analysis.plots.confidence import auroc_table, confidence_auroc, confidence_histograms, metric_columns
from analysis.plots.decoding_speed import decoding_speed
from analysis.plots.exits import calibration, exit_distribution, exit_fractions
from analysis.plots.heads import heads_depth
from analysis.plots.sampling import decoding_sampling
from analysis.plots.speculative import decoding, decoding_point, decoding_summary, layerskip_grid, pick_eps
from analysis.plots.style import FORMATS, SkipFigure, label, output_formats

FIGURES: dict[str, Callable[[Results, Path], list[Path]]] = {
    "confidence_histograms": confidence_histograms,
    "confidence_auroc": confidence_auroc,
    "heads_depth": heads_depth,
    "calibration": calibration,
    "exit_distribution": exit_distribution,
    "accuracy_compute": accuracy_compute,
    "size_scaling": size_scaling,
    "decoding": decoding,
    "decoding_summary": decoding_summary,
    "decoding_speed": decoding_speed,
    "decoding_sampling": decoding_sampling,
}

__all__ = [
    "FIGURES",
    "FORMATS",
    "SkipFigure",
    "accuracy_compute",
    "auroc_table",
    "calibration",
    "confidence_auroc",
    "confidence_histograms",
    "decoding",
    "decoding_point",
    "decoding_sampling",
    "decoding_speed",
    "decoding_summary",
    "exit_distribution",
    "exit_fractions",
    "heads_depth",
    "label",
    "layerskip_grid",
    "metric_columns",
    "output_formats",
    "pick_eps",
    "size_scaling",
]
