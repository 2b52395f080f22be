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
# # Accuracy vs compute, and how the saving scales with model size
#
# Early exit is lossy by design: each ε trades benchmark accuracy for compute (fraction of the full model's
# layer-equivalents, head evaluations included). Token-level agreement vs layer-equivalents per token
# compares the KV-cache strategies (jagged cache with lazy fill, state copy, prefix recompute).
#
# Needs: the `early_exit` stage's `acc/<task>`, `acc_stderr/<task>`, `compute_frac/<task>` rows (setting
# `full`, and setting `early_exit` per calibration method and ε) and its token-level `agreement` /
# `layer_equiv_per_token` rows (one per KV `fill`); for the size plot also `decoding` rows and the `backbone`
# stage's `n_params`.

# %% tags=["parameters"]
# A run directory (results.csv + tables/) or a sweep directory (summary.parquet/csv); "" = the latest run
# under outputs/. Figures go to out_dir ("" = <results>/figures).
results = ""
out_dir = ""

# %%
from IPython.display import display

from analysis import load
from analysis.build import show
from analysis.data import resolve, select

results_path, figures_dir = resolve(results, out_dir)
res = load(results_path)
print(f"results: {results_path} ({len(res.frame)} rows; models: {', '.join(res.models) or 'none'})")

# %% [markdown]
# ## Accuracy vs compute per benchmark (labels: ε)

# %%
show(res, figures_dir, ["accuracy_compute"])

# %% [markdown]
# ## Compute saving and speedup vs model size

# %%
show(res, figures_dir, ["size_scaling"])

# %%
ee = select(res.frame, stage="early_exit")
bench = ee[ee["metric"].str.match(r"(acc|compute_frac)/").fillna(False)]
if not bench.empty:
    bench = bench.assign(
        task=bench["metric"].str.split("/").str[1], what=bench["metric"].str.split("/").str[0]
    )
    display(
        bench.pivot_table(
            index=["model", "task", "setting", "calibration", "eps"],
            columns="what",
            values="value",
            dropna=False,
        )
        .dropna(how="all")
        .round(3)
    )
