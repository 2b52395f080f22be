"""Figures from the pipeline's results tables: plotting helpers by figure family (analysis.plots), loading
(analysis.data), the one-call builder (`build_all_figures`), and jupytext notebooks (analysis/nb_*.py).

Importing this package does not import torch: of the pipeline it needs only the results format
(pipeline/orchestration/results.py, pandas only), so notebooks start fast.
"""

from analysis.build import build_all_figures, build_figures
from analysis.data import Results, load

__all__ = ["Results", "build_all_figures", "build_figures", "load"]
