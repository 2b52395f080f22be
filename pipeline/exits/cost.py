"""The cost model: every compute figure of the project (docs/design.md §2).

Two measures, both in *block units* (one transformer block = 1):

- FLOP layer-equivalents: work done, counted per row. One block on one position = 1. A vocabulary
  projection (an early-exit head, or the model's own unembedding) on one position costs `head` block units,
  by default d·V / (12·d²) — 8 blocks for Pythia-70m, 1.6 for 2.8b — so a drafter that evaluates heads often
  is not made to look free. Writing K/V for a skipped layer (the `copy` fill) costs `kv_only` per position.
- Latency-equivalents: each block, head or K/V-only *call* counted once whatever its number of rows,
  weighted by the size of the weights it reads, in block units (the same `head` and `kv_only` ratios: both
  measures are "weights touched", per row or per call). Batch-1 decoding on a GPU is memory-bound, so a call
  over k rows costs about one row; on a CPU small calls are dominated by per-call overhead. This is the
  measure in which self-speculation can win: it never runs fewer block rows than greedy, it makes fewer calls.

`CostModel.layer_equivalents(blocks, heads, kv_only)` is the one weighting; given row counts it is the
FLOP measure, given call counts the latency measure. The rest of this module prices what the policies do:
per exit outcome (`exit_costs`), per KV fill policy (`fill_costs`), per oracle exit (`oracle_costs`), and one
greedy token (`greedy_token_cost`, for estimates before a run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch stays out of config composition, which reads FILL_POLICIES
    from torch import nn

    from pipeline.exits.policy import ExitPolicy

FILL_POLICIES = ("lazy", "copy", "recompute")


@dataclass(frozen=True)
class CostModel:
    """Unit costs in block units: `head` per vocabulary projection, `kv_only` per K/V-only projection."""

    head: float
    kv_only: float = 0.25

    @classmethod
    def default(cls, d_model: int, vocab_size: int, kv_only: float = 0.25) -> CostModel:
        """The design's default: a vocab projection costs d·V / (12·d²) blocks."""
        return cls(head=d_model * vocab_size / (12 * d_model**2), kv_only=kv_only)

    @classmethod
    def for_model(cls, model: nn.Module) -> CostModel:
        """The default cost model for a Hugging Face causal LM (d and V read off its unembedding)."""
        from pipeline.models.backbone import unembedding_of

        unembed = unembedding_of(model)
        return cls.default(unembed.in_features, unembed.out_features)

    @classmethod
    def from_adapter(cls, adapter) -> CostModel:
        """Multiply-add counts read off the model's weights: heads d·V and K/V projections relative to the
        block's linear layers (exact for any block shape, e.g. GQA or a wide MLP)."""
        block = adapter.block_macs()
        return cls(head=adapter.d_model * adapter.vocab_size / block, kv_only=adapter.kv_only_macs() / block)

    def layer_equivalents(self, blocks: float, heads: float, kv_only: float = 0) -> float:
        """Blocks + heads (early-exit heads and unembeddings) + K/V-only projections, weighted. Rows give FLOP
        layer-equivalents, calls give latency-equivalents."""
        return blocks + self.head * heads + self.kv_only * kv_only

    def full_token(self, num_layers: int) -> float:
        """One token through the full model: L blocks + the unembedding (either measure)."""
        return self.layer_equivalents(num_layers, 1)

    def exit_costs(self, policy: ExitPolicy, num_layers: int, exit_logits: bool = True) -> np.ndarray:
        """Cost of one token per exit outcome, indexed by exit head k (0..n-1), the full model at index n.

        Exiting at head k runs blocks 0..layers[k] and evaluates every enabled head up to k; a token no head
        takes runs all blocks, every enabled head and the unembedding. No KV fill is counted here. Each block
        and head runs once on the token's row, so both measures agree. A pruned signal's head costs K/V of a
        head (`ExitPolicy.head_cost`); see `exit_head_evals` for `exit_logits`.
        """
        heads = exit_head_evals(policy, exit_logits)
        return self.layer_equivalents(exit_depths(policy, num_layers), heads).astype(np.float64)

    def oracle_costs(
        self, earliest_head: Sequence[int | None], head_layers: Sequence[int], num_layers: int
    ) -> tuple[list[float], list[float]]:
        """Per token, what exiting at its earliest agreeing head would cost (None: the full model).

        `oracle`: blocks up to the exit + that one head (L blocks + the unembedding without an exit);
        `cascade`: also every shallower head evaluated on the way (a cascade that knew its thresholds).
        No verification and no KV fill: a lower bound.
        """
        from pipeline.exits.policy import ALWAYS, ExitPolicy

        cascade_costs = self.exit_costs(ExitPolicy(head_layers, (ALWAYS,) * len(head_layers)), num_layers)
        oracle, cascade = [], []
        for k in earliest_head:
            depth = num_layers if k is None else head_layers[k] + 1
            oracle.append(self.layer_equivalents(depth, 1))
            cascade.append(float(cascade_costs[len(head_layers) if k is None else k]))
        return oracle, cascade


def exit_depths(policy: ExitPolicy, num_layers: int) -> np.ndarray:
    """Blocks run per exit outcome (same indexing as `CostModel.exit_costs`)."""
    return np.asarray([layer + 1 for layer in policy.layers] + [num_layers], dtype=np.int64)


def exit_head_evals(policy: ExitPolicy, exit_logits: bool = True) -> np.ndarray:
    """Vocabulary projections per exit outcome, in full-head units (same indexing as `CostModel.exit_costs`):
    every enabled head up to the exit; for the full model every enabled head and the unembedding.

    A pruned signal (`ExitPolicy.candidates`) evaluates each head over K of V tokens: K/V each. An exited
    token then also pays its head's full logits when `exit_logits` (the cascade's scoring: token-level
    evaluation, lm-eval, lossy generation), not when only its token is needed (DSSD's drafts)."""
    enabled = np.asarray(policy.enabled, dtype=np.int64)
    tried = np.asarray([(enabled <= k).sum() for k in range(policy.n_heads)] + [len(enabled)], dtype=np.int64)
    if policy.candidates is None:
        return tried + np.r_[np.zeros(policy.n_heads, dtype=np.int64), 1]
    exit_head = 1.0 if exit_logits else 0.0
    return tried * policy.head_cost + np.r_[np.full(policy.n_heads, exit_head), 1.0]


def fill_costs(depths: np.ndarray, num_layers: int, policy: str) -> tuple[int, int]:
    """(block rows, K/V-only rows) for one sequence whose position p ran blocks 0..depths[p]-1 for itself.

    lazy: block j runs every position up to the last one that reaches it (pending positions are filled when
    a later token needs the layer; positions after the last deep token are never filled).
    copy: each position runs its own blocks, and writes K/V only for the blocks it skipped.
    recompute: no cache reuse (the paper author's demo, as in the engine's `recompute`): position p reruns the
    whole prefix [0, p] through the blocks it traverses, (p + 1) * depths[p] rows.
    """
    depths = np.asarray(depths, dtype=np.int64)
    if policy == "lazy":
        rows = 0
        for j in range(num_layers):
            reached = np.flatnonzero(depths > j)
            rows += int(reached[-1]) + 1 if reached.size else 0
        return rows, 0
    if policy == "copy":
        return int(depths.sum()), int((num_layers - depths).sum())
    if policy == "recompute":
        return int(((np.arange(len(depths)) + 1) * depths).sum()), 0
    raise ValueError(f"unknown KV fill policy {policy!r}; choose one of {FILL_POLICIES}")


def greedy_token_cost(num_layers: int, d_model: int, vocab_size: int) -> float:
    """Layer-equivalents of one greedily decoded token under the default cost model: L blocks + the
    unembedding. Both measures agree here (one row per call), so this is also its latency in block calls."""
    return CostModel.default(d_model, vocab_size).full_token(num_layers)
