"""Adaptive draft length for DSSD: how likely a draft is to be accepted, from its confidence (docs/design.md §1.6).

The paper's DSSD drafts while some head is confident, up to `max_draft` drafts; at a low ε a long chain is
thrown away after its first miss. The adaptive rule stops drafting when the estimated probability that
*every* pending draft is accepted — the product of their per-draft accuracies — falls below γ
(`DSSD(..., min_chain_prob=γ, draft_accuracy=...)`); `max_draft` stays a cap. γ = 0 is the paper's rule.

`DraftAccuracy` is the per-draft accuracy: per head k, the probability that a token exiting at head k with
metric value v equals the full model's token, as a function of v. It is estimated on the calibration tokens
(validation split, every token with a defined value, not only those a cascade leaves to head k) by
`fit_draft_accuracy`: the head's confidence scores are cut at `n_bins` quantiles, the accuracy of each bin is
measured, and the bins are made monotone (non-decreasing in confidence) by weighted isotonic regression
(pool adjacent violators), so a more confident draft is never estimated as less likely to be accepted.

Scales. The curve is stored on the metric's own scale, like the thresholds (pipeline/exits/thresholds.py):
`cuts[k]` are the bin boundaries ordered from the least to the most confident value, `accuracy[k]` the
accuracy of each bin in the same order (one more entry than `cuts[k]`). A value equal to a cut belongs to
the more confident bin. A NaN value (a metric undefined for the token) gets the least confident bin's accuracy.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.exits.confidence import get_metric
from pipeline.exits.separation import finite_pairs

DEFAULT_BINS = 32


@dataclass(frozen=True)
class DraftAccuracy:
    """Per head, the accuracy of a draft as a non-decreasing step function of its confidence (module
    docstring). `accuracy(head, value)` is the lookup the decoding loop calls once per draft."""

    metric: str
    cuts: tuple[tuple[float, ...], ...]
    accuracy: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        lower = get_metric(self.metric).lower_is_confident
        cuts = tuple(tuple(float(c) for c in head) for head in self.cuts)
        accuracy = tuple(tuple(float(a) for a in head) for head in self.accuracy)
        if len(cuts) != len(accuracy):
            raise ValueError(f"draft accuracy: {len(cuts)} heads of cuts but {len(accuracy)} of accuracies")
        for k, (c, a) in enumerate(zip(cuts, accuracy, strict=True)):
            if len(a) != len(c) + 1:
                raise ValueError(
                    f"draft accuracy of head {k}: {len(c)} cuts need {len(c) + 1} bins, got {len(a)}"
                )
            if any(not 0.0 <= x <= 1.0 for x in a) or any(x > y for x, y in zip(a, a[1:], strict=False)):
                raise ValueError(f"draft accuracy of head {k} must lie in [0, 1] and not decrease: {list(a)}")
            score = [-x for x in c] if lower else list(c)
            if any(not math.isfinite(x) for x in score) or score != sorted(score):
                raise ValueError(
                    f"draft accuracy of head {k}: cuts must be finite and ordered from the least to the most "
                    f"confident value of {self.metric!r}, got {list(c)}"
                )
        object.__setattr__(self, "cuts", cuts)
        object.__setattr__(self, "accuracy", accuracy)
        # Lookup on the confidence score (higher = more confident), ascending: one bisect per draft.
        object.__setattr__(self, "_sign", -1.0 if lower else 1.0)
        object.__setattr__(self, "_score_cuts", tuple(tuple(self._sign * x for x in c) for c in cuts))

    @property
    def n_heads(self) -> int:
        return len(self.cuts)

    def __call__(self, head: int, value: float) -> float:
        """Estimated probability that a draft of `head` with metric value `value` is accepted."""
        if value != value:  # NaN: the least confident bin
            return self.accuracy[head][0]
        return self.accuracy[head][bisect.bisect_right(self._score_cuts[head], self._sign * value)]

    def curve(self, head: int, values: np.ndarray) -> np.ndarray:
        """Vectorised lookup over an array of metric values of one head (NaN -> the least confident bin)."""
        values = np.asarray(values, dtype=np.float64)
        scores = np.where(np.isnan(values), -np.inf, self._sign * values)
        index = np.searchsorted(np.asarray(self._score_cuts[head]), scores, side="right")
        return np.asarray(self.accuracy[head])[index]

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "cuts": [list(c) for c in self.cuts],
            "accuracy": [list(a) for a in self.accuracy],
        }

    @classmethod
    def from_dict(cls, data: dict) -> DraftAccuracy:
        return cls(data["metric"], tuple(map(tuple, data["cuts"])), tuple(map(tuple, data["accuracy"])))


def pool_adjacent_violators(y: Sequence[float], weights: Sequence[float]) -> np.ndarray:
    """Weighted isotonic (non-decreasing) regression of `y`: the closest non-decreasing sequence in weighted
    least squares, by pooling adjacent blocks that violate the order into their weighted mean."""
    blocks: list[list[float]] = []  # [mean, weight, number of entries]
    for value, weight in zip(y, weights, strict=True):
        blocks.append([float(value), float(weight), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.repeat([b[0] for b in blocks], [int(b[2]) for b in blocks])


def _head_curve(scores: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(cuts, accuracy) on the confidence-score scale (ascending) for one head's finite tokens."""
    if len(scores) == 0:
        return np.empty(0), np.zeros(1)  # no defined value: the head never exits on this metric
    # Cuts are data values at evenly spaced quantiles; duplicates (ties) collapse into one cut.
    levels = np.arange(1, n_bins) / n_bins
    cuts = np.unique(np.quantile(scores, levels, method="inverted_cdf"))
    while True:
        counts = np.bincount(np.searchsorted(cuts, scores, side="right"), minlength=len(cuts) + 1)
        empty = np.flatnonzero(counts == 0)
        if not empty.size:
            break
        cuts = np.delete(cuts, max(empty[0] - 1, 0))  # merge the empty bin into a neighbour
    hits = np.bincount(np.searchsorted(cuts, scores, side="right"), weights=correct, minlength=len(cuts) + 1)
    return cuts, pool_adjacent_violators(hits / counts, counts)


def fit_draft_accuracy(
    values: np.ndarray, correct: np.ndarray, metric: str, n_bins: int = DEFAULT_BINS
) -> DraftAccuracy:
    """Per-draft accuracy per head from calibration tokens: `values`, `correct` are [n_tokens, n_heads]
    (metric values on the metric's scale; does the head's argmax equal the full model's)."""
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins}: the draft accuracy needs at least one bin")
    values, correct = np.asarray(values, dtype=np.float64), np.asarray(correct, dtype=bool)
    if values.ndim != 2 or values.shape != correct.shape:
        raise ValueError(
            f"values and correct must both be [n_tokens, n_heads]; got {values.shape}, {correct.shape}"
        )
    sign = -1.0 if get_metric(metric).lower_is_confident else 1.0
    cuts, accuracy = [], []
    for k in range(values.shape[1]):
        scores, ok = finite_pairs(sign * values[:, k], correct[:, k])
        c, a = _head_curve(scores, ok.astype(np.float64), n_bins)
        cuts.append(tuple(float(sign * x) for x in c))
        accuracy.append(tuple(float(x) for x in a))
    return DraftAccuracy(metric, tuple(cuts), tuple(accuracy))
