"""StyleGAN2's fused bias + leaky ReLU (Karras et al. 2020), in plain PyTorch.

The reference implementation (yang-song/score_sde_pytorch, ``op/fused_act.py``) compiles a CUDA
kernel for ``scale * leaky_relu(x + bias, negative_slope)``; here it is two tensor operations, the
same numbers on every device, with autograd's gradients. ``FusedLeakyReLU`` keeps the reference's
parameter name (``bias``) so its state dicts load.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def fused_leaky_relu(
    x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2, scale: float = math.sqrt(2)
) -> torch.Tensor:
    """``scale * leaky_relu(x + bias)`` with a per-channel bias (StyleGAN2 ``fused_bias_act``).

    Args:
        x: (B, C, *S) activations.
        bias: (C,) per-channel bias.
        negative_slope: slope for negative inputs (0.2 in StyleGAN2).
        scale: output gain; sqrt(2) keeps the second moment of a unit Gaussian input.
    Returns:
        (B, C, *S), like ``x``.
    """
    if x.dim() < 2 or bias.shape != (x.shape[1],):
        raise ValueError(
            f"bias must be (C,) for x (B, C, ...): got bias {tuple(bias.shape)}, "
            f"x {tuple(x.shape)}"
        )
    bias = bias.reshape(1, -1, *([1] * (x.dim() - 2)))  # (1, C, 1, ..., 1)
    return F.leaky_relu(x + bias, negative_slope=negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    """Learned per-channel bias, leaky ReLU and gain: (B, C, *S) -> (B, C, *S).

    Args:
        channels: C.
        negative_slope: slope for negative inputs.
        scale: output gain.
    """

    def __init__(
        self, channels: int, negative_slope: float = 0.2, scale: float = math.sqrt(2)
    ) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)
