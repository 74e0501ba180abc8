"""FIR up/down-sampling and convolutions with fused resampling, in plain PyTorch.

The resampling filters of StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image
Quality of StyleGAN", Sec. 4 and App. B; NVlabs/stylegan2 ``dnnlib/tflib/ops/upfirdn_2d.py``),
used by NCSN++ (Song et al. 2021, App. H). Everything is built on :func:`upfirdn2d` (zero-insertion
upsampling, padding, FIR filtering, decimation), written with ``F.pad`` and ``F.conv2d`` only: no
custom CUDA op, no JIT compilation, the same numbers on every device.

A FIR kernel ``k`` is given as taps, e.g. ``(1, 3, 3, 1)``; a 1-D kernel is made separable (outer
product) and normalised to sum 1, then scaled by ``gain`` (times ``factor**2`` when upsampling, to
keep the signal magnitude).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import Initializer

Kernel = Sequence[float] | Sequence[Sequence[float]] | torch.Tensor


def _normalised_kernel(k: Kernel) -> torch.Tensor:
    k = torch.as_tensor(k, dtype=torch.float32)
    if k.dim() == 1:
        k = torch.outer(k, k)
    if k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {tuple(k.shape)}")
    return k / k.sum()


@functools.lru_cache(maxsize=64)
def _kernel_on(taps: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _normalised_kernel(taps).to(device=device, dtype=dtype)


def setup_kernel(k: Kernel, like: torch.Tensor | None = None) -> torch.Tensor:
    """A square 2-D FIR kernel normalised to sum 1: taps (K,) -> outer product (K, K).

    Args:
        k: 1-D taps (made separable) or a 2-D kernel.
        like: put the kernel on this tensor's device and dtype (default float32 on CPU). Kernels
            given as taps are then built once per device and dtype and shared (every resampling
            layer calls this in its forward): do not modify the result in place.
    """
    if like is None:
        return _normalised_kernel(k)
    if isinstance(k, torch.Tensor):
        return _normalised_kernel(k).to(device=like.device, dtype=like.dtype)
    taps = tuple(tuple(row) if isinstance(row, (list, tuple)) else row for row in k)
    return _kernel_on(taps, like.device, like.dtype)


def upfirdn2d(
    x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with a FIR kernel, decimate (StyleGAN2).

    The same ``up``, ``down`` and ``pad = (before, after)`` apply to both spatial axes; negative
    padding crops. The kernel is applied as a true convolution (flipped), as in StyleGAN2.

    Args:
        x: (B, C, H, W) images.
        kernel: (K, K) FIR kernel (see :func:`setup_kernel`).
    Returns:
        (B, C, H', W') with ``H' = (H * up + pad[0] + pad[1] - K) // down + 1``.
    """
    B, C, H, W = x.shape
    K = kernel.shape[0]
    p0, p1 = pad
    h = x.reshape(B * C, 1, H, 1, W, 1)
    # Zero insertion: each pixel is followed by up - 1 zeros along both axes.
    h = F.pad(h, [0, up - 1, 0, 0, 0, up - 1]).reshape(B * C, 1, H * up, W * up)
    h = F.pad(h, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    h = h[:, :, max(-p0, 0) : h.shape[2] - max(-p1, 0), max(-p0, 0) : h.shape[3] - max(-p1, 0)]
    w = torch.flip(kernel, [0, 1]).reshape(1, 1, K, K).to(h)
    h = F.conv2d(h, w, stride=down)
    return h.reshape(B, C, h.shape[2], h.shape[3])


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling: (B, C, H, W) -> (B, C, factor H, factor W)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H, 1, W, 1).repeat(1, 1, 1, factor, 1, factor)
    return x.reshape(B, C, H * factor, W * factor)


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Average pooling: (B, C, H, W) -> (B, C, H / factor, W / factor)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // factor, factor, W // factor, factor)
    return torch.mean(x, dim=(3, 5))


def _check_factor(factor: int) -> None:
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")


def upsample_2d(
    x: torch.Tensor, k: Kernel | None = None, factor: int = 2, gain: float = 1
) -> torch.Tensor:
    """FIR upsampling: (B, C, H, W) -> (B, C, factor H, factor W) (StyleGAN2 ``upsample_2d``).

    The default kernel ``[1] * factor`` is nearest-neighbour upsampling; a constant image is
    scaled by ``gain``.
    """
    _check_factor(factor)
    kernel = setup_kernel([1] * factor if k is None else k, like=x) * (gain * factor**2)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(
    x: torch.Tensor, k: Kernel | None = None, factor: int = 2, gain: float = 1
) -> torch.Tensor:
    """FIR downsampling: (B, C, H, W) -> (B, C, H / factor, W / factor) (StyleGAN2).

    The default kernel ``[1] * factor`` is average pooling; a constant image is scaled by ``gain``.
    """
    _check_factor(factor)
    kernel = setup_kernel([1] * factor if k is None else k, like=x) * gain
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(
    x: torch.Tensor, w: torch.Tensor, k: Kernel | None = None, factor: int = 2, gain: float = 1
) -> torch.Tensor:
    """FIR upsampling fused with a convolution, padded once (StyleGAN2 ``upsample_conv_2d``).

    Equivalent, away from the borders, to ``F.conv2d(upsample_2d(x, k), w, padding=K_w // 2)``:
    a strided transposed convolution (with the spatially flipped weight, so that ``w`` acts as a
    cross-correlation like ``F.conv2d``) followed by the FIR filter.

    Args:
        x: (B, C_in, H, W).
        w: (C_out, C_in, K_w, K_w) convolution weight, ``K_w`` odd.
    Returns:
        (B, C_out, factor H, factor W).
    """
    _check_factor(factor)
    out_ch, in_ch, conv_h, conv_w = w.shape
    if conv_h != conv_w:
        raise ValueError(f"upsample_conv_2d needs a square kernel, got {tuple(w.shape)}")
    kernel = setup_kernel([1] * factor if k is None else k, like=x) * (gain * factor**2)
    p = (kernel.shape[0] - factor) - (conv_w - 1)
    num_groups = x.shape[1] // in_ch
    # (C_out, C_in, kh, kw) -> (groups * C_in, C_out / groups, kh, kw), flipped: the layout of
    # conv_transpose2d that makes it the adjoint of a cross-correlation with w.
    w = w.reshape(num_groups, -1, in_ch, conv_h, conv_w)
    w = torch.flip(w, [3, 4]).permute(0, 2, 1, 3, 4)
    w = w.reshape(num_groups * in_ch, -1, conv_h, conv_w)
    h = F.conv_transpose2d(x, w, stride=factor, padding=0, groups=num_groups)
    return upfirdn2d(h, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(
    x: torch.Tensor, w: torch.Tensor, k: Kernel | None = None, factor: int = 2, gain: float = 1
) -> torch.Tensor:
    """A convolution fused with FIR downsampling, padded once (StyleGAN2 ``conv_downsample_2d``).

    Equivalent, away from the borders, to ``downsample_2d(F.conv2d(x, w, padding=K_w // 2), k)``.

    Args:
        x: (B, C_in, H, W).
        w: (C_out, C_in, K_w, K_w) convolution weight.
    Returns:
        (B, C_out, H / factor, W / factor).
    """
    _check_factor(factor)
    conv_h, conv_w = w.shape[2:]
    if conv_h != conv_w:
        raise ValueError(f"conv_downsample_2d needs a square kernel, got {tuple(w.shape)}")
    kernel = setup_kernel([1] * factor if k is None else k, like=x) * gain
    p = (kernel.shape[0] - factor) + (conv_w - 1)
    h = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return F.conv2d(h, w, stride=factor, padding=0)


class Conv2d(nn.Module):
    """Conv2d with optional fused FIR upsampling or downsampling (StyleGAN2).

    Parameters ``weight`` (C_out, C_in, K, K) and ``bias`` (C_out,) as in the reference, so its
    state dicts load. (B, C_in, H, W) -> (B, C_out, H', W') with H' = 2H (``up``), H / 2
    (``down``) or H.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        up: bool = False,
        down: bool = False,
        resample_kernel: Kernel = (1, 3, 3, 1),
        use_bias: bool = True,
        kernel_init: Initializer | None = None,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        if kernel < 1 or kernel % 2 != 1:
            raise ValueError(f"Conv2d: kernel size must be odd and >= 1, got {kernel}")
        weight = torch.zeros(out_ch, in_ch, kernel, kernel)
        if kernel_init is not None:
            weight = kernel_init(weight.shape)
        self.weight = nn.Parameter(weight)
        if use_bias:
            self.bias = nn.Parameter(torch.zeros(out_ch))
        self.up = up
        self.down = down
        self.resample_kernel = tuple(resample_kernel)
        self.kernel = kernel
        self.use_bias = use_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = upsample_conv_2d(x, self.weight, k=self.resample_kernel)
        elif self.down:
            x = conv_downsample_2d(x, self.weight, k=self.resample_kernel)
        else:
            x = F.conv2d(x, self.weight, stride=1, padding=self.kernel // 2)
        if self.use_bias:
            x = x + self.bias.reshape(1, -1, 1, 1)
        return x
