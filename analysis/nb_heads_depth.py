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
# # Heads vs depth: self-supervised heads against the logit lens
#
# Each head reads one block's output. Its top-1 agreement with the full model and KL(full ‖ head) tell how
# much of the final prediction is already available at that depth; the logit lens (the backbone's own final
# norm + unembedding, untrained) is the baseline the trained heads must beat.
#
# Needs: the `heads` stage's `agree` and `kl` rows, settings `trained` and `logit_lens` (`layer` column =
# block index).

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

# %%
show(res, figures_dir, ["heads_depth"])

# %%
heads = select(res.frame, stage="heads", metric=["agree", "kl"])
heads = heads[heads["head"].str.fullmatch(r"\d+").fillna(False)]
if not heads.empty:
    display(
        heads.pivot_table(index=["model", "head"], columns=["metric", "setting"], values="value").round(3)
    )
