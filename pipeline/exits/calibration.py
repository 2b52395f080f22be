"""Calibrating one exit threshold per head per target accuracy ε (docs/design.md §1.4).

The rules find thresholds; the artifact that holds them (`ExitThresholds`, its validation and file format)
is `pipeline.exits.thresholds`.

Vocabulary. ε is a target *accuracy among exited tokens*: agreement of the exiting head's argmax with the
full model's argmax, over the tokens that exit. α = 1 − ε is the tolerated disagreement. Internally every
rule works on a confidence *score* (higher = more confident: `ConfidenceMetric.confidence`); thresholds are
converted back to the metric's own scale for the artifact, where a token exits at head k when
`metric.is_confident(value, threshold[k])` (inclusive, so tied values always exit together). A threshold of
`None` means "this head never exits at this ε". NaN metric values (a metric undefined for a token) never exit.

Methods
-------
`empirical` (the paper's rule): sort the head's calibration tokens from most to least confident; the
threshold is the most permissive distinct value whose cumulative accuracy (over all tokens at least as
confident, ties included) is still >= ε. This is the maximal-coverage threshold meeting ε *on the
calibration data*; on new data it misses ε about half the time when the calibration set is small.

`ltt` (Learn then Test, Angelopoulos et al. 2021, as used in CALM): the most permissive threshold on a
grid such that fixed-sequence testing rejects, at level δ, every null H_j: R(λ_j) > α, where
R(λ) = P(head disagrees | score >= λ) is the *conditional* disagreement among exited tokens, the quantity ε
is about.

- The random number of exited tokens. For a fixed λ, condition on m = #{calibration tokens with
  score >= λ}. Calibration tokens are i.i.d., so given m the exited tokens are i.i.d. draws from the law of
  (score, correct) given score >= λ, and their error count is Binomial(m, R(λ)). The Hoeffding–Bentkus
  p-value computed with n = m is therefore valid conditionally on m, hence marginally; m = 0 gives p = 1.
  (Controlling the joint risk P(exit and wrong) <= α · coverage instead would need the coverage to be
  known; it is not the same guarantee and is not what we do.)
- The grid must not depend on the tokens that are tested. We split the head's calibration tokens at random:
  a fraction `grid_fraction` fixes the grid (quantiles of its scores at evenly spaced coverage levels) and
  the start of the sequence: the grid point whose p-value, projected from the grid part to the size of the
  test part, is smallest (starting at the very conservative end, with a handful of exited tokens, would make
  the first test fail and stop the sequence at once); the other tokens run the tests.
  Fixed-sequence testing (conservative -> permissive, stop at the first non-rejection) controls the
  family-wise error at δ with no assumption on how the p-values depend on each other: a wrong choice needs
  the first true null of the sequence to be rejected, which has probability <= δ.
- Guarantee: with probability >= 1 − δ over the calibration data, the chosen threshold's disagreement rate
  among exited tokens, on new tokens from the same distribution, is <= α.

Cascade
-------
At inference a token exits at the *first* confident head, so head k only ever sees tokens that heads < k
did not take. With `cascade=True` head k is calibrated on exactly those calibration tokens (in head order),
with the thresholds already chosen for heads < k. The exit policy's exited tokens are the disjoint union of
the per-head exited sets, so its accuracy is a mixture of the per-head accuracies: if every head's exited
set has accuracy >= ε, so has the union. Hence:
- `empirical` + cascade: the whole policy meets ε on the calibration data exactly (each head does).
- `ltt` + cascade: each head is tested at δ / n_heads (Bonferroni), so with probability >= 1 − δ every
  head meets ε on new data and therefore so does the whole policy. Caveat, stated plainly: head k's
  calibration subset is selected by thresholds fitted on the same data; the dependence enters only through
  the k scalar thresholds above it and the synthetic tests measure the realized violation rate.
Without cascade (`cascade=False`) each head is calibrated on all tokens: a per-head statement that does
*not* carry over to the policy (tokens reaching deeper heads are harder), which is why cascade is the default.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.special import xlogy
from scipy.stats import binom

from pipeline.exits.confidence import ConfidenceMetric, get_metric
from pipeline.exits.cost import CostModel
from pipeline.exits.draft_stop import DEFAULT_BINS, fit_draft_accuracy
from pipeline.exits.exit_set import DEFAULT_GAMMAS, DraftCosts, choose_exit_sets
from pipeline.exits.policy import FULL, ExitPolicy
from pipeline.exits.separation import finite_pairs
from pipeline.exits.thresholds import METHODS, ExitThresholds, check_delta, check_eps, eps_key
from pipeline.exits.vocab_pruning import CandidateSet

log = logging.getLogger(__name__)

# Tolerance on "accuracy >= ε": 0.7 * 10 is 7.000000000000001 in floating point, and 7 of 10 must pass.
_TOL = 1e-9


# --- per-head rules (score space: higher = more confident) ----------------------------------------------------


def _sorted_finite(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, correct = finite_pairs(scores, correct)
    order = np.argsort(-scores, kind="stable")
    return scores[order], correct[order]


def empirical_threshold(scores: np.ndarray, correct: np.ndarray, eps: float) -> float | None:
    """Most permissive score s* with accuracy >= ε over {score >= s*} (ties included); None if none."""
    s, c = _sorted_finite(scores, correct)
    if len(s) == 0:
        return None
    n = np.arange(1, len(s) + 1)
    n_ok = np.cumsum(c)
    # Only the last index of each tie group is a valid cut: the inclusive threshold admits the whole group.
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    meets = n_ok[last] + _TOL * n[last] >= eps * n[last]
    if not meets.any():
        return None
    return float(s[last[np.flatnonzero(meets)[-1]]])


def hb_p_value(errors: np.ndarray | int, n: np.ndarray | int, alpha: float) -> np.ndarray:
    """Hoeffding–Bentkus p-value for H0: disagreement rate > α, from `errors` out of `n` exited tokens.

    p = min(exp(-n h(r̂ ∧ α, α)), e · P(Binomial(n, α) <= ⌈n r̂⌉)), h(a, b) = a log(a/b) + (1−a) log((1−a)/(1−b)),
    with r̂ = errors / n (so ⌈n r̂⌉ = errors). n = 0 gives p = 1; α = 0 (ε = 1) can never be certified: p = 1.
    """
    errors = np.asarray(errors, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    errors, n = np.broadcast_arrays(errors, n)
    p = np.ones(errors.shape)
    if alpha <= 0.0:
        return p
    ok = n > 0
    r = np.minimum(errors[ok] / n[ok], alpha)
    h = xlogy(r, r / alpha) + xlogy(1.0 - r, (1.0 - r) / (1.0 - alpha))
    p_hoeffding = np.exp(-n[ok] * h)
    p_bentkus = math.e * binom.cdf(errors[ok], n[ok], alpha)
    p[ok] = np.minimum(np.minimum(p_hoeffding, p_bentkus), 1.0)
    return p


def _counts_at(
    sorted_desc: np.ndarray, errors_cum: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(#tokens with score >= λ, #errors among them) for each λ, from scores sorted descending."""
    m = np.searchsorted(-sorted_desc, -thresholds, side="right")
    e = np.where(m > 0, errors_cum[np.maximum(m - 1, 0)], 0) if len(errors_cum) else np.zeros_like(m)
    return m, e


def ltt_threshold(
    scores: np.ndarray,
    correct: np.ndarray,
    eps: float,
    delta: float,
    *,
    grid_fraction: float = 0.2,
    grid_points: int = 200,
    rng: np.random.Generator | None = None,
) -> float | None:
    """Most permissive grid threshold certified by Learn-then-Test (fixed sequence, Hoeffding–Bentkus).

    See the module docstring for the procedure and its guarantee. Returns None when nothing is certified.
    """
    if not 0.0 < grid_fraction < 1.0:
        raise ValueError(f"grid_fraction={grid_fraction} must lie in (0, 1)")
    alpha = 1.0 - eps
    s, c = _sorted_finite(scores, correct)
    n_grid = int(round(grid_fraction * len(s)))
    n_test = len(s) - n_grid
    if alpha <= _TOL or n_grid == 0 or n_test == 0:
        return None
    rng = rng if rng is not None else np.random.default_rng(0)
    in_grid = np.zeros(len(s), dtype=bool)
    in_grid[rng.permutation(len(s))[:n_grid]] = True
    # Both parts stay sorted descending (a boolean mask preserves order).
    s_g, c_g, s_t, c_t = s[in_grid], c[in_grid], s[~in_grid], c[~in_grid]

    # Grid: scores of the grid part at evenly spaced coverage levels, conservative (high score) first.
    levels = np.linspace(1.0 / grid_points, 1.0, grid_points)
    lam = np.unique(s_g[np.ceil(levels * n_grid).astype(int) - 1])[::-1]

    # Start of the sequence, chosen on the grid part only: project each grid point's counts to the test
    # part's size and start at the hypothesis most likely to be rejected (smallest projected p-value).
    m_g, e_g = _counts_at(s_g, np.cumsum(~c_g), lam)
    m_proj = np.rint(m_g * (n_test / n_grid))
    e_proj = np.rint(np.where(m_g > 0, e_g / np.maximum(m_g, 1), 0.0) * m_proj)
    start = int(np.argmin(hb_p_value(e_proj, m_proj, alpha)))

    m_t, e_t = _counts_at(s_t, np.cumsum(~c_t), lam[start:])
    rejected = hb_p_value(e_t, m_t, alpha) <= delta
    n_rejected = len(rejected) if rejected.all() else int(np.argmin(rejected))
    if n_rejected == 0:
        return None
    return float(lam[start + n_rejected - 1])


# --- all heads, all ε ---------------------------------------------------------------------------------------


def _to_scores(values: np.ndarray, metric: ConfidenceMetric) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return -values if metric.lower_is_confident else values


def _from_score(threshold: float | None, metric: ConfidenceMetric) -> float | None:
    if threshold is None:
        return None
    return float(-threshold) if metric.lower_is_confident else float(threshold)


def calibrate_heads(
    values: np.ndarray,
    correct: np.ndarray,
    metric: str | ConfidenceMetric,
    eps: float,
    method: str = "empirical",
    delta: float = 0.05,
    cascade: bool = True,
    grid_fraction: float = 0.2,
    grid_points: int = 200,
    seed: int = 0,
    layers: Sequence[int] | None = None,
) -> list[float | None]:
    """Thresholds (metric scale) for every head at one ε. `values`, `correct`: [n_tokens, n_heads]."""
    metric = get_metric(metric) if isinstance(metric, str) else metric
    (eps,) = check_eps(eps)
    delta = check_delta(delta)
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {METHODS}")
    scores = _to_scores(values, metric)
    correct = np.asarray(correct, dtype=bool)
    if scores.ndim != 2 or scores.shape != correct.shape:
        raise ValueError(
            f"values and correct must both be [n_tokens, n_heads]; got {scores.shape}, {correct.shape}"
        )
    n_heads = scores.shape[1]
    layers = list(layers) if layers is not None else list(range(n_heads))
    # Bonferroni over heads in cascade mode, so the whole policy (not each head alone) holds at δ.
    head_delta = delta / n_heads if cascade else delta
    remaining = np.ones(len(scores), dtype=bool)
    out: list[float | None] = []
    for k in range(n_heads):
        pool = remaining if cascade else slice(None)
        if method == "empirical":
            thr = empirical_threshold(scores[pool, k], correct[pool, k], eps)
        else:
            # One generator per (seed, head, ε): a threshold does not depend on which ε were computed before.
            rng = np.random.default_rng([seed, k, int(round(eps * 1e6))])
            thr = ltt_threshold(
                scores[pool, k],
                correct[pool, k],
                eps,
                head_delta,
                grid_fraction=grid_fraction,
                grid_points=grid_points,
                rng=rng,
            )
        if thr is None:
            log.warning(
                "%s calibration: head %d (layer %s) cannot reach ε=%s; it never exits at this ε",
                method,
                k,
                layers[k],
                eps_key(eps),
            )
        elif cascade:
            remaining &= ~(scores[:, k] >= thr)  # NaN compares False: those tokens stay for later heads
        out.append(_from_score(thr, metric))
    return out


def calibrate(
    values: np.ndarray,
    correct: np.ndarray,
    metric: str,
    eps: Sequence[float],
    methods: Sequence[str] = METHODS,
    delta: float = 0.05,
    cascade: bool = True,
    layers: Sequence[int] | None = None,
    grid_fraction: float = 0.2,
    grid_points: int = 200,
    seed: int = 0,
    candidates: CandidateSet | None = None,
) -> ExitThresholds:
    """Thresholds for every method, ε and head, as an `ExitThresholds` artifact. A pruned signal's `values`
    come from its candidate set's view of the heads; the set is stored with the thresholds."""
    metric_obj = get_metric(metric)
    eps_list = check_eps(eps)
    delta = check_delta(delta)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown calibration method(s) {unknown}; choose from {METHODS}")
    n_heads = np.asarray(values).shape[1]
    layers = list(layers) if layers is not None else list(range(n_heads))
    if len(layers) != n_heads:
        raise ValueError(f"{len(layers)} layers given for {n_heads} heads")
    table = {
        method: {
            eps_key(e): calibrate_heads(
                values,
                correct,
                metric_obj,
                e,
                method,
                delta,
                cascade,
                grid_fraction,
                grid_points,
                seed,
                layers,
            )
            for e in eps_list
        }
        for method in methods
    }
    return ExitThresholds(
        metric=metric,
        lower_is_confident=metric_obj.lower_is_confident,
        layers=[int(x) for x in layers],
        eps=eps_list,
        delta=delta,
        cascade=cascade,
        thresholds=table,
        n_calibration=int(len(values)),
        settings={"grid_fraction": grid_fraction, "grid_points": grid_points, "seed": seed},
        candidates=candidates,
    )


def add_dssd_choices(
    thresholds: ExitThresholds,
    values: np.ndarray,
    correct: np.ndarray,
    cost: CostModel,
    num_layers: int,
    max_draft: int = 16,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    flop_budget: float | None = 1.15,
    accuracy_bins: int = DEFAULT_BINS,
    max_tokens: int | None = 16384,
) -> None:
    """Store DSSD's choices beyond the paper in `thresholds`, from the same calibration tokens: the per-draft
    accuracy curve (pipeline/exits/draft_stop.py, all tokens) and, per method and ε, the consulted heads and γ
    of least simulated cost (pipeline/exits/exit_set.py) over the first `max_tokens` tokens in order (None:
    all; the replay is sequential, so a prefix rather than a random subset)."""
    thresholds.draft_accuracy = fit_draft_accuracy(values, correct, thresholds.metric, accuracy_bins)
    values, correct = values[:max_tokens], correct[:max_tokens]
    policies = {m: {eps_key(e): thresholds.for_eps(m, e) for e in thresholds.eps} for m in thresholds.methods}
    any_policy = next(iter(next(iter(policies.values())).values()))
    thresholds.exit_sets = choose_exit_sets(
        policies,
        values,
        correct,
        thresholds.draft_accuracy,
        DraftCosts.of(cost, any_policy, num_layers),
        max_draft,
        gammas,
        flop_budget,
    )
    for method, by_eps in thresholds.exit_sets.items():
        for key, choice in by_eps.items():
            log.info(
                "DSSD %s ε=%s: consult heads %s, γ=%g (simulated %.2f latency-eq, %.2f layer-eq per token)",
                method,
                key,
                list(choice.heads),
                choice.min_chain_prob,
                choice.latency_equiv_per_token,
                choice.layer_equiv_per_token,
            )


# --- applying a policy ----------------------------------------------------------------------------------------


class PolicyOutcome(NamedTuple):
    """exit_head[i] = first confident head of token i (-1: the full model decides); accuracy = agreement among
    exited tokens (NaN if none exit); coverage[k] = fraction of all tokens exiting at head k."""

    exit_head: np.ndarray
    accuracy: float
    coverage: np.ndarray

    @property
    def total_coverage(self) -> float:
        return float(self.coverage.sum())

    @property
    def agreement(self) -> float:
        """Agreement with the full model over all tokens (non-exited tokens agree by construction)."""
        if np.isnan(self.accuracy):
            return 1.0
        return 1.0 - (1.0 - self.accuracy) * self.total_coverage


def apply_exit_policy(metric_values: np.ndarray, correct: np.ndarray, policy: ExitPolicy) -> PolicyOutcome:
    """Run the cascade exit policy (`policy.decide`) on precomputed per-head metric values [n, n_heads] and
    correctness [n, n_heads]."""
    values = np.asarray(metric_values, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if values.ndim != 2 or values.shape != correct.shape or values.shape[1] != policy.n_heads:
        raise ValueError(
            f"need values and correct of shape [n, {policy.n_heads}]; got {values.shape}, {correct.shape}"
        )
    exit_head = policy.decide(values)
    exited = np.flatnonzero(exit_head != FULL)
    accuracy = float(correct[exited, exit_head[exited]].mean()) if exited.size else float("nan")
    coverage = np.bincount(exit_head[exited], minlength=policy.n_heads) / max(len(values), 1)
    return PolicyOutcome(exit_head, accuracy, coverage)


def evaluate_thresholds(values: np.ndarray, correct: np.ndarray, thresholds: ExitThresholds) -> pd.DataFrame:
    """Realized accuracy/coverage of every (method, ε) policy on held-out tokens: one row each."""
    rows = []
    for method in thresholds.methods:
        for e in thresholds.eps:
            out = apply_exit_policy(values, correct, thresholds.for_eps(method, e))
            row = {
                "method": method,
                "eps": e,
                "accuracy": out.accuracy,
                "coverage": out.total_coverage,
                "agreement": out.agreement,
                "meets_eps": bool(out.accuracy + _TOL >= e) if out.total_coverage else True,
                "n_tokens": len(values),
            }
            row.update(
                {
                    f"coverage_layer{layer}": float(c)
                    for layer, c in zip(thresholds.layers, out.coverage, strict=True)
                }
            )
            rows.append(row)
    return pd.DataFrame(rows)
