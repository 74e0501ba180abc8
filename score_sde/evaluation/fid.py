"""FID, KID and Inception score of samples with the FID Inception-v3, and cached reference
statistics of a dataset.

FID (Heusel et al. 2017) compares Gaussian fits of pool3 features of samples and of a reference
set (CIFAR-10 train in the papers); KID (Bińkowski et al. 2018) compares the features themselves;
the Inception score (Salimans et al. 2016) uses the class probabilities of the samples alone.
Reference statistics are computed once and cached as ``.npz`` with ``mu`` (2048,) and ``sigma``
(2048, 2048), the format of pytorch-fid's and TTUR's published statistics files, which can be
dropped in instead.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from score_sde.evaluation.inception import FEATURE_DIM, FIDInceptionV3, cache_dir, inception_outputs
from score_sde.evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)
from score_sde.evaluation.records import atomic_write_bytes


@torch.no_grad()
def inception_features(
    model: FIDInceptionV3, batches: Iterable[torch.Tensor], *, batch_size: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool3 features (N, 2048) and unbiased class probabilities (N, 1008), float64 on the CPU,
    of image batches (B, C, H, W) in [0, 1] (a tensor, a list or a data loader's images)."""
    feats, probs = [], []
    for images in batches:
        f, p = inception_outputs(model, images, batch_size=batch_size)
        feats.append(f)
        probs.append(p)
    if not feats:
        raise ValueError("no images given")
    return torch.cat(feats), torch.cat(probs)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` (2048,) and ``sigma`` (2048, 2048) from an ``.npz`` (ours, pytorch-fid's, TTUR's)."""
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {sorted(data)}")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(f"{path}: mu {mu.shape} / sigma {sigma.shape}, expected "
                         f"({FEATURE_DIM},) / ({FEATURE_DIM}, {FEATURE_DIM}) pool3 statistics")
    return mu, sigma


def reference_statistics(
    name: str,
    images: Callable[[], Iterable[torch.Tensor]],
    model: FIDInceptionV3,
    *,
    path: str | os.PathLike | None = None,
    batch_size: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """Pool3 mean and covariance of a reference set, computed once and cached.

    Args:
        name: the set's name, e.g. ``'cifar10_train'``; the cache file is
            ``<cache_dir()>/fid_stats_<name>.npz`` unless ``path`` is given.
        images: called only when there is no cache file; returns batches (B, C, H, W) in [0, 1].
        model: the FID Inception.
    Returns:
        mu (2048,), sigma (2048, 2048), float64.
    """
    path = Path(path) if path is not None else cache_dir() / f"fid_stats_{name}.npz"
    if path.is_file():
        return load_statistics(path)
    feats, _ = inception_features(model, images(), batch_size=batch_size)
    mu, sigma = feature_statistics(feats)
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma, num_samples=np.int64(len(feats)))
    atomic_write_bytes(path, buffer.getvalue())
    return mu, sigma


def inception_metrics(
    samples: torch.Tensor,
    model: FIDInceptionV3,
    reference: tuple[np.ndarray, np.ndarray],
    *,
    reference_features: torch.Tensor | None = None,
    batch_size: int = 50,
    num_splits: int = 10,
) -> dict:
    """FID, Inception score (mean, std over ``num_splits``) and, with ``reference_features``
    (M, 2048), KID of samples (N, C, H, W) in [0, 1] (see ``metrics.quantize_images``)."""
    feats, probs = inception_features(model, [samples], batch_size=batch_size)
    is_mean, is_std = inception_score(probs, num_splits=num_splits)
    out = {"fid": frechet_distance(*feature_statistics(feats), *reference),
           "inception_score": is_mean, "inception_score_std": is_std}
    if reference_features is not None:
        out["kid"], out["kid_std"] = kernel_inception_distance(feats, reference_features)
    return out
