"""Normalisation layers of the NCSN family, chosen by ``config.model.normalization``.

InstanceNorm++ (Song & Ermon 2019, "Generative modeling by estimating gradients of the data
distribution", App. A) is instance normalisation that puts back, through a learned scale
``alpha``, the information about each channel's mean that plain instance normalisation discards:
it is what NCSNv2 (Song & Ermon 2020, "Improved techniques for training score-based generative
models") uses. Parameter names (``alpha``, ``gamma``, ``beta``) are the reference's
(yang-song/score_sde_pytorch, ``models/normalization.py``), so its checkpoints load strictly.

Each normaliser is built as ``norm(num_features)`` and maps (B, C, H, W) -> (B, C, H, W).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from score_sde.utils import Registry

NORMALIZATIONS = Registry("normalization")

#: ``norm(num_features) -> module`` mapping (B, C, H, W) -> (B, C, H, W).
NormFactory = Callable[[int], nn.Module]

_EPS = 1e-5


def _scale_param(num_features: int) -> nn.Parameter:
    """A per-channel scale initialised at N(1, 0.02^2), as in NCSN."""
    return nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))


@NORMALIZATIONS.register("InstanceNorm++")
class InstanceNorm2dPlus(nn.Module):
    """InstanceNorm++ (Song & Ermon 2019, App. A): (B, C, H, W) -> (B, C, H, W).

    With per-image channel means mu_c, their mean m and (unbiased) variance v over channels,
    ``out = gamma_c * (IN(x)_c + alpha_c * (mu_c - m) / sqrt(v + eps)) + beta_c``, where IN is
    instance normalisation without affine parameters (eps 1e-5).

    Args:
        num_features: channel count C.
        bias: learn the shift ``beta`` (zero-initialised).
    """

    def __init__(self, num_features: int, bias: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.instance_norm = nn.InstanceNorm2d(num_features, affine=False)
        self.alpha = _scale_param(num_features)
        self.gamma = _scale_param(num_features)
        if bias:
            self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(dim=(2, 3))  # (B, C)
        # torch.var is unbiased here, as in the reference (jnp.var in its JAX twin is not).
        mu_hat = (mu - mu.mean(dim=1, keepdim=True)) / torch.sqrt(
            mu.var(dim=1, keepdim=True) + _EPS
        )
        h = self.instance_norm(x) + (mu_hat * self.alpha)[:, :, None, None]
        h = h * self.gamma[:, None, None]
        return h + self.beta[:, None, None] if self.bias else h


@NORMALIZATIONS.register("VarianceNorm")
class VarianceNorm2d(nn.Module):
    """Variance normalisation: each channel divided by its spatial std, then scaled.

    (B, C, H, W) -> (B, C, H, W): ``alpha_c * x_c / sqrt(var_c + 1e-5)`` (the mean is kept;
    unbiased spatial variance as in the reference).
    """

    def __init__(self, num_features: int, bias: bool = False) -> None:
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.alpha = _scale_param(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x / torch.sqrt(x.var(dim=(2, 3), keepdim=True) + _EPS)
        return self.alpha[:, None, None] * h


@NORMALIZATIONS.register("InstanceNorm")
def instance_norm(num_features: int) -> nn.Module:
    """Plain instance normalisation without affine parameters (eps 1e-5)."""
    return nn.InstanceNorm2d(num_features)


def get_normalization(config) -> NormFactory:
    """The normaliser factory named by ``config.model.normalization``.

    Valid names: ``InstanceNorm``, ``InstanceNorm++``, ``VarianceNorm``. (The DDPM U-Net uses
    GroupNorm with 32 fixed groups directly and does not come through here.)

    Returns:
        ``norm(num_features) -> nn.Module``.
    """
    return NORMALIZATIONS.get(config.model.normalization)
