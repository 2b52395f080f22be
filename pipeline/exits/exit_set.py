"""Cost-aware exit set: which heads DSSD consults at each ε, and its adaptive stop γ (docs/design.md §1.6).

Consulting a head costs a confidence check on every token that reaches it, exiting or not; a head that
rarely exits at some ε, or whose drafts are often rejected, can cost more than it saves. For each
calibration method and ε, `choose_exit_sets` picks the heads consulted (any subset of the heads the ε's
thresholds enable, the empty set — greedy decoding — included) and γ (from a grid) that minimise DSSD's
expected *latency-equivalents* per generated token — the cost model's measure in which speculation can win
(pipeline/exits/cost.py) — among the choices whose FLOP layer-equivalents per token stay within
`flop_budget` × greedy's (speculation may not buy speed with waste). The choice is stored with the
thresholds (`ExitThresholds.exit_sets`) and is what the decoding stage's `dssd` rows use.

The estimate (`simulate_dssd`) replays DSSD's rounds over the calibration tokens (validation split) in
their stored order, each token standing for one prediction of a decoded sequence: a round drafts the
tokens that exit at a consulted head while the chain estimate (pipeline/exits/draft_stop.py) stays >= γ and
fewer than `max_draft` drafts are pending; the next token is the verification pass (the full model over every
pending draft). The drafts accepted are the leading ones whose head agrees with the full model; the round
emits them plus one token (correction or bonus), and the next round starts after them. Each round is priced
as the engine counts it (pipeline/engine/stats.py): a draft exiting at head e calls blocks 0..layer(e) and
every consulted head up to e; the verification calls all L blocks, the unembedding, and every consulted head
unless drafting was stopped by the cap or γ (its step then tests no head); in rows, every draft position is
filled to all L blocks and scored by the unembedding in the verification, kept or not. A consulted head's
check costs `DraftCosts.consult[k]` block units: one vocabulary projection, or less for a pruned signal
(`ExitPolicy.head_cost`).

An estimate, not a measurement: calibration tokens are teacher-forced natural text, decoding feeds the
model's own greedy tokens; and after a rejected draft the engine keeps drafting on a wrong prefix, whose
confidence values no calibration token holds — the replay uses the true next tokens' values there, so it
undercounts the drafts wasted after a rejection (exact with one draft per round: tests/test_dssd_acceleration.py;
on a random tiny model with 22 % draft accuracy, 141 simulated vs 181 real drafts at max_draft 8). The decoding
stage measures the result (and tunes `dssd_tuned` on prompts, the stored choice among its grid).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.exits.cost import CostModel
from pipeline.exits.draft_stop import DraftAccuracy
from pipeline.exits.policy import ExitPolicy

DEFAULT_GAMMAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_SUBSET_HEADS = 12  # 2^12 subsets per (method, ε): more heads need a smarter search than enumeration


@dataclass(frozen=True)
class DraftCosts:
    """What a DSSD round costs, in block units: head block indices, L, the unembedding, each head's check."""

    layers: tuple[int, ...]
    num_layers: int
    unembedding: float
    consult: tuple[float, ...]

    @classmethod
    def of(cls, cost: CostModel, policy: ExitPolicy, num_layers: int) -> DraftCosts:
        """Prices from the cost model: a head check is one vocabulary projection scaled by the policy's
        `head_cost` (K/V for a pruned signal)."""
        check = cost.head * policy.head_cost
        return cls(tuple(policy.layers), int(num_layers), cost.head, (check,) * policy.n_heads)

    @property
    def greedy(self) -> float:
        """Greedy decoding's cost per token (both measures): L blocks + the unembedding."""
        return self.num_layers + self.unembedding


@dataclass(frozen=True)
class ExitSetChoice:
    """The heads DSSD consults at one (method, ε), its γ and draft cap, and the simulated cost per token."""

    heads: tuple[int, ...]
    min_chain_prob: float
    max_draft: int
    latency_equiv_per_token: float
    layer_equiv_per_token: float

    def to_dict(self) -> dict:
        return {**asdict(self), "heads": list(self.heads)}

    @classmethod
    def from_dict(cls, data: dict) -> ExitSetChoice:
        return cls(
            heads=tuple(int(k) for k in data["heads"]),
            min_chain_prob=float(data["min_chain_prob"]),
            max_draft=int(data["max_draft"]),
            latency_equiv_per_token=float(data["latency_equiv_per_token"]),
            layer_equiv_per_token=float(data["layer_equiv_per_token"]),
        )


@dataclass(frozen=True)
class SimulatedCost:
    latency_equiv_per_token: float
    layer_equiv_per_token: float
    tokens: int


def _next_true(mask: np.ndarray) -> np.ndarray:
    """For each index t, the smallest u >= t with mask[u] (len(mask) when none)."""
    n = len(mask)
    where = np.where(mask, np.arange(n), n)
    return np.minimum.accumulate(where[::-1])[::-1]


def simulate_dssd(
    exit_head: np.ndarray,
    draft_correct: np.ndarray,
    draft_accuracy: np.ndarray,
    heads: Sequence[int],
    costs: DraftCosts,
    max_draft: int,
    min_chain_prob: float = 0.0,
) -> SimulatedCost:
    """DSSD's cost per generated token over one token sequence (module docstring).

    Per token t: `exit_head[t]` the consulted head it exits at (-1: none), `draft_correct[t]` whether that
    head agrees with the full model, `draft_accuracy[t]` its estimated acceptance probability. `heads` are
    the consulted heads (their checks are priced)."""
    exit_head = np.asarray(exit_head, dtype=np.int64)
    n, width = len(exit_head), int(max_draft)
    if width < 1:
        raise ValueError(f"max_draft={max_draft} must be >= 1")
    # Cost of the checks a token pays when it exits at head e: every consulted head up to e.
    checks_upto = np.zeros(len(costs.layers))
    for k in heads:
        checks_upto[k:] += costs.consult[k]
    all_checks = float(checks_upto[-1]) if heads else 0.0
    drafts = exit_head >= 0
    column = np.maximum(exit_head, 0)
    checks = np.where(drafts, checks_upto[column], 0.0)
    depth = np.where(drafts, np.asarray(costs.layers)[column] + 1, 0)  # blocks a draft calls
    index = np.arange(n)
    # From each start s: the run of exiting tokens (drafting stops at the first that finds no confident head),
    # the cap, and the chain estimate — draft j may follow while prod_{u<j} accuracy[s+u] >= γ, i.e. while
    # P[s+j] - P[s] <= -log γ for the prefix sums P of -log accuracy (non-decreasing: one binary search).
    run = _next_true(~drafts) - index
    neg_log = -np.log(np.clip(np.where(drafts, draft_accuracy, 1.0), 1e-300, 1.0))
    prefix = np.concatenate([[0.0], np.cumsum(neg_log)])
    budget = -math.log(min_chain_prob) if min_chain_prob > 0 else math.inf
    by_chain = np.searchsorted(prefix, prefix[:n] + budget, side="right") - index
    n_drafts = np.minimum(np.minimum(run, width), by_chain)
    accepted = np.minimum(n_drafts, _next_true(~(np.asarray(draft_correct, bool) & drafts)) - index)
    # Drafting stopped by the cap or γ: the verification step tests no head; otherwise its token found no
    # confident head after testing every consulted one.
    stopped = (n_drafts == width) | ((n_drafts > 0) & (prefix[index + n_drafts] - prefix[:n] > budget))
    verify_checks = np.where(stopped, 0.0, all_checks)
    prefix_checks = np.concatenate([[0.0], np.cumsum(checks)])
    prefix_depth = np.concatenate([[0], np.cumsum(depth)])
    end = np.arange(n) + n_drafts
    draft_checks = prefix_checks[end] - prefix_checks[:n]
    latency = (prefix_depth[end] - prefix_depth[:n]) + draft_checks + costs.greedy + verify_checks
    flops = (n_drafts + 1) * costs.greedy + draft_checks + verify_checks
    # The rounds actually played start at token 0, each right after the tokens the previous one emitted.
    starts = _round_starts(np.minimum(index + accepted + 1, n))
    tokens = int((accepted[starts] + 1).sum())
    return SimulatedCost(float(latency[starts].sum() / tokens), float(flops[starts].sum() / tokens), tokens)


def _round_starts(following: np.ndarray) -> np.ndarray:
    """The chain 0, following[0], following[following[0]], ... up to len(following) (exclusive): where each
    round starts. One list walk — every step moves forward — costs far less than vectorised pointer
    doubling over every start (log2 n passes over all n tokens), which was most of the exit-set search."""
    successor, n = following.tolist(), len(following)
    starts, s = [], 0
    while s < n:
        starts.append(s)
        s = successor[s]
    return np.asarray(starts, dtype=np.int64)


def exits_at(policy: ExitPolicy, values: np.ndarray, heads: Sequence[int]) -> np.ndarray:
    """Per token, the first head of `heads` (depth order) whose check passes under `policy`; -1 for none."""
    out = np.full(len(values), -1, dtype=np.int64)
    for k in sorted(heads, reverse=True):  # shallower heads overwrite deeper ones
        out[np.asarray(policy.confident(k, values[:, k]), dtype=bool)] = k
    return out


def choose_exit_set(
    policy: ExitPolicy,
    values: np.ndarray,
    correct: np.ndarray,
    accuracy: DraftAccuracy,
    costs: DraftCosts,
    max_draft: int,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    flop_budget: float | None = 1.15,
) -> ExitSetChoice:
    """The consulted heads and γ of least simulated latency per token at one ε (module docstring). Ties go
    to fewer FLOPs, fewer heads, shallower heads and the smaller γ."""
    values, correct = np.asarray(values, dtype=np.float64), np.asarray(correct, dtype=bool)
    enabled = policy.enabled
    if len(enabled) > MAX_SUBSET_HEADS:
        raise ValueError(
            f"{len(enabled)} enabled heads: the exit-set search enumerates subsets and stops at "
            f"{MAX_SUBSET_HEADS} heads"
        )
    if any(not 0.0 <= g <= 1.0 for g in gammas) or not gammas:
        raise ValueError(f"γ grid {list(gammas)}: need at least one γ, each in [0, 1]")
    per_head_accuracy = np.stack([accuracy.curve(k, values[:, k]) for k in range(values.shape[1])], axis=1)
    rows = np.arange(len(values))
    best: tuple | None = None
    for size in range(len(enabled) + 1):
        for heads in itertools.combinations(enabled, size):
            exit_head = exits_at(policy, values, heads)
            column = np.maximum(exit_head, 0)
            draft_correct, draft_acc = correct[rows, column], per_head_accuracy[rows, column]
            # γ only matters where a draft can follow another; without heads every γ is greedy.
            for gamma in sorted(set(gammas)) if heads and max_draft > 1 else [0.0]:
                sim = simulate_dssd(exit_head, draft_correct, draft_acc, heads, costs, max_draft, gamma)
                within = flop_budget is None or sim.layer_equiv_per_token <= flop_budget * costs.greedy + 1e-9
                if not within:
                    continue
                key = (sim.latency_equiv_per_token, sim.layer_equiv_per_token, len(heads), heads, gamma)
                if best is None or key < best[0]:
                    best = (key, ExitSetChoice(heads, gamma, max_draft, *key[:2]))
    assert best is not None  # the empty set is greedy decoding: always within any budget >= 1
    return best[1]


def choose_exit_sets(
    policies: dict[str, dict[str, ExitPolicy]],
    values: np.ndarray,
    correct: np.ndarray,
    accuracy: DraftAccuracy,
    costs: DraftCosts,
    max_draft: int,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    flop_budget: float | None = 1.15,
) -> dict[str, dict[str, ExitSetChoice]]:
    """`choose_exit_set` for every policies[method][eps_key]."""
    if flop_budget is not None and (not math.isfinite(flop_budget) or flop_budget < 1.0):
        raise ValueError(f"flop_budget={flop_budget}: must be >= 1 (greedy decoding itself costs 1) or None")
    return {
        method: {
            key: choose_exit_set(policy, values, correct, accuracy, costs, max_draft, gammas, flop_budget)
            for key, policy in by_eps.items()
        }
        for method, by_eps in policies.items()
    }
