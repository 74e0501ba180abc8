"""The digits metric: stored classifier vs a deterministic rebuild, reference statistics, and
separation of held-out real digits from noise, noisy and blurred digits and a Gaussian model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from score_sde.evaluation import digits_metric as dm
from score_sde.evaluation.metrics import feature_statistics, quantize_images


@pytest.fixture(scope="module")
def test_digits() -> torch.Tensor:
    return dm.digits_split("test")[0]  # (297, 1, 8, 8), never seen in training


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / (2 * sigma**2))
    k = (k[:, None] * k[None]) / k.sum() ** 2
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.view(1, 1, 5, 5))


def _gaussian_fit_samples(n: int, generator: torch.Generator) -> torch.Tensor:
    """Samples of N(mean, covariance) of the train digits: an under-trained model that has
    learned the first two moments only (the exact score of that Gaussian gives these)."""
    x = dm.digits_split("train")[0].reshape(-1, 64).double()
    chol = torch.linalg.cholesky(torch.cov(x.T) + 1e-6 * torch.eye(64, dtype=torch.float64))
    z = torch.randn(n, 64, generator=generator, dtype=torch.float64)
    return (x.mean(0) + z @ chol.T).float().reshape(n, 1, 8, 8)


def test_stored_file_is_small_and_accurate():
    assert dm.WEIGHTS_FILE.stat().st_size < 300_000
    assert dm.accuracy(dm.load_digits_classifier(), "test") > 0.95
    info = dm.classifier_info()
    assert info["reference"].startswith("digits train split") and len(info["sha256"]) == 64


def test_build_is_deterministic():
    a = dm.build_digits_classifier(epochs=1)
    b = dm.build_digits_classifier(epochs=1)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.slow  # a full training of the classifier; by default test_build_is_deterministic and
# test_stored_file_is_small_and_accurate keep the build and the stored weights covered
def test_rebuild_reproduces_the_stored_classifier(test_digits):
    # Bits may differ on another CPU (vector kernels round differently), so compare behaviour:
    # held-out accuracy and agreement with the stored classifier.
    rebuilt = dm.build_digits_classifier()
    stored = dm.load_digits_classifier()
    assert dm.accuracy(rebuilt, "test") > 0.95
    with torch.no_grad():
        agree = (rebuilt(test_digits).argmax(1) == stored(test_digits).argmax(1)).double().mean()
    assert agree > 0.97


def test_reference_statistics_are_the_train_digits_features():
    mu, sigma = dm.reference_statistics()
    assert mu.shape == (dm.FEATURE_DIM,) and sigma.shape == (dm.FEATURE_DIM, dm.FEATURE_DIM)
    feats, _ = dm.digits_features(dm.digits_split("train")[0])
    mu2, sigma2 = feature_statistics(feats)
    np.testing.assert_allclose(mu, mu2, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, sigma2, rtol=1e-6, atol=1e-9)
    # scale of the features' total variance: the FDD values below are read against it
    assert np.trace(sigma) > 10


def test_metric_separates_real_digits_from_noise_and_degraded_samples(test_digits):
    g = torch.Generator().manual_seed(0)
    real = dm.evaluate_digits(test_digits)
    degraded = {
        "uniform noise": torch.rand(test_digits.shape, generator=g),
        "strong noise": quantize_images(test_digits + 0.3 * torch.randn(test_digits.shape,
                                                                         generator=g)),
        "blurred": _blur(test_digits, 1.0),
        "gaussian model": quantize_images(_gaussian_fit_samples(len(test_digits), g)),
    }
    for name, images in degraded.items():
        scores = dm.evaluate_digits(images)
        assert scores["fdd"] > 2.5 * real["fdd"], name
        assert scores["classifier_score"] < real["classifier_score"] - 1.5, name
    assert real["classifier_score"] > 8.5  # 10 balanced, confidently classified classes
    train = dm.evaluate_digits(dm.digits_split("train")[0])
    assert abs(train["fdd"]) < 1e-3  # the reference set itself


def test_same_input_same_numbers(test_digits):
    x = quantize_images(test_digits + 0.1 * torch.randn(test_digits.shape,
                                                         generator=torch.Generator()))
    assert dm.evaluate_digits(x) == dm.evaluate_digits(x.clone())
    assert dm.frechet_digits_distance(x) == dm.evaluate_digits(x)["fdd"]
    assert dm.digits_classifier_score(x)[0] == dm.evaluate_digits(x)["classifier_score"]


def test_other_image_sizes_use_resampled_reference(test_digits):
    train = dm.digits_split("train")[0]
    up = F.interpolate(train, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    assert abs(dm.frechet_digits_distance(up)) < 1e-3
    held_out = F.interpolate(test_digits, size=(16, 16), mode="bilinear", align_corners=False)
    assert dm.frechet_digits_distance(held_out.clamp(0, 1)) < 0.5 * dm.frechet_digits_distance(
        _blur(held_out, 2.0))


@pytest.mark.parametrize("bad, error", [
    (torch.rand(10, 3, 8, 8), ValueError),
    (torch.rand(10, 1, 8, 6), ValueError),
    (torch.rand(1, 1, 8, 8), ValueError),
    (torch.rand(10, 1, 8, 8) + 1, ValueError),
    (torch.zeros(10, 1, 8, 8, dtype=torch.uint8), TypeError),
])
def test_rejects_bad_images(bad, error):
    with pytest.raises(error):
        dm.evaluate_digits(bad)
