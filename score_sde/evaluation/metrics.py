"""Sample-quality metrics on feature vectors: Fréchet distance (FID), KID and Inception score.

The formulas act on features and class probabilities from any network (Inception-v3 for the
published protocol, a small digits classifier for the embedded default); they are computed in
float64 with torch and scipy only.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def _as_features(name: str, feats) -> np.ndarray:
    arr = np.asarray(feats.detach().cpu() if isinstance(feats, torch.Tensor) else feats,
                     dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(f"{name} must have shape (N >= 2, F), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values")
    return arr


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) of features (N, F)."""
    arr = _as_features("features", feats)
    return arr.mean(axis=0), np.cov(arr, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6):
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}).

    The matrix square root is taken as (sqrt(sigma1) sigma2 sqrt(sigma1))^{1/2}, a symmetric PSD
    form whose trace equals tr((sigma1 sigma2)^{1/2}) and which has no complex round-off.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shapes do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    root1 = _psd_sqrt(s1)
    cross = _psd_sqrt(root1 @ s2 @ root1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(cross))


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = scipy.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid_from_features(feats1, feats2) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets (N, F)."""
    return frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2))


def kernel_inception_distance(
    feats1, feats2, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / F + 1)^3
    (Bińkowski et al. 2018), averaged over random subsets; returns (mean, std over subsets)."""
    a = _as_features("feats1", feats1)
    b = _as_features("feats2", feats2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        values.append(_mmd2_unbiased(x, y))
    return float(np.mean(values)), float(np.std(values))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    F = x.shape[1]
    kxx = (x @ x.T / F + 1) ** 3
    kyy = (y @ y.T / F + 1) ** 3
    kxy = (x @ y.T / F + 1) ** 3
    m = x.shape[0]
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2 * kxy.mean())


def inception_score(probs, *, num_splits: int = 10) -> tuple[float, float]:
    """Inception score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016) over ``num_splits``
    splits of class probabilities (N, C); returns (mean, std)."""
    p = _as_features("probs", probs)
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("probs must be non-negative rows summing to 1")
    if not 1 <= num_splits <= p.shape[0]:
        raise ValueError(f"num_splits must be in [1, {p.shape[0]}], got {num_splits}")
    scores = []
    for part in np.array_split(p, num_splits):
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def quantize_images(images: torch.Tensor) -> torch.Tensor:
    """Samples as the reference evaluates them: ``floor(255 clip(x, 0, 1)) / 255``.

    The reference's ``evaluate`` writes ``np.clip(x * 255., 0, 255).astype(np.uint8)`` (the cast
    truncates) and computes FID / IS on those bytes; the feature networks here take [0, 1] floats,
    so this is that step without leaving float. Shape (N, C, H, W) kept.
    """
    if not isinstance(images, torch.Tensor) or not torch.is_floating_point(images):
        raise TypeError("images must be a floating-point tensor")
    if not torch.isfinite(images).all():
        raise ValueError("images contain non-finite values")
    return torch.floor(images.clamp(0, 1) * 255) / 255
