"""DDPM-style building blocks shared by DDPM, NCSN++ and DDPM++.

The blocks follow Ho et al. 2020 (DDPM, the ``diffusion_tf/nn.py`` U-Net) as ported to PyTorch by
the reference implementation (yang-song/score_sde_pytorch, ``models/layers.py``). Submodule and
parameter names (``GroupNorm_0``, ``Conv_0``, ``NIN_0``, ``Dense_0``, ``W``, ``b``) are the
reference's, so a reference ``state_dict`` loads with ``strict=True``.

Initialisation is the DDPM one: variance scaling with ``fan_avg`` and a uniform distribution
(JAX's ``variance_scaling``), zero biases; a scale of 0 becomes 1e-10 so that "zero-initialised"
output layers still carry a (tiny) gradient signal, as in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.memory import CheckpointedBlock

#: ``init(shape) -> tensor``: a fresh weight tensor of the given shape.
Initializer = Callable[[tuple[int, ...]], torch.Tensor]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "lrelu": lambda: nn.LeakyReLU(negative_slope=0.2),
    "swish": nn.SiLU,
}


def get_act(config) -> nn.Module:
    """The activation named by ``config.model.nonlinearity`` (elu, relu, lrelu, swish)."""
    name = str(config.model.nonlinearity).lower()
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"Unknown nonlinearity {config.model.nonlinearity!r}; valid: "
            f"{', '.join(sorted(_ACTIVATIONS))}"
        )
    return _ACTIVATIONS[name]()


def _compute_fans(shape: tuple[int, ...], in_axis: int = 1, out_axis: int = 0) -> tuple[int, int]:
    receptive_field = math.prod(shape) // (shape[in_axis] * shape[out_axis])
    return shape[in_axis] * receptive_field, shape[out_axis] * receptive_field


def variance_scaling(
    scale: float,
    mode: str,
    distribution: str,
    in_axis: int = 1,
    out_axis: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Initializer:
    """Variance-scaling initialiser (Glorot-style, as JAX's ``variance_scaling``).

    Args:
        scale: target variance factor; the variance is ``scale / fan``.
        mode: ``fan_in``, ``fan_out`` or ``fan_avg`` (which fan divides ``scale``).
        distribution: ``normal`` or ``uniform`` (uniform on ±sqrt(3 variance)).
        in_axis, out_axis: axes of the weight shape holding the input and output units
            (``(out, in, kh, kw)`` for a conv: 1 and 0).
    Returns:
        ``init(shape) -> tensor`` drawing from torch's global generator.
    """
    modes = ("fan_in", "fan_out", "fan_avg")
    if mode not in modes:
        raise ValueError(f"Unknown variance-scaling mode {mode!r}; valid: {', '.join(modes)}")
    if distribution not in ("normal", "uniform"):
        raise ValueError(
            f"Unknown variance-scaling distribution {distribution!r}; valid: normal, uniform"
        )

    def init(shape: tuple[int, ...]) -> torch.Tensor:
        fan_in, fan_out = _compute_fans(tuple(shape), in_axis, out_axis)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        variance = scale / fan
        if distribution == "normal":
            return torch.randn(*shape, dtype=dtype) * math.sqrt(variance)
        return (torch.rand(*shape, dtype=dtype) * 2.0 - 1.0) * math.sqrt(3 * variance)

    return init


def default_init(scale: float = 1.0) -> Initializer:
    """The DDPM initialiser: ``fan_avg`` uniform variance scaling; scale 0 means 1e-10."""
    return variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def _init_(module: nn.Module, init_scale: float = 1.0) -> nn.Module:
    """Re-initialise ``module.weight`` with :func:`default_init` and zero its bias, in place."""
    with torch.no_grad():
        module.weight.copy_(default_init(init_scale)(module.weight.shape))
        if module.bias is not None:
            module.bias.zero_()
    return module


def ddpm_conv1x1(
    in_planes: int,
    out_planes: int,
    stride: int = 1,
    bias: bool = True,
    init_scale: float = 1.0,
    padding: int = 0,
) -> nn.Conv2d:
    """1x1 convolution with the DDPM initialisation."""
    conv = nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=padding, bias=bias)
    return _init_(conv, init_scale)


def ddpm_conv3x3(
    in_planes: int,
    out_planes: int,
    stride: int = 1,
    bias: bool = True,
    dilation: int = 1,
    init_scale: float = 1.0,
    padding: int = 1,
) -> nn.Conv2d:
    """3x3 convolution with the DDPM initialisation."""
    conv = nn.Conv2d(
        in_planes, out_planes, 3, stride=stride, padding=padding, dilation=dilation, bias=bias
    )
    return _init_(conv, init_scale)


def dense(in_features: int, out_features: int, init_scale: float = 1.0) -> nn.Linear:
    """Linear layer with the DDPM initialisation."""
    return _init_(nn.Linear(in_features, out_features), init_scale)


def get_sigmas(config) -> torch.Tensor:
    """The geometric noise grid of NCSN/SMLD, sigma_max first (Song & Ermon 2019).

    ``sigma_i = exp(linspace(log sigma_max, log sigma_min, num_scales))_i`` in float64, from
    ``config.model.sigma_max``, ``sigma_min`` and ``num_scales``; the models keep it as the
    ``sigmas`` buffer of the reference.

    Returns:
        (num_scales,) float64.
    """
    m = config.model
    log_sigmas = torch.linspace(
        math.log(m.sigma_max), math.log(m.sigma_min), m.num_scales, dtype=torch.float64
    )
    return torch.exp(log_sigmas)


def get_timestep_embedding(
    timesteps: torch.Tensor, embedding_dim: int, max_positions: int = 10000
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) time steps (Vaswani et al. 2017; DDPM).

    Frequencies are ``max_positions ** (-k / (half - 1))`` for ``k = 0 .. half - 1``; the first
    half of the features are sines, the second half cosines (zero-padded when odd).

    Args:
        timesteps: (B,) time labels (e.g. 999 t for VP models).
        embedding_dim: number of features D.
    Returns:
        (B, D) float32 embedding.
    """
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must be 1-D (B,), got shape {tuple(timesteps.shape)}")
    if embedding_dim < 4:
        raise ValueError(f"embedding_dim must be >= 4 (two frequencies), got {embedding_dim}")
    half = embedding_dim // 2
    log_step = math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device) * -log_step)
    args = timesteps.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class NIN(nn.Module):
    """Network-in-network: per-pixel linear map over channels, (B, C_in, H, W) -> (B, C_out, H, W).

    Same as a 1x1 convolution, but stored as ``W`` (C_in, C_out) and ``b`` (C_out,) like the
    reference (and DDPM's ``nin``), so its checkpoints load.
    """

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1) -> None:
        super().__init__()
        self.W = nn.Parameter(default_init(scale=init_scale)((in_dim, num_units)))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bchw,cd->bhwd", x, self.W) + self.b  # (B, H, W, C_out)
        return y.permute(0, 3, 1, 2)


def spatial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dot-product attention over the H·W positions; q, k, v (B, C, H, W) -> (B, C, H, W)."""
    B, C, H, W = q.shape
    w = torch.einsum("bchw,bcij->bhwij", q, k) * (int(C) ** (-0.5))
    w = F.softmax(w.reshape(B, H, W, H * W), dim=-1).reshape(B, H, W, H, W)
    return torch.einsum("bhwij,bcij->bchw", w, v)


class AttnBlock(CheckpointedBlock, nn.Module):
    """Single-head self-attention over pixels with a residual connection (DDPM).

    (B, C, H, W) -> (B, C, H, W). GroupNorm with 32 groups, eps 1e-6; the output projection is
    initialised near zero so the block starts as the identity.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.GroupNorm_0 = nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.GroupNorm_0(x)
        h = spatial_attention(self.NIN_0(h), self.NIN_1(h), self.NIN_2(h))
        return x + self.NIN_3(h)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (DDPM).

    (B, C, H, W) -> (B, C, 2H, 2W).
    """

    def __init__(self, channels: int, with_conv: bool = False) -> None:
        super().__init__()
        if with_conv:
            self.Conv_0 = ddpm_conv3x3(channels, channels)
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        h = F.interpolate(x, (H * 2, W * 2), mode="nearest")
        return self.Conv_0(h) if self.with_conv else h


class Downsample(nn.Module):
    """2x downsampling by a stride-2 3x3 conv or 2x2 average pooling (DDPM).

    (B, C, H, W) -> (B, C, H/2, W/2). The input is padded by one pixel on the right and bottom,
    TensorFlow's 'SAME' padding for a stride-2 conv, as in the original DDPM.
    """

    def __init__(self, channels: int, with_conv: bool = False) -> None:
        super().__init__()
        if with_conv:
            self.Conv_0 = ddpm_conv3x3(channels, channels, stride=2, padding=0)
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))
        if self.with_conv:
            return self.Conv_0(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2, padding=0)


class ResnetBlockDDPM(CheckpointedBlock, nn.Module):
    """The DDPM residual block: GroupNorm, act, conv, + time bias, GroupNorm, act, dropout, conv.

    (B, C_in, H, W), temb (B, temb_dim) -> (B, C_out, H, W). The skip path is the identity, a 3x3
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
    ) -> None:
        super().__init__()
        out_ch = in_ch if out_ch is None else out_ch
        self.GroupNorm_0 = nn.GroupNorm(num_groups=32, num_channels=in_ch, eps=1e-6)
        self.GroupNorm_1 = nn.GroupNorm(num_groups=32, num_channels=out_ch, eps=1e-6)
        self.act = act
        self.Conv_0 = ddpm_conv3x3(in_ch, out_ch)
        self.Conv_1 = ddpm_conv3x3(out_ch, out_ch, init_scale=0.0)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = ddpm_conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
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
        return x + h
