# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Calibrating ε: coverage, realized accuracy, and empirical vs guaranteed thresholds
#
# ε is the target accuracy (agreement with the full model among exited tokens). Per head and ε the
# `empirical` method takes the largest entropy threshold whose cumulative calibration accuracy stays ≥ ε;
# `ltt` (Learn-then-Test) adds a finite-sample guarantee, so it should exit fewer tokens and never fall
# below the diagonal on the test split.
#
# Needs: the `calibrate` stage's rows: per head `threshold` and `exit_frac`; per policy (`head = all`)
# `accuracy` and `coverage`. The exit distribution falls back to `early_exit`'s `exit_frac/<task>` rows.

# %% tags=["parameters"]
# A run directory (results.csv + tables/) or a sweep directory (summary.parquet/csv); "" = the latest run
# under outputs/. Figures go to out_dir ("" = <results>/figures).
results = ""
out_dir = ""

# %%
from IPython.display import Markdown, display

from analysis import load
from analysis.build import show
from analysis.data import resolve, select

results_path, figures_dir = resolve(results, out_dir)
res = load(results_path)
print(f"results: {results_path} ({len(res.frame)} rows; models: {', '.join(res.models) or 'none'})")

# %% [markdown]
# ## Coverage, realized vs target accuracy, thresholds

# %%
show(res, figures_dir, ["calibration"])

# %% [markdown]
# ## Where tokens exit as ε varies

# %%
show(res, figures_dir, ["exit_distribution"])

# %%
policy = select(res.frame, stage="calibrate", metric=["accuracy", "coverage"], head="all", setting="")
if not policy.empty:
    table = policy.pivot_table(index=["model", "eps"], columns=["metric", "calibration"], values="value")
    display(Markdown("Realized accuracy below ε marks a calibration that did not hold on the test split."))
    display(table.round(3))
