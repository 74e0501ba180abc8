"""Small tensor helpers used by every layer."""

from __future__ import annotations

import torch


def append_dims(c: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-sample tensor ``c`` (B,) to (B, 1, ..., 1) with ``ndim`` dimensions."""
    return c.reshape(c.shape + (1,) * (ndim - c.dim()))


def batch_mul(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multiply each sample of ``x`` (B, *D) by its coefficient ``c`` (B,) or a scalar."""
    if c.dim() == 0:
        return c * x
    return append_dims(c, x.dim()) * x


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: (B, *D) -> (B,)."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def as_batch_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a (B,) tensor on ``x``'s device and dtype; a scalar is broadcast."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if t.dim() == 0:
        return t.expand(x.shape[0])
    return t
