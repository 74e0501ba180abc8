"""Analytic oracles: Gaussian-mixture data whose marginals under every SDE here are known exactly.

``GaussianMixture`` (diagonal components, :mod:`score_sde.oracle.diagonal`) is the ground truth of
the samplers', likelihoods' and losses' tests; ``FullGaussianMixture`` (full, possibly singular
covariances, :mod:`score_sde.oracle.full`) adds linear observations y = A x + n and the exact
posterior x | y, the ground truth of super-resolution and cascades (``samplers.cascade``).
"""

from score_sde.oracle.diagonal import GaussianMixture
from score_sde.oracle.full import FullGaussianMixture, area_downsampling_matrix

__all__ = ["FullGaussianMixture", "GaussianMixture", "area_downsampling_matrix"]
