"""Building blocks of NCSN++ and DDPM++ (Song et al. 2021, App. H).

The improvements over the DDPM U-Net studied in App. H: Gaussian Fourier features of the noise
level (Tancik et al. 2020), FIR anti-aliased resampling (StyleGAN2, Karras et al. 2020), BigGAN
residual blocks that resample inside the block (Brock et al. 2019), residual connections rescaled
by 1/sqrt(2) and progressive input/output pyramids. Submodule and parameter names are the
reference's (yang-song/score_sde_pytorch, ``models/layerspp.py``) so its state dicts load
strictly.

GroupNorm here uses ``min(C // 4, 32)`` groups and eps 1e-6, as in the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models import up_or_down_sampling as updown
from models.layers import NIN, ddpm_conv1x1, ddpm_conv3x3, default_init, dense, spatial_attention
from models.memory import CheckpointedBlock

FirKernel = tuple[int, ...]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm of NCSN++: ``min(channels // 4, 32)`` groups, eps 1e-6."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def rescaled_sum(x: torch.Tensor, h: torch.Tensor, skip_rescale: bool) -> torch.Tensor:
    """Residual sum, divided by sqrt(2) to keep the variance when ``skip_rescale`` (App. H)."""
    return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar: (B,) -> (B, 2 E) = [sin(2 pi x W), cos(2 pi x W)].

    Tancik et al. 2020; used on log sigma in NCSN++. ``W`` (E,) ~ N(0, scale^2) is fixed
    (a parameter with ``requires_grad=False``, as in the reference, so it is in the state dict).
    """

    def __init__(self, embedding_size: int = 256, scale: float = 1.0) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The argument reaches ~10^3 for fourier_scale 16: keep the reference's operation order,
        # since float32 rounding of it is visible in the output.
        x_proj = x[:, None] * self.W[None, :] * 2 * math.pi  # (B, E)
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


class Combine(nn.Module):
    """Merge a progressive-input pyramid level into the features: 1x1 conv, then cat or sum.

    x (B, dim1, H, W), y (B, dim2, H, W) -> (B, 2 dim2, H, W) for ``cat`` or (B, dim2, H, W) for
    ``sum``.
    """

    methods = ("cat", "sum")

    def __init__(self, dim1: int, dim2: int, method: str = "cat") -> None:
        super().__init__()
        if method not in self.methods:
            raise ValueError(f"Unknown combine method {method!r}; valid: {', '.join(self.methods)}")
        self.Conv_0 = ddpm_conv1x1(dim1, dim2)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv_0(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y


class AttnBlockpp(CheckpointedBlock, nn.Module):
    """DDPM self-attention with NCSN++ GroupNorm and optional 1/sqrt(2) skip rescaling.

    (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0) -> None:
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.GroupNorm_0(x)
        h = self.NIN_3(spatial_attention(self.NIN_0(h), self.NIN_1(h), self.NIN_2(h)))
        return rescaled_sum(x, h, self.skip_rescale)


def _fir_conv(in_ch: int, out_ch: int, fir_kernel: FirKernel, **resample) -> updown.Conv2d:
    return updown.Conv2d(
        in_ch,
        out_ch,
        kernel=3,
        resample_kernel=fir_kernel,
        use_bias=True,
        kernel_init=default_init(),
        **resample,
    )


class Upsample(nn.Module):
    """2x upsampling: nearest or FIR, with an optional (fused) 3x3 conv.

    (B, C_in, H, W) -> (B, C_out, 2H, 2W); without a conv the channels are kept (and ``in_ch`` may
    be omitted). The conv is
    ``Conv_0`` (after nearest upsampling) or ``Conv2d_0`` (fused with the FIR filter).
    """

    def __init__(
        self,
        in_ch: int | None = None,
        out_ch: int | None = None,
        with_conv: bool = False,
        fir: bool = False,
        fir_kernel: FirKernel = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and in_ch is None:
            raise ValueError("Upsample with_conv needs in_ch")
        if with_conv and fir:
            self.Conv2d_0 = _fir_conv(in_ch, out_ch, fir_kernel, up=True)
        elif with_conv:
            self.Conv_0 = ddpm_conv3x3(in_ch, out_ch)
        elif out_ch != in_ch:
            raise ValueError(f"Upsample without a conv keeps channels: in {in_ch}, out {out_ch}")
        self.fir = fir
        self.with_conv = with_conv
        self.fir_kernel = tuple(fir_kernel)
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        if self.fir:
            if self.with_conv:
                return self.Conv2d_0(x)
            return updown.upsample_2d(x, self.fir_kernel, factor=2)
        h = F.interpolate(x, (H * 2, W * 2), mode="nearest")
        return self.Conv_0(h) if self.with_conv else h


class Downsample(nn.Module):
    """2x downsampling: average pooling or FIR, with an optional (fused) 3x3 stride-2 conv.

    (B, C_in, H, W) -> (B, C_out, H/2, W/2); without a conv the channels are kept (and ``in_ch``
    may be omitted). Without FIR the input is padded right/bottom by one pixel first (TensorFlow
    'SAME' for stride 2), as in DDPM.
    """

    def __init__(
        self,
        in_ch: int | None = None,
        out_ch: int | None = None,
        with_conv: bool = False,
        fir: bool = False,
        fir_kernel: FirKernel = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and in_ch is None:
            raise ValueError("Downsample with_conv needs in_ch")
        if with_conv and fir:
            self.Conv2d_0 = _fir_conv(in_ch, out_ch, fir_kernel, down=True)
        elif with_conv:
            self.Conv_0 = ddpm_conv3x3(in_ch, out_ch, stride=2, padding=0)
        elif out_ch != in_ch:
            raise ValueError(f"Downsample without a conv keeps channels: in {in_ch}, out {out_ch}")
        self.fir = fir
        self.fir_kernel = tuple(fir_kernel)
        self.with_conv = with_conv
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            if self.with_conv:
                return self.Conv2d_0(x)
            return updown.downsample_2d(x, self.fir_kernel, factor=2)
        x = F.pad(x, (0, 1, 0, 1))
        if self.with_conv:
            return self.Conv_0(x)
        return F.avg_pool2d(x, 2, stride=2)


class ResnetBlockDDPMpp(CheckpointedBlock, nn.Module):
    """The DDPM residual block with NCSN++ GroupNorm, zero-ish init and skip rescaling.

    (B, C_in, H, W), temb (B, temb_dim) -> (B, C_out, H, W). The skip is the identity, a 3x3
    conv (``conv_shortcut``) or a NIN when the channel count changes.
    """

    def __init__(
        self,
        act: nn.Module,
        in_ch: int,
        out_ch: int | None = None,
        temb_dim: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.1,
        skip_rescale: bool = False,
        init_scale: float = 0.0,
    ) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = ddpm_conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = ddpm_conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = ddpm_conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.skip_rescale = skip_rescale
        self.act = act
        self.in_ch = in_ch
        self.out_ch = out_ch
        self.conv_shortcut = conv_shortcut

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.act(self.GroupNorm_1(h))
        h = self.Conv_1(self.Dropout_0(h))
        if self.in_ch != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return rescaled_sum(x, h, self.skip_rescale)


class ResnetBlockBigGANpp(CheckpointedBlock, nn.Module):
    """BigGAN-style residual block that can up- or downsample both paths (Brock et al. 2019).

    (B, C_in, H, W), temb (B, temb_dim) -> (B, C_out, H', W') with H' = 2H (``up``), H/2
    (``down``) or H. Resampling is FIR (``fir``) or nearest / average pooling, applied after the
    first norm-act on the residual path and to the input on the skip path; a 1x1 conv adapts the
    skip when channels or size change.
    """

    def __init__(
        self,
        act: nn.Module,
        in_ch: int,
        out_ch: int | None = None,
        temb_dim: int | None = None,
        up: bool = False,
        down: bool = False,
        dropout: float = 0.1,
        fir: bool = False,
        fir_kernel: FirKernel = (1, 3, 3, 1),
        skip_rescale: bool = True,
        init_scale: float = 0.0,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResnetBlockBigGANpp: up and down are mutually exclusive")
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.up = up
        self.down = down
        self.fir = fir
        self.fir_kernel = tuple(fir_kernel)
        self.Conv_0 = ddpm_conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = ddpm_conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch or up or down:
            self.Conv_2 = ddpm_conv1x1(in_ch, out_ch)
        self.skip_rescale = skip_rescale
        self.act = act
        self.in_ch = in_ch
        self.out_ch = out_ch

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            if self.fir:
                return updown.upsample_2d(x, self.fir_kernel, factor=2)
            return updown.naive_upsample_2d(x, factor=2)
        if self.down:
            if self.fir:
                return updown.downsample_2d(x, self.fir_kernel, factor=2)
            return updown.naive_downsample_2d(x, factor=2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self._resample(self.act(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.act(self.GroupNorm_1(h))
        h = self.Conv_1(self.Dropout_0(h))
        if self.in_ch != self.out_ch or self.up or self.down:
            x = self.Conv_2(x)
        return rescaled_sum(x, h, self.skip_rescale)
