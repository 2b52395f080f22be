"""Token-level evaluation of one exit policy on the test split, under each KV fill policy.

Teacher-forced on token blocks: agreement of the policy's argmax with the full model's, perplexity of the true
next token under the policy, exit distribution, and layer-equivalents per token (docs/design.md §2) under
- `lazy`: jagged cache; a token reaching block j first runs the positions pending at j (exact states);
- `recompute`: no KV cache reuse (the paper author's demo): every token reruns the whole prefix through the
  blocks it needs. Exact states, compute quadratic in the sequence length;
- `copy` (CALM state copying): an exiting token's exit hidden state is fed to every deeper block's K/V
  projection. Cheap but *approximate*: later tokens attend to copied K/V, so their states, exits and
  predictions differ from the full model's.

The exact fills are read off one full forward: every position takes the logits of the policy's exit
(`ExitPolicy.cascade`, pipeline/exits/policy.py), which equals an incremental early-exit decoder with exact
hidden states, and their compute comes from the cost model (`CostModel.exit_costs`, `fill_costs`,
pipeline/exits/cost.py). `copy` is run through the decoding engine itself, teacher-forced
(`Engine.teacher_force` with the `EarlyExit` strategy), and priced by the engine's own counters. The full
model costs L + head per token (blocks plus its own unembedding).

`ExitCounts` accumulates an exit distribution and its compute (no KV fill) for the lm-eval adapter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.exits.cost import FILL_POLICIES, CostModel, exit_depths, exit_head_evals, fill_costs
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import FULL, ExitPolicy, head_inputs_of
from pipeline.models.backbone import num_layers_of


def exit_index(exit_head: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Map exit heads (FULL = -1) to indices into `CostModel.exit_costs` / `exit_depths` (full model = n_heads)."""
    return torch.where(exit_head == FULL, torch.full_like(exit_head, n_heads), exit_head)


# --- exit statistics ------------------------------------------------------------------------------------------


@dataclass
class ExitCounts:
    """Exit distribution and the policy's compute (no KV fill) over scored positions."""

    n_heads: int
    full_cost: float
    positions: int = 0
    per_head: list[int] = field(default_factory=list)
    layer_equivalents: float = 0.0

    def __post_init__(self) -> None:
        if not self.per_head:
            self.per_head = [0] * self.n_heads

    def add(self, exit_head: torch.Tensor, costs: np.ndarray) -> None:
        """Add scored positions with their exit heads; `costs` is the policy's `CostModel.exit_costs`."""
        flat = exit_head.reshape(-1).cpu()
        self.positions += flat.numel()
        counts = torch.bincount(exit_index(flat, self.n_heads), minlength=self.n_heads + 1).numpy()
        for k in range(self.n_heads):
            self.per_head[k] += int(counts[k])
        self.layer_equivalents += float((counts * costs).sum())

    def add_generation(self, stats) -> None:
        """Add one engine generation (`pipeline.engine.GenerationStats`): its tokens, exits and compute."""
        self.positions += stats.generated
        for k, count in enumerate(stats.exits_per_head):
            self.per_head[k] += count
        self.layer_equivalents += stats.layer_equivalents

    @property
    def exit_fractions(self) -> list[float]:
        return [c / self.positions if self.positions else math.nan for c in self.per_head]

    @property
    def layer_equivalents_per_token(self) -> float:
        return self.layer_equivalents / self.positions if self.positions else math.nan

    @property
    def compute_fraction(self) -> float:
        """Layer-equivalents per token relative to the full model's L + head."""
        return self.layer_equivalents_per_token / self.full_cost


# --- token-level evaluation -----------------------------------------------------------------------------------


@dataclass
class TokenEval:
    """Teacher-forced results of one policy under one KV fill policy."""

    fill: str
    tokens: int  # scored positions (each predicts the next token of its block)
    agreement: float  # policy argmax == full model argmax
    ppl: float  # exp(mean NLL of the true next token under the policy's logits)
    exit_fractions: list[float]
    layer_equivalents_per_token: float
    full_cost: float

    @property
    def compute_fraction(self) -> float:
        return self.layer_equivalents_per_token / self.full_cost


@dataclass
class _Totals:
    n_heads: int
    scored: int = 0
    agree: int = 0
    nll: float = 0.0
    exits: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    positions: int = 0
    cost: float = 0.0

    def __post_init__(self) -> None:
        self.exits = np.zeros(self.n_heads, dtype=np.int64)

    def score(self, logits: torch.Tensor, full_argmax: torch.Tensor, targets: torch.Tensor) -> None:
        """logits [T-1, V] predicting targets [T-1]; full_argmax [T-1]."""
        self.scored += targets.numel()
        self.agree += int((logits.argmax(-1) == full_argmax).sum())
        self.nll += float(F.cross_entropy(logits.float(), targets, reduction="sum"))

    def result(self, fill: str, full_cost: float) -> TokenEval:
        return TokenEval(
            fill=fill,
            tokens=self.scored,
            agreement=self.agree / max(self.scored, 1),
            ppl=math.exp(self.nll / max(self.scored, 1)),
            exit_fractions=(self.exits / max(self.positions, 1)).tolist(),
            layer_equivalents_per_token=self.cost / max(self.positions, 1),
            full_cost=full_cost,
        )


@torch.no_grad()
def evaluate_tokens(
    model: nn.Module,
    blocks: torch.Tensor,
    heads: EarlyExitHeads,
    policy: ExitPolicy,
    cost: CostModel | None = None,
    fills: Sequence[str] = FILL_POLICIES,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict[str, TokenEval]:
    """Token-level evaluation of `policy` on `blocks` [n, seq_len], one result per KV fill policy.

    Every position of a block is processed (and paid for); the last position has no next token in the block
    and is not scored. Exit fractions and compute are over all processed positions. `cost` defaults to
    `CostModel.for_model(model)`.
    """
    unknown = [f for f in fills if f not in FILL_POLICIES]
    if unknown:
        raise ValueError(f"unknown KV fill policies {unknown}; choose from {FILL_POLICIES}")
    device = torch.device(device)
    num_layers = num_layers_of(model)
    cost = cost or CostModel.for_model(model)
    n_heads = policy.n_heads
    depth, head_evals = exit_depths(policy, num_layers), exit_head_evals(policy)
    exact = [f for f in fills if f != "copy"]
    totals = {f: _Totals(n_heads) for f in fills}
    full_argmax_all = []
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        out = model(input_ids=batch, output_hidden_states=True)
        full_argmax_all.append(out.logits[:, :-1].argmax(-1).cpu())
        if not exact:
            continue
        head_inputs = head_inputs_of(out.hidden_states, policy.layers)
        logits, exit_head = policy.cascade(heads, head_inputs, out.logits)
        index = exit_index(exit_head, n_heads).cpu().numpy()
        for row in range(len(batch)):
            for fill in exact:
                t = totals[fill]
                t.score(logits[row, :-1], out.logits[row, :-1].argmax(-1), batch[row, 1:])
                t.positions += index.shape[1]
                t.exits += np.bincount(index[row], minlength=n_heads + 1)[:n_heads]
                block_rows, kv_rows = fill_costs(depth[index[row]], num_layers, fill)
                t.cost += cost.layer_equivalents(block_rows, float(head_evals[index[row]].sum()), kv_rows)
    if "copy" in fills:
        _evaluate_copy(model, blocks, heads, policy, cost, torch.cat(full_argmax_all), totals["copy"], device)
    return {fill: totals[fill].result(fill, cost.full_token(num_layers)) for fill in fills}


def _evaluate_copy(
    model: nn.Module,
    blocks: torch.Tensor,
    heads: EarlyExitHeads,
    policy: ExitPolicy,
    cost: CostModel,
    full_argmax: torch.Tensor,
    totals: _Totals,
    device: torch.device,
) -> None:
    """CALM state copying, teacher-forced through the decoding engine (its `EarlyExit` strategy)."""
    from pipeline.engine import EarlyExit, Engine

    engine, strategy = Engine(model, heads, cost=cost), EarlyExit(policy, fill="copy")
    for row, tokens in enumerate(blocks.to(device)):
        run = engine.teacher_force(tokens, strategy)
        totals.positions += run.stats.generated
        totals.exits += np.asarray(run.stats.exits_per_head, dtype=np.int64)
        totals.cost += run.stats.layer_equivalents
        totals.score(run.logits[:-1].float(), full_argmax[row].to(device), tokens[1:])
