"""Sample-quality metrics against closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from score_sde.evaluation.metrics import (
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)


def test_frechet_distance_of_gaussians_equals_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    # Commuting covariances (both diagonal): tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (a - b)^2 of roots.
    a, b = rng.uniform(0.5, 2, size=4), rng.uniform(0.5, 2, size=4)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # A non-commuting pair in 2-D against scipy's general square root.
    import scipy.linalg

    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 0.5]])
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1[:2] - mu2[:2]) ** 2) + np.trace(s1 + s2 - 2 * root)
    assert frechet_distance(mu1[:2], s1, mu2[:2], s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(1).normal(size=(500, 16))
    assert abs(fid_from_features(feats, feats)) < 1e-8
    shifted = feats + 1.0
    assert fid_from_features(feats, shifted) == pytest.approx(16.0, rel=1e-6)


def test_kid_is_unbiased_on_identical_distributions():
    rng = np.random.default_rng(2)
    values = []
    for _ in range(20):
        a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
        values.append(kernel_inception_distance(a, b, num_subsets=5, subset_size=200, seed=3)[0])
    mean, se = np.mean(values), np.std(values) / np.sqrt(len(values))
    assert abs(mean) < 4 * se
    far = kernel_inception_distance(rng.normal(size=(200, 8)), rng.normal(2, 1, size=(200, 8)),
                                    num_subsets=5, subset_size=200)[0]
    assert far > 20 * se


def test_inception_score_bounds():
    uniform = np.full((100, 10), 0.1)
    assert inception_score(uniform, num_splits=2)[0] == pytest.approx(1.0)
    confident = np.eye(10)[np.arange(100) % 10]
    assert inception_score(confident, num_splits=2)[0] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="sum"):
        inception_score(np.ones((10, 3)))
