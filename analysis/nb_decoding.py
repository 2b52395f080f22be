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
# # DSSD vs LayerSkip
#
# DSSD drafts with the early-exit cascade itself (one knob: ε); LayerSkip drafts with one fixed head for a
# fixed number of tokens, tuned over the (head × draft length) grid. Acceptance rate alone misleads (a
# drafter that stops early looks good), so accepted tokens per verification sit next to it, with the oracle
# bound (per token, the earliest head that agrees with the full model).
#
# Needs: the `decoding` stage's `acceptance_rate` and `accepted_per_verification` rows for `dssd` (per ε),
# `layerskip` (tuned), `oracle`, and the `layerskip_grid` rows (per head, `draft_len` column).

# %% tags=["parameters"]
# A run directory (results.csv + tables/) or a sweep directory (summary.parquet/csv); "" = the latest run
# under outputs/. Figures go to out_dir ("" = <results>/figures).
results = ""
out_dir = ""

# %%
import pandas as pd
from IPython.display import display

from analysis import load
from analysis.build import show
from analysis.data import resolve, select

results_path, figures_dir = resolve(results, out_dir)
res = load(results_path)
print(f"results: {results_path} ({len(res.frame)} rows; models: {', '.join(res.models) or 'none'})")

# %% [markdown]
# ## Per model: the LayerSkip grid and DSSD across ε

# %%
show(res, figures_dir, ["decoding"])

# %% [markdown]
# ## Across models: DSSD at its fastest ε vs tuned LayerSkip vs the oracle

# %%
show(res, figures_dir, ["decoding_summary"])

# %% [markdown]
# ## Per model: every lossless decoder's tokens/s and compute against greedy
#
# `dssd_paper` is the paper's rule (every head, no early stop), `dssd` the improved DSSD (the calibrate
# stage's exit set and adaptive draft length γ), `dssd_tuned` DSSD tuned like LayerSkip on the tuning prompts.

# %%
show(res, figures_dir, ["decoding_speed"])

# %% [markdown]
# ## Per model: sampling (decoding.sampling, T > 0): acceptance and speed-up vs temperature
#
# DSSD at one ε against LayerSkip re-tuned at each temperature; speed-up over greedy at the same temperature
# (ancestral sampling from the full model). Skipped when the run decoded greedily only.

# %%
show(res, figures_dir, ["decoding_sampling"])

# %%
from analysis.plots import decoding_point

decoding = select(res.frame, stage="decoding")
summary = []
for model in res.models:
    rows = decoding[decoding["model"] == model]
    for setting in (
        "greedy",
        "early_exit",
        "layerskip",
        "dssd_paper",
        "dssd",
        "dssd_tuned",
        "dssd_perfect_gate",
        "oracle",
    ):
        if setting in set(rows["setting"]):
            point, eps = decoding_point(rows, setting)
            summary.append({"model": model, "setting": setting, "eps": eps, **point.to_dict()})
if summary:
    display(pd.DataFrame(summary).set_index(["model", "setting"]).round(3))
