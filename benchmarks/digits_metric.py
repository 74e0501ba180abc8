"""Digits metric (FDD, classifier score) of real digits and of degraded stand-ins for samples.

    OMP_NUM_THREADS=1 python benchmarks/digits_metric.py [--n 297]

Rows: the training digits (the reference set, FDD ~ 0), 297 of them (the small-N bias), held-out
digits, held-out digits with Gaussian noise or blur and samples of the digits' Gaussian fit (a
half-trained model's typical failure modes), and uniform noise.
FDD is biased upwards for small N, so compare rows with the same N.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from score_sde.evaluation import digits_metric as dm  # noqa: E402
from score_sde.evaluation.metrics import quantize_images  # noqa: E402


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with a 5x5 kernel, replicate padding."""
    k = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / (2 * sigma**2))
    k = (k[:, None] * k[None]) / k.sum() ** 2
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.view(1, 1, 5, 5))


def gaussian_fit(n: int, g: torch.Generator) -> torch.Tensor:
    """Samples of N(mean, covariance) of the train digits: a model of the first two moments."""
    x = dm.digits_split("train")[0].reshape(-1, 64).double()
    chol = torch.linalg.cholesky(torch.cov(x.T) + 1e-6 * torch.eye(64, dtype=torch.float64))
    z = torch.randn(n, 64, generator=g, dtype=torch.float64)
    return (x.mean(0) + z @ chol.T).float().reshape(n, 1, 8, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=297, help="images per row (<= 297)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    test = dm.digits_split("test")[0][: args.n]

    def noisy(sd: float) -> torch.Tensor:
        return quantize_images(test + sd * torch.randn(test.shape, generator=g))

    rows = {
        "train digits (reference)": dm.digits_split("train")[0],
        "297 train digits": dm.digits_split("train")[0][torch.randperm(1500, generator=g)[:297]],
        "held-out digits": test,
        "held-out + noise sd 0.1": noisy(0.1),
        "held-out + noise sd 0.3": noisy(0.3),
        "held-out, blur sd 0.7": blur(test, 0.7),
        "held-out, blur sd 1.0": blur(test, 1.0),
        "Gaussian fit of the digits": quantize_images(gaussian_fit(len(test), g)),
        "uniform noise": torch.rand(test.shape, generator=g),
    }
    print(f"{'images':28s} {'N':>5s} {'FDD':>9s} {'cls score':>9s} {'ms':>6s}")
    for name, images in rows.items():
        start = time.perf_counter()
        scores = dm.evaluate_digits(images)
        ms = 1e3 * (time.perf_counter() - start)
        print(f"{name:28s} {len(images):5d} {scores['fdd']:9.2f} "
              f"{scores['classifier_score']:9.3f} {ms:6.1f}")


if __name__ == "__main__":
    main()
