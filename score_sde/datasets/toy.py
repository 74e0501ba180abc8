"""2-D toy distributions and the analytic Gaussian mixture, as fixed seeded point sets.

Points are scaled to roughly [-1, 1]^2 ... [-4, 4]^2 as in the papers that use them; the data
is not rescaled by ``data.centered``-style scalers (set ``data.centered = False``).
"""

from __future__ import annotations

import math

import torch

from score_sde import oracle
from score_sde.datasets.base import ArrayDataset, register_dataset
from score_sde.utils import Registry

TOYS = Registry("toy distribution")
_SPLIT_SEEDS = {"train": 0, "test": 1}


@TOYS.register("checkerboard")
def checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    """Uniform on the dark squares of a 4x4 checkerboard over [-4, 4]^2 (FFJORD's toy)."""
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g) * 2.0
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=1) * 2


@TOYS.register("moons")
def moons(n: int, g: torch.Generator) -> torch.Tensor:
    """Two interleaved half circles with Gaussian noise (std 0.1), centred."""
    upper = torch.rand(n, generator=g) < 0.5
    angle = torch.rand(n, generator=g) * math.pi
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x - 0.5, y - 0.25], dim=1) * 2
    return points + 0.1 * torch.randn(n, 2, generator=g)


@TOYS.register("swissroll")
def swissroll(n: int, g: torch.Generator) -> torch.Tensor:
    """A 2-D Swiss roll (radius grows with the angle), noise std 0.1."""
    angle = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    points = torch.stack([angle * torch.cos(angle), angle * torch.sin(angle)], dim=1) / 3
    return points + 0.1 * torch.randn(n, 2, generator=g)


@TOYS.register("ring")
def ring(n: int, g: torch.Generator) -> torch.Tensor:
    """The analytic mixture :meth:`oracle.GaussianMixture.ring` (8 modes, radius 4, std 0.3)."""
    return oracle.GaussianMixture.ring().sample(n, generator=g)


@register_dataset("toy_2d")
def load_toy_2d(config, split: str) -> ArrayDataset:
    """``data.num_samples`` points (N, 2) of the toy ``data.toy`` (one seeded draw per split)."""
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"Unknown toy split {split!r}; valid: {', '.join(_SPLIT_SEEDS)}")
    if config.data.dim != 2:
        raise ValueError(f"toy distributions are 2-D: data.dim must be 2, got {config.data.dim}")
    g = torch.Generator().manual_seed(config.seed * 2 + _SPLIT_SEEDS[split])
    x = TOYS.get(config.data.toy)(config.data.num_samples, g).float()
    return ArrayDataset(x, torch.zeros(x.shape[0], dtype=torch.int64))


@register_dataset("gmm")
def load_gmm(config, split: str) -> ArrayDataset:
    """Draws (N, D) from a seeded random mixture with exact scores (``oracle.GaussianMixture``).

    ``data.dim`` dimensions, ``data.n_modes`` modes; the mixture itself comes from seed
    ``config.seed`` and is the same for both splits (see :func:`gaussian_mixture`).
    """
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"Unknown gmm split {split!r}; valid: {', '.join(_SPLIT_SEEDS)}")
    mixture = gaussian_mixture(config)
    g = torch.Generator().manual_seed(config.seed * 2 + _SPLIT_SEEDS[split])
    x, labels = mixture.sample(config.data.num_samples, generator=g, return_labels=True)
    return ArrayDataset(x, labels, classes=tuple(str(k) for k in range(mixture.n_modes)))


def gaussian_mixture(config) -> oracle.GaussianMixture:
    """The analytic mixture behind ``data.dataset = 'gmm'`` (exact scores and log-densities)."""
    return oracle.GaussianMixture.random(config.data.dim, config.data.n_modes, seed=config.seed)
