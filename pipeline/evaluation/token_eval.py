"""The early-exit policy on whole sequences, and token-level evaluation on the test split.

Two parts:

1. `ExitPolicy` + `cascade_logits`: given the hidden states of one full forward, every position takes the logits
   of the first enabled head whose confidence passes its threshold (DESIGN.md §1.5), else the full model's.
   The lm-eval adapter and the token-level evaluation share this code, so both score exactly one policy.
   Running the full forward first and picking the exit afterwards gives the same numbers as an incremental
   early-exit decoder with *exact* hidden states (the jagged cache with lazy fill, or full recomputation),
   because those keep every computed hidden state equal to the full model's. What it does not give is the
   policy's compute: that is accounted for separately (`policy_cost`, `fill_costs`).

2. `evaluate_tokens`: teacher-forced evaluation on token blocks — agreement of the policy's argmax with the
   full model's, perplexity of the true next token under the policy, exit distribution, and layer-equivalents
   per token under each KV fill policy (DESIGN.md §2):
   - `lazy`: jagged cache; a token reaching block j first runs the positions pending at j (exact states).
   - `recompute`: no KV cache reuse (the paper author's demo): every token reruns the whole prefix through the
     blocks it needs. Exact states, compute quadratic in the sequence length.
   - `copy` (CALM state copying): an exiting token's exit hidden state is fed to every deeper block's K/V
     projection. Cheap but *approximate*: later tokens attend to copied K/V, so their states, exits and
     predictions differ from the full model's; this policy is therefore run token by token through the
     engine's block-wise adapter, not read off one full forward.

Compute is counted in layer-equivalents with the engine's `CostModel` (one block on one position = 1; a vocab
projection = d·V / (12·d²) blocks by default; a K/V-only projection = `cost.kv_only`). The full model costs
L + head per token (blocks plus its own unembedding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.engine.stats import CostModel
from pipeline.engine.strategies import FILL_POLICIES
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import FULL, ExitPolicy, head_inputs_of
from pipeline.models.backbone import num_layers_of, unembedding_of


def default_cost(model: nn.Module) -> CostModel:
    unembed = unembedding_of(model)
    return CostModel.default(unembed.in_features, unembed.out_features)


# --- compute per exit outcome -----------------------------------------------------------------------------------


def exit_costs(policy: ExitPolicy, num_layers: int, cost: CostModel) -> torch.Tensor:
    """Cost per exit outcome, indexed by exit head k (0..n-1) with the full model at index n.

    Exiting at head k runs blocks 0..layers[k] and evaluates every enabled head up to k; a token no head
    takes runs all blocks, every enabled head and the unembedding. No KV fill is counted here.
    """
    enabled = set(policy.enabled)
    costs = []
    for k, layer in enumerate(policy.layers):
        evaluated = sum(1 for j in enabled if j <= k)
        costs.append(layer + 1 + cost.head * evaluated)
    costs.append(num_layers + cost.head * (len(enabled) + 1))
    return torch.tensor(costs, dtype=torch.float64)


def depths(policy: ExitPolicy, num_layers: int) -> torch.Tensor:
    """Blocks run per exit outcome (same indexing as `exit_costs`)."""
    return torch.tensor([layer + 1 for layer in policy.layers] + [num_layers], dtype=torch.long)


def exit_index(exit_head: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Map exit heads (FULL = -1) to indices into `exit_costs()` / `depths()` (full model = n_heads)."""
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

    def add(self, exit_head: torch.Tensor, costs: torch.Tensor) -> None:
        """Add scored positions with their exit heads; `costs` is `exit_costs(...)` of the policy."""
        flat = exit_head.reshape(-1).cpu()
        self.positions += flat.numel()
        counts = torch.bincount(exit_index(flat, self.n_heads), minlength=self.n_heads + 1)
        for k in range(self.n_heads):
            self.per_head[k] += int(counts[k])
        self.layer_equivalents += float((counts.double() * costs).sum())

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


# --- KV fill accounting ---------------------------------------------------------------------------------------


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
    and is not scored. Exit fractions and compute are over all processed positions.
    """
    unknown = [f for f in fills if f not in FILL_POLICIES]
    if unknown:
        raise ValueError(f"unknown KV fill policies {unknown}; choose from {FILL_POLICIES}")
    device = torch.device(device)
    num_layers = num_layers_of(model)
    cost = cost or default_cost(model)
    full_cost = num_layers + cost.head
    n_heads = policy.n_heads
    costs, depth = exit_costs(policy, num_layers, cost).numpy(), depths(policy, num_layers).numpy()
    exact = [f for f in fills if f != "copy"]
    totals = {f: _Totals(n_heads) for f in fills}
    full_argmax_all = []
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        out = model(input_ids=batch, output_hidden_states=True)
        full_argmax_all.append(out.logits[:, :-1].argmax(-1).cpu())
        if not exact:
            continue
        logits, exit_head = policy.cascade(
            heads, head_inputs_of(out.hidden_states, policy.layers), out.logits
        )
        index = exit_index(exit_head, n_heads).cpu().numpy()
        for row in range(len(batch)):
            for fill in exact:
                t = totals[fill]
                t.score(logits[row, :-1], out.logits[row, :-1].argmax(-1), batch[row, 1:])
                t.positions += index.shape[1]
                t.exits += np.bincount(index[row], minlength=n_heads + 1)[:n_heads]
                block_rows, kv_rows = fill_costs(depth[index[row]], num_layers, fill)
                heads_cost = float(costs[index[row]].sum() - depth[index[row]].sum())
                t.cost += block_rows + heads_cost + cost.kv_only * kv_rows
    if "copy" in fills:
        _evaluate_copy(model, blocks, heads, policy, cost, torch.cat(full_argmax_all), totals["copy"], device)
    return {fill: totals[fill].result(fill, full_cost) for fill in fills}


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
    """CALM state copying, token by token on the engine's block-wise adapter (exact K/V layout per layer)."""
    from pipeline.engine.adapters import adapter_for
    from pipeline.engine.cache import JaggedKVCache

    adapter = adapter_for(model)
    seq_len = blocks.shape[1]
    cache = JaggedKVCache(
        adapter.num_layers,
        adapter.n_kv_heads,
        adapter.head_dim,
        adapter.d_model,
        seq_len,
        adapter.dtype,
        device,
    )
    adapter.rope_table(seq_len)
    head_at = {layer: k for k, layer in enumerate(policy.layers)}
    head_dtype = next(heads.parameters()).dtype
    n_layers = adapter.num_layers
    for row, tokens in enumerate(blocks.to(device)):
        row_logits = []
        for p in range(seq_len):
            hidden = adapter.embed(tokens[p : p + 1])
            prev_head_input: torch.Tensor | None = None
            logits, exited = None, FULL
            for i in range(n_layers):
                hidden = adapter.block(i, hidden, cache, start=p)
                totals.cost += 1
                k = head_at.get(i)
                if k is None:
                    continue
                head_input = hidden[0].to(head_dtype)
                if policy.thresholds[k] is not None:
                    head_logits = heads(k, head_input)
                    totals.cost += cost.head
                    values = policy.head_values(k, head_logits, head_input, prev_head_input)
                    if bool(policy.confident(k, values)[0]):
                        logits, exited = head_logits[0], k
                        # The exit state stands in for the skipped blocks' inputs (CALM).
                        for j in range(i + 1, n_layers):
                            adapter.kv_only(j, hidden, cache, start=p)
                        totals.cost += cost.kv_only * (n_layers - 1 - i)
                        break
                prev_head_input = head_input
            if exited == FULL:
                logits = adapter.logits(hidden)[0, 0]
                totals.cost += cost.head
            else:
                totals.exits[exited] += 1
            totals.positions += 1
            row_logits.append(logits.float())
        stacked = torch.stack(row_logits[:-1])
        totals.score(stacked, full_argmax[row].to(device), tokens[1:])
