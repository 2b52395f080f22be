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
# # Confidence metrics: which one tells a correct early exit from a wrong one?
#
# A head's prediction is *correct* when its argmax equals the full model's. For every head and every
# confidence metric (entropy, max probability, probability margin, logit margin, hidden-state saturation) we
# compare the metric's distribution on correct vs incorrect tokens, and summarise the separation by AUROC.
# The paper's claim to check: **entropy separates best**.
#
# Needs: `tables/metrics/token_metrics.parquet` (histograms) and the `metrics` stage's `auroc` rows (table).

# %% tags=["parameters"]
# A run directory (results.csv + tables/) or a sweep directory (summary.parquet/csv); "" = the latest run
# under outputs/. Figures go to out_dir ("" = <results>/figures).
results = ""
out_dir = ""

# %%
from IPython.display import Markdown, display

from analysis import load
from analysis.build import show
from analysis.data import resolve

results_path, figures_dir = resolve(results, out_dir)
res = load(results_path)
print(f"results: {results_path} ({len(res.frame)} rows; models: {', '.join(res.models) or 'none'})")

# %% [markdown]
# ## Distributions, correct vs incorrect, per head

# %%
show(res, figures_dir, ["confidence_histograms"])

# %% [markdown]
# ## AUROC per metric and head (bold: best metric for that head)

# %%
show(res, figures_dir, ["confidence_auroc"])

# %%
from analysis.plots import auroc_table

for model in res.models:
    table = auroc_table(res, model)
    if table.empty:
        continue
    display(
        Markdown(
            f"**{model}**: best metric per head: "
            + ", ".join(
                f"{head} → {table[head].idxmax()}" for head in table.columns if table[head].notna().any()
            )
        )
    )
    display(table.round(3))
