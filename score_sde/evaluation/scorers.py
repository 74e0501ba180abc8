"""Sample-quality scorers of ``main.py --mode eval`` (``evaluation.run``): reset per checkpoint,
fed batch by batch, then read.

* :class:`DigitsScorer`: Fréchet Digits Distance and classifier score of the embedded digits
  (``evaluation.digits_metric``);
* :class:`InceptionScorer`: FID (Heusel et al. 2017, eq. 6), Inception score (Salimans et al.
  2016) and KID (Bińkowski et al. 2018) against the training split's pool3 features, cached once
  per reference set under ``inception.cache_dir()`` (:func:`reference_name`).

:func:`get_scorer` picks the scorer of ``config.data.dataset`` and loads every file it needs (the
digits classifier, or the Inception weights and the reference features) before any sampling.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from score_sde import datasets
from score_sde.evaluation import digits_metric, fid, inception, metrics, records

log = logging.getLogger(__name__)


class DigitsScorer:
    """Fréchet Digits Distance and classifier score (``evaluation.digits_metric``) of samples."""

    metric = "digits"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the previous checkpoint's samples."""
        self.images: list[torch.Tensor] = []

    def update(self, images: torch.Tensor) -> None:
        """Add quantised images (B, 1, H, W) in [0, 1]."""
        self.images.append(images)

    def result(self) -> dict:
        """``fdd`` and ``classifier_score`` of all images so far."""
        return digits_metric.evaluate_digits(torch.cat(self.images))

    def info(self) -> dict:
        """What the numbers depend on: the classifier file (its metadata and sha256)."""
        return {"name": self.metric, "classifier": digits_metric.classifier_info()}


class InceptionScorer:
    """FID, Inception score and KID (``evaluation.fid``) against a reference set's pool3
    features: their statistics ``(mu, sigma)`` and the features (M, 2048) themselves for KID."""

    metric = "inception"

    def __init__(self, model: nn.Module, reference: tuple[np.ndarray, np.ndarray],
                 features: np.ndarray, batch_size: int, reference_name: str) -> None:
        self.model, self.reference, self.reference_features = model, reference, features
        self.batch_size, self.reference_name = batch_size, reference_name
        self.reset()

    def reset(self) -> None:
        """Forget the previous checkpoint's features."""
        self.feats: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []

    def update(self, images: torch.Tensor) -> None:
        """Pool3 features and class probabilities of quantised images (B, C, H, W) in [0, 1];
        only these are kept (float32), never the images."""
        f, p = inception.inception_outputs(self.model, images, batch_size=self.batch_size)
        self.feats.append(f.float())
        self.probs.append(p.float())

    def result(self) -> dict:
        """``fid``, ``inception_score`` (+ std over 10 splits) and ``kid`` (+ std)."""
        feats = torch.cat(self.feats).double()
        probs = torch.cat(self.probs).double()
        probs = probs / probs.sum(dim=1, keepdim=True)  # undo the float32 round-off of the sums
        is_mean, is_std = metrics.inception_score(probs, num_splits=min(10, len(probs)))
        kid, kid_std = metrics.kernel_inception_distance(feats, self.reference_features)
        fid_value = metrics.frechet_distance(*metrics.feature_statistics(feats), *self.reference)
        return {"fid": fid_value,
                "inception_score": is_mean, "inception_score_std": is_std,
                "kid": kid, "kid_std": kid_std}

    def info(self) -> dict:
        """What the numbers depend on: the reference set (name, size) and the weights file."""
        return {"name": self.metric, "reference": self.reference_name,
                "num_reference": len(self.reference_features),
                "weights": inception.FID_WEIGHTS_NAME,
                "weights_sha256": inception.FID_WEIGHTS_SHA256}


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` of ``arrays`` to ``path``, atomically (``records.atomic_write_bytes``)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    records.atomic_write_bytes(path, buffer.getvalue())


def reference_name(config) -> str:
    """Cache name of the reference set: ``cifar10_train`` for 32x32 CIFAR-10 (the papers'
    reference), else the dataset, size and a hash of ``config.data``."""
    if config.data.dataset == "CIFAR10" and config.data.image_size == 32:
        return "cifar10_train"
    digest = hashlib.sha256(json.dumps(config.data.to_dict(), sort_keys=True,
                                       default=str).encode()).hexdigest()[:8]
    return f"{config.data.dataset.lower()}_{config.data.image_size}_{digest}_train"


def _reference_features(config, model, batch_size: int) -> tuple[np.ndarray, tuple]:
    """Pool3 features (M, 2048) float32 of the training split, computed once and cached as
    ``<cache_dir()>/fid_features_<name>.npz``, and their (mu, sigma) from
    ``fid_stats_<name>.npz`` (``fid.reference_statistics``' cache file, written here from the
    same features when absent; a pytorch-fid / TTUR statistics file may be dropped in)."""
    name = reference_name(config)
    path = inception.cache_dir() / f"fid_features_{name}.npz"
    stats_path = inception.cache_dir() / f"fid_stats_{name}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as saved:
            features = saved["features"]
    else:
        data = datasets.get_dataset(config, "train")
        batches = datasets.DataIterator(data, batch_size, shuffle=False)
        log.info("pool3 features of %d training images for %s (once)", len(data), path)
        features = fid.inception_features(model, batches, batch_size=batch_size)[0].float().numpy()
        _write_npz(path, features=features)
    if not stats_path.is_file():
        mu, sigma = metrics.feature_statistics(features)
        _write_npz(stats_path, mu=mu, sigma=sigma, num_samples=np.int64(len(features)))
    return features, fid.load_statistics(stats_path)


def get_scorer(config) -> DigitsScorer | InceptionScorer:
    """The scorer of ``config.data.dataset``, with every file it needs loaded now, before any
    sampling: the digits classifier, or the FID Inception weights and reference features.

    Raises:
        FileNotFoundError: the Inception weights are absent and cannot be downloaded (the message
            names the file and where to put it).
        NotImplementedError: point data, which has no sample-quality metric here.
    """
    if config.data.dataset == "digits":
        digits_metric.load_digits_classifier()
        return DigitsScorer()
    if len(datasets.data_shape(config)) != 3:
        raise NotImplementedError(
            f"no sample-quality metric for point data ({config.data.dataset}); set "
            "--config.eval.enable_sampling=False")
    model = inception.load_fid_inception().to(config.device)
    batch_size = min(config.eval.batch_size, 200)
    features, stats = _reference_features(config, model, batch_size)
    return InceptionScorer(model, stats, features, batch_size, reference_name(config))
