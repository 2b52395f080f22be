"""AUROC and risk–coverage curves against reference implementations, ties included."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.exits.separation import aurc, auroc, risk_coverage, sample_risk_coverage


@pytest.mark.parametrize("n_levels", [3, 10, 1000])
def test_auroc_matches_sklearn_with_ties(n_levels):
    rng = np.random.default_rng(n_levels)
    scores = rng.integers(0, n_levels, size=2000).astype(float)  # few levels: heavy ties
    correct = rng.uniform(size=2000) < 0.2 + 0.6 * scores / n_levels
    assert auroc(scores, correct) == pytest.approx(roc_auc_score(correct, scores), abs=1e-12)


def test_auroc_edge_cases():
    assert auroc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert auroc(np.array([0.9, 0.1]), np.array([False, True])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([False, True])) == 0.5
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([True, True])))  # one class only
    # NaN scores (metric undefined) are dropped, not ranked.
    scores, correct = np.array([0.1, np.nan, 0.9]), np.array([False, False, True])
    assert auroc(scores, correct) == 1.0


def test_risk_coverage_matches_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, size=500).astype(float)
    correct = rng.uniform(size=500) < scores / 20
    thresholds, coverage, risk = risk_coverage(scores, correct)
    assert np.all(np.diff(thresholds) < 0) and np.all(np.diff(coverage) > 0) and coverage[-1] == 1.0
    for t, cov, r in zip(thresholds, coverage, risk, strict=True):
        exited = scores >= t  # inclusive threshold: tied tokens exit together
        assert cov == pytest.approx(exited.mean())
        assert r == pytest.approx(1.0 - correct[exited].mean())
    widths = np.diff(np.r_[0.0, coverage])
    assert aurc(scores, correct) == pytest.approx((widths * risk).sum())


def test_sample_risk_coverage_endpoints():
    scores = np.array([3.0, 2.0, 2.0, 1.0])
    correct = np.array([True, True, False, False])
    levels, risk = sample_risk_coverage(scores, correct, n_points=5)  # coverage 0, .25, .5, .75, 1
    assert levels.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # 0 and .25 -> first point (1 token, risk 0); .5 and .75 -> tie group (3 tokens, risk 1/3); 1 -> all.
    assert risk == pytest.approx([0.0, 0.0, 1 / 3, 1 / 3, 0.5])
