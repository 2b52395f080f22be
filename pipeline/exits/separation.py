"""How well does a confidence score separate correct from incorrect head predictions?

All functions take a *confidence score* where higher means more confident (`ConfidenceMetric.confidence`
turns any metric into one) and a boolean `correct` (head argmax == full-model argmax). NaN scores (a metric
undefined for that token, e.g. saturation at the first head) are dropped.

- `auroc`: probability that a random correct token scores above a random incorrect one, ties counted 1/2
  (Mann–Whitney U with mid-ranks; identical to sklearn's `roc_auc_score`, including ties).
- `risk_coverage`: the selective-prediction curve. Exiting every token whose score is >= t gives coverage
  (fraction exited) and risk (disagreement among exited); one point per distinct score, so tied tokens enter
  together, exactly as an inclusive threshold admits them.
- `aurc`: area under that curve (lower is better), the step-function integral over coverage.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def finite_pairs(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flattened float scores and boolean correctness, same length checked, NaN scores dropped."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=bool).ravel()
    if scores.shape != correct.shape:
        raise ValueError(f"scores and correct differ in length: {scores.shape} vs {correct.shape}")
    keep = ~np.isnan(scores)
    return scores[keep], correct[keep]


def auroc(scores: np.ndarray, correct: np.ndarray) -> float:
    """AUROC of `scores` (higher = more confident) for predicting `correct`; NaN when one class is absent."""
    scores, correct = finite_pairs(scores, correct)
    n_pos = int(correct.sum())
    n_neg = len(correct) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mid-ranks make tied (correct, incorrect) pairs count 1/2, which is the trapezoidal ROC area.
    ranks = rankdata(scores, method="average")
    u = ranks[correct].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def risk_coverage(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, coverage, risk) for every distinct score, most confident first.

    Point j exits the tokens with score >= thresholds[j]; coverage is their fraction of all (non-NaN)
    tokens, risk their disagreement rate with the full model.
    """
    scores, correct = finite_pairs(scores, correct)
    if len(scores) == 0:
        empty = np.empty(0)
        return empty, empty, empty
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order]
    cum_n = np.arange(1, len(s) + 1)
    cum_err = np.cumsum(~c)
    # Last index of each tie group: a threshold equal to a tied value admits the whole group.
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    n = cum_n[last]
    return s[last], n / len(s), cum_err[last] / n


def aurc(scores: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk–coverage curve (step integral from coverage 0 to 1); NaN on empty input."""
    _, coverage, risk = risk_coverage(scores, correct)
    if len(coverage) == 0:
        return float("nan")
    widths = np.diff(np.r_[0.0, coverage])
    return float((widths * risk).sum())


def sample_risk_coverage(
    scores: np.ndarray, correct: np.ndarray, n_points: int = 101
) -> tuple[np.ndarray, np.ndarray]:
    """The curve at fixed coverage levels linspace(0, 1, n_points), compact enough to store per head/metric.

    Risk at coverage q is that of the smallest threshold set reaching coverage >= q (NaN where q exceeds
    the coverage reachable with non-NaN scores).
    """
    _, coverage, risk = risk_coverage(scores, correct)
    levels = np.linspace(0.0, 1.0, n_points)
    if len(coverage) == 0:
        return levels, np.full(n_points, np.nan)
    idx = np.searchsorted(coverage, levels - 1e-12, side="left")
    out = np.full(n_points, np.nan)
    ok = idx < len(coverage)
    out[ok] = risk[idx[ok]]
    return levels, out
