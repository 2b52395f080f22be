"""Per-token, per-head confidence metrics and correctness, and the AUROC table built from them.

A head's prediction is *correct* when its argmax equals the full model's argmax; the full model's logits are
`unembedding(final_hidden)`, recomputed from the stored post-norm hidden state (never stored). Everything is
computed in token batches so a Pythia-size vocabulary (50k logits per token per head) stays in memory.

The table is "long": one row per (token, head), columns
  token (global index in the split), head (0-based index), layer (block index), correct (bool),
  then one float32 column per metric (raw metric value, not the confidence score).
`wide(table, column)` turns one column into the [n_tokens, n_heads] matrix calibration works on.

Saturation (cosine between this head's input and the previous head's input) has no previous head at head 0:
the shards do not hold the embedding output, so it is NaN there (and NaN never exits, never counts in AUROC).
Metric values come from `pipeline.exits.policy.head_metric_values`, the definition the exit policy uses.

A pruned signal (`logit_margin@top512`) is computed on the head's view over the K most frequent tokens of a
`TokenRanking` (pipeline/exits/vocab_pruning.py), the view the exit policy evaluates. `correct` stays the
head's own (full) argmax against the full model's: the gate decides whether a token exits, the head's
prediction is what it is judged on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.data.shards import ShardReader
from pipeline.exits.confidence import get_metric
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import head_metric_values
from pipeline.exits.separation import aurc, auroc
from pipeline.exits.vocab_pruning import PrunedHeads, TokenRanking
from pipeline.models.backbone import unembedding_of


@torch.no_grad()
def compute_token_metrics(
    reader: ShardReader,
    heads: EarlyExitHeads,
    unembedding: nn.Module,
    metrics: Sequence[str],
    indices: np.ndarray | None = None,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    ranking: TokenRanking | None = None,
) -> pd.DataFrame:
    """The long per-(token, head) table for the tokens `indices` of `reader` (default: all of them).
    Pruned signals (`<metric>@top<K>`) take their K candidates from `ranking`."""
    metric_objs = [get_metric(name) for name in metrics]
    sizes = sorted({m.candidates for m in metric_objs if m.candidates is not None})
    if sizes and ranking is None:
        raise ValueError(
            f"pruned signals {[m.name for m in metric_objs if m.candidates]} need a token ranking"
        )
    if hasattr(unembedding, "get_output_embeddings"):  # a whole backbone was passed: take its lm_head
        unembedding = unembedding_of(unembedding)
    if reader.n_slots != len(heads) + 1:
        raise ValueError(
            f"shards hold {reader.n_slots - 1} head slots but there are {len(heads)} heads: "
            "extraction and heads were made for different head layers"
        )
    indices = np.arange(len(reader)) if indices is None else np.asarray(indices, dtype=np.int64)
    device = torch.device(device)
    heads = heads.to(device).eval()
    views = {k: PrunedHeads(heads, ranking.top(k)) for k in sizes}
    unembedding = unembedding.to(device)
    n_heads = len(heads)
    correct = np.empty((len(indices), n_heads), dtype=bool)
    values = {m.name: np.empty((len(indices), n_heads), dtype=np.float32) for m in metric_objs}
    for start in range(0, len(indices), batch_size):
        rows = slice(start, start + batch_size)
        head_hidden, final_hidden, _ = reader.get(indices[rows])
        head_hidden, final_hidden = head_hidden.to(device), final_hidden.to(device)
        teacher = unembedding(final_hidden.to(unembedding.weight.dtype)).argmax(-1)
        for k in range(n_heads):
            logits = {None: heads(k, head_hidden[:, k])}
            logits.update({size: view(k, head_hidden[:, k]) for size, view in views.items()})
            correct[rows, k] = (logits[None].argmax(-1) == teacher).cpu().numpy()
            prev = head_hidden[:, k - 1] if k > 0 else None
            for m in metric_objs:
                value = head_metric_values(m, k, logits[m.candidates], head_hidden[:, k], prev)
                values[m.name][rows, k] = value.float().cpu().numpy()
    # Head-major layout: all tokens of head 0, then head 1, ... (what `wide` relies on being cheap).
    table = pd.DataFrame(
        {
            "token": np.tile(indices, n_heads),
            "head": np.repeat(np.arange(n_heads, dtype=np.int16), len(indices)),
            "layer": np.repeat(np.asarray(heads.layers, dtype=np.int16), len(indices)),
            "correct": correct.T.ravel(),
        }
    )
    for name, array in values.items():
        table[name] = array.T.ravel()
    return table


def wide(table: pd.DataFrame, column: str) -> np.ndarray:
    """One column of the long table as [n_tokens, n_heads], tokens in the table's order (duplicates kept).

    Every head must hold the same token sequence, as `compute_token_metrics` writes it.
    """
    per_head = [group for _, group in table.groupby("head", sort=True)]
    tokens = per_head[0]["token"].to_numpy()
    for group in per_head[1:]:
        if not np.array_equal(group["token"].to_numpy(), tokens):
            raise ValueError("heads hold different token sets; `wide` needs one row per token for every head")
    dtype = bool if column == "correct" else np.float64
    return np.stack([group[column].to_numpy(dtype) for group in per_head], axis=1)


def auroc_table(table: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per (head, metric): AUROC of the metric's confidence for correctness, plus context.

    Columns: head, layer, metric, auroc, aurc (area under risk–coverage, lower is better), accuracy (the head's
    base agreement rate), n (tokens with a defined metric value), best (the metric with the highest AUROC
    for that head).
    """
    rows = []
    for (head, layer), group in table.groupby(["head", "layer"], sort=True):
        correct = group["correct"].to_numpy()
        for name in metrics:
            metric = get_metric(name)
            score = metric.confidence(group[name].to_numpy(np.float64))  # plain negation: works on numpy too
            rows.append(
                {
                    "head": int(head),
                    "layer": int(layer),
                    "metric": name,
                    "auroc": auroc(score, correct),
                    "aurc": aurc(score, correct),
                    "accuracy": float(correct.mean()),
                    "n": int((~np.isnan(score)).sum()),
                }
            )
    result = pd.DataFrame(rows)
    if result.empty:
        return result.assign(best=pd.Series(dtype=bool))
    # idxmax skips NaN (an undefined metric never "wins"); a head where every AUROC is NaN has no winner.
    best_idx = result.dropna(subset=["auroc"]).groupby("head")["auroc"].idxmax()
    result["best"] = result.index.isin(best_idx.to_numpy())
    return result


def best_metric_per_head(table: pd.DataFrame) -> pd.DataFrame:
    """From `auroc_table`: the winning metric and its AUROC per head (and layer)."""
    return table[table["best"]][["head", "layer", "metric", "auroc"]].reset_index(drop=True)
