"""RefineNet building blocks of NCSN / NCSNv2 (Song & Ermon 2019; 2020), unconditional versions.

NCSNv2 (Song & Ermon 2020, "Improved techniques for training score-based generative models") is a
RefineNet (Lin et al. 2017): a pre-activation ResNet encoder with dilated convolutions, then a
cascade of RefineBlocks, each made of residual conv units (RCU), multi-resolution fusion (MSF) and
chained residual pooling (CRP). Submodule and parameter names (``conv1``, ``normalize2``,
``adapt_convs``, ``msf``, ``crp``, ``1_2_conv``, ...) are those of the reference
(yang-song/score_sde_pytorch, ``models/layers.py``), so its state dicts load strictly.

Convolutions keep PyTorch's default initialisation, as NCSN did. Unlike the reference, a dilated
3x3 convolution is padded by its dilation (so it keeps the spatial size) and a bias-free one
builds: the two fixes without which the reference cannot construct NCSNv2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.memory import CheckpointedBlock
from models.normalization import InstanceNorm2dPlus, NormFactory


def _scale_(conv: nn.Conv2d, init_scale: float) -> nn.Conv2d:
    """Multiply the default initialisation by ``init_scale`` (0 means 1e-10), in place."""
    init_scale = 1e-10 if init_scale == 0 else init_scale
    with torch.no_grad():
        conv.weight.mul_(init_scale)
        if conv.bias is not None:
            conv.bias.mul_(init_scale)
    return conv


def ncsn_conv1x1(
    in_planes: int,
    out_planes: int,
    stride: int = 1,
    bias: bool = True,
    dilation: int = 1,
    init_scale: float = 1.0,
    padding: int = 0,
) -> nn.Conv2d:
    """1x1 convolution with PyTorch's default initialisation times ``init_scale`` (NCSN)."""
    conv = nn.Conv2d(
        in_planes, out_planes, 1, stride=stride, bias=bias, dilation=dilation, padding=padding
    )
    return _scale_(conv, init_scale)


def ncsn_conv3x3(
    in_planes: int,
    out_planes: int,
    stride: int = 1,
    bias: bool = True,
    dilation: int = 1,
    init_scale: float = 1.0,
    padding: int | None = None,
) -> nn.Conv2d:
    """3x3 convolution with PyTorch's default initialisation times ``init_scale`` (NCSN).

    ``padding`` defaults to ``dilation``, which keeps H and W at stride 1 (the reference pads by
    1 whatever the dilation, which breaks NCSNv2's dilated residual blocks).
    """
    padding = dilation if padding is None else padding
    conv = nn.Conv2d(
        in_planes, out_planes, 3, stride=stride, bias=bias, dilation=dilation, padding=padding
    )
    return _scale_(conv, init_scale)


def _mean_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """Average of the four 2x2 phases: (B, C, H, W) -> (B, C, H // 2, W // 2) for even H, W."""
    return (x[:, :, ::2, ::2] + x[:, :, 1::2, ::2] + x[:, :, ::2, 1::2] + x[:, :, 1::2, 1::2]) / 4.0


class ConvMeanPool(nn.Module):
    """Convolution then 2x2 mean pooling: (B, C_in, H, W) -> (B, C_out, H/2, W/2).

    With ``adjust_padding`` the input is first zero-padded by one pixel on the left and top (the
    28 px NCSNv2, where 7 px must pool to 4); the conv then sits at ``conv.1``, as in the reference.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        kernel_size: int = 3,
        biases: bool = True,
        adjust_padding: bool = False,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d(input_dim, output_dim, kernel_size, padding=kernel_size // 2, bias=biases)
        self.conv = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), conv) if adjust_padding else conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mean_pool2x2(self.conv(x))


class ResidualBlock(CheckpointedBlock, nn.Module):
    """Pre-activation residual block of the NCSNv2 encoder: (norm, act, conv) twice plus a skip.

    (B, C_in, H, W) -> (B, C_out, H', W'). With ``resample='down'`` and ``dilation == 1`` the
    second conv and the skip are :class:`ConvMeanPool` (H' = H/2); with ``dilation > 1`` NCSNv2
    enlarges the receptive field by dilation instead and keeps H' = H (a 3x3 dilated skip).
    Without resampling the skip is the identity, or a 1x1 conv when the channel count changes.

    Args:
        input_dim, output_dim: channel counts C_in, C_out.
        resample: ``None`` or ``'down'``.
        act: the activation module (shared).
        normalization: ``norm(num_features)`` factory (InstanceNorm++ in NCSNv2).
        adjust_padding: pad before pooling (28 px images).
        dilation: dilation of the 3x3 convs.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        resample: str | None = None,
        act: nn.Module | None = None,
        normalization: NormFactory = InstanceNorm2dPlus,
        adjust_padding: bool = False,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        if resample not in (None, "down"):
            raise ValueError(f"resample must be None or 'down', got {resample!r}")
        self.non_linearity = nn.ELU() if act is None else act
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.resample = resample
        # The second conv keeps C_in when it also downsamples, as in NCSNv2.
        mid_dim = input_dim if resample == "down" else output_dim
        self.conv1 = ncsn_conv3x3(input_dim, mid_dim, dilation=dilation)
        self.normalize2 = normalization(mid_dim)
        pooled = resample == "down" and dilation == 1
        if pooled:
            self.conv2 = ConvMeanPool(input_dim, output_dim, 3, adjust_padding=adjust_padding)
        else:
            self.conv2 = ncsn_conv3x3(mid_dim, output_dim, dilation=dilation)
        # Built only when used, in the reference's order, so seeded initialisations agree.
        self.shortcut = None
        if output_dim != input_dim or resample is not None:
            if pooled:
                self.shortcut = ConvMeanPool(
                    input_dim, output_dim, 1, adjust_padding=adjust_padding
                )
            elif dilation > 1:
                self.shortcut = ncsn_conv3x3(input_dim, output_dim, dilation=dilation)
            else:
                self.shortcut = ncsn_conv1x1(input_dim, output_dim)
        self.normalize1 = normalization(input_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.non_linearity(self.normalize1(x)))
        h = self.conv2(self.non_linearity(self.normalize2(h)))
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + h


class RCUBlock(nn.Module):
    """Residual conv unit(s) of RefineNet: ``n_blocks`` times x + (act, conv) x ``n_stages``.

    (B, C, H, W) -> (B, C, H, W); bias-free 3x3 convs named ``{i}_{j}_conv`` (1-based).
    """

    def __init__(self, features: int, n_blocks: int, n_stages: int, act: nn.Module) -> None:
        super().__init__()
        for i in range(1, n_blocks + 1):
            for j in range(1, n_stages + 1):
                setattr(self, f"{i}_{j}_conv", ncsn_conv3x3(features, features, bias=False))
        self.n_blocks = n_blocks
        self.n_stages = n_stages
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.n_blocks + 1):
            h = x
            for j in range(1, self.n_stages + 1):
                h = getattr(self, f"{i}_{j}_conv")(self.act(h))
            x = x + h
        return x


class CRPBlock(nn.Module):
    """Chained residual pooling of RefineNet: (B, C, H, W) -> (B, C, H, W).

    After an activation, each stage pools (5x5, stride 1) and convolves the previous stage's
    output, and every stage's output is added to the input.
    """

    def __init__(self, features: int, n_stages: int, act: nn.Module, maxpool: bool = True) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            ncsn_conv3x3(features, features, bias=False) for _ in range(n_stages)
        )
        self.n_stages = n_stages
        pool = nn.MaxPool2d if maxpool else nn.AvgPool2d
        self.pool = pool(kernel_size=5, stride=1, padding=2)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        path = x
        for conv in self.convs:
            path = conv(self.pool(path))
            x = x + path
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion of RefineNet: conv each input, resize to one shape, sum.

    Inputs xs[i] (B, C_i, H_i, W_i) -> (B, features, *shape). Resizing is bilinear with
    ``align_corners=True`` by default, as in the reference.
    """

    def __init__(
        self, in_planes: Sequence[int], features: int, interpolation: str = "bilinear"
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(ncsn_conv3x3(c, features) for c in in_planes)
        self.features = features
        self.interpolation = interpolation

    def forward(self, xs: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
        align = True if self.interpolation in ("bilinear", "bicubic") else None
        out = 0.0
        for conv, x in zip(self.convs, xs):
            out = out + F.interpolate(
                conv(x), size=tuple(shape), mode=self.interpolation, align_corners=align
            )
        return out


class RefineBlock(CheckpointedBlock, nn.Module):
    """A RefineNet block: RCU per input, MSF fusion, CRP, output RCU(s).

    Inputs xs[i] (B, in_planes[i], H_i, W_i) -> (B, features, *output_shape). A ``start`` block has
    a single input and no fusion; an ``end`` block has three output RCUs instead of one.
    """

    def __init__(
        self,
        in_planes: Sequence[int],
        features: int,
        act: nn.Module,
        start: bool = False,
        end: bool = False,
        maxpool: bool = True,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        if not isinstance(in_planes, (list, tuple)) or not in_planes:
            raise ValueError(f"in_planes must be a non-empty list of ints, got {in_planes!r}")
        self.n_blocks = len(in_planes)
        self.adapt_convs = nn.ModuleList(RCUBlock(c, 2, 2, act) for c in in_planes)
        self.output_convs = RCUBlock(features, 3 if end else 1, 2, act)
        if not start:
            self.msf = MSFBlock(in_planes, features, interpolation)
        self.crp = CRPBlock(features, 2, act, maxpool=maxpool)

    def forward(self, xs: Sequence[torch.Tensor], output_shape: Sequence[int]) -> torch.Tensor:
        hs = [adapt(x) for adapt, x in zip(self.adapt_convs, xs)]
        h = self.msf(hs, output_shape) if self.n_blocks > 1 else hs[0]
        return self.output_convs(self.crp(h))
