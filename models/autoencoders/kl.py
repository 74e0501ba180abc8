"""The toolkit's own KL autoencoder: a small convolutional encoder/decoder with a diagonal
Gaussian posterior and a learned per-channel decoder variance (the KL-regularised first stage of
Rombach et al. 2022, Sec. 3 and App. G, without the GAN and perceptual terms).

Shapes: images (B, C, H, W) -> latents (B, c, H / f, W / f) with f = 2^(len(channel_mult) - 1).

Config section (``name = 'kl'``; defaults after the key):
    in_channels       required, the image channels C
    latent_channels   4, c
    channels          32, width of the first level
    channel_mult      (1, 2), width multiplier per level; each level after the first halves H, W
    num_res_blocks    1, residual blocks per level
    scale_factor      1.0 and ``shift`` 0.0: z_model = (z - shift) * scale_factor
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.autoencoders.base import (
    Autoencoder,
    gaussian_log_prob,
    kl_to_standard_normal,
    register_autoencoder,
)

#: the reconstruction terms of :func:`autoencoder_loss`
RECONSTRUCTIONS = ("l1", "l2")


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(ch, 8), ch)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a (1x1 when the width changes) skip."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                  _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.skip(x) + self.body(x)


class _Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@register_autoencoder("kl")
class KLAutoencoder(Autoencoder):
    """Conv encoder/decoder with q(z | x) = N(mean, diag(std^2)) and the decoder likelihood
    p(x | z) = N(x; decode(z), diag(sigma_c^2)), log sigma_c = ``decoder_log_scale[c]`` learned
    per image channel (the likelihood the later data bits/dim bound uses).

    Args:
        in_channels: image channels C.
        latent_channels: latent channels c.
        channels: width of the first level.
        channel_mult: width multipliers per level; f = 2^(levels - 1).
        num_res_blocks: residual blocks per level.
        scale_factor, shift: the model-space latent map (:class:`Autoencoder`).
    """

    def __init__(self, in_channels: int, latent_channels: int = 4, channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1,
                 scale_factor: float = 1.0, shift: float = 0.0) -> None:
        super().__init__(scale_factor, shift)
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.latent_channels = _check_positive_int("latent_channels", latent_channels)
        _check_positive_int("channels", channels)
        _check_positive_int("num_res_blocks", num_res_blocks)
        mult = tuple(channel_mult)
        if not mult:
            raise ValueError("channel_mult must name at least one level, got ()")
        widths = [channels * _check_positive_int("channel_mult entries", m) for m in mult]
        self.downsampling = 2 ** (len(widths) - 1)

        enc: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        c = widths[0]
        for i, w in enumerate(widths):
            for _ in range(num_res_blocks):
                enc.append(_ResBlock(c, w))
                c = w
            if i < len(widths) - 1:
                enc.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        enc += [_norm(c), nn.SiLU(), nn.Conv2d(c, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(latent_channels, c, 3, padding=1)]
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks):
                dec.append(_ResBlock(c, w))
                c = w
            if i > 0:
                dec.append(_Upsample(c))
        dec += [_norm(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.decoder_log_scale = nn.Parameter(torch.zeros(in_channels))

    @classmethod
    def from_config(cls, cfg) -> KLAutoencoder:
        """Build from a config section (keys in the module docstring)."""
        if "in_channels" not in cfg:
            raise ValueError("the 'kl' autoencoder config needs in_channels (the image channels)")
        return cls(cfg["in_channels"], cfg.get("latent_channels", 4), cfg.get("channels", 32),
                   tuple(cfg.get("channel_mult", (1, 2))), cfg.get("num_res_blocks", 1),
                   cfg.get("scale_factor", 1.0), cfg.get("shift", 0.0))

    def encode_raw(self, x):
        mean, log_std = self.encoder(x).chunk(2, dim=1)  # (B, c, h, w) each
        return mean, log_std

    def decode_raw(self, z):
        return self.decoder(z)

    def decoder_log_prob(self, x: torch.Tensor, x_mean: torch.Tensor) -> torch.Tensor:
        """log p(x | z) (B,) in nats of the continuous Gaussian decoder N(x; x_mean, sigma_c^2)
        with the learned per-channel sigma_c (images x, x_mean (B, C, H, W))."""
        log_std = self.decoder_log_scale.to(x.dtype)[None, :, None, None].expand_as(x)
        return gaussian_log_prob(x, x_mean, log_std)


def autoencoder_loss(ae: KLAutoencoder, x: torch.Tensor, *, reconstruction: str = "l2",
                     beta: float = 1e-3, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The first-stage objective, per data dimension D = C H W:

        L = E_x [ sum_i rec(x_i, x^_i) + beta KL(q(z | x) || N(0, I)) ] / D
            - E_x [ log N(x; sg(x^), sigma_c^2) ] / D,

    rec = |.| (``'l1'``) or (.)^2 (``'l2'``), x^ = decode(z) at one reparameterised draw
    z ~ q(z | x) of the raw latent (Kingma & Welling 2014, eq. 10; Rombach et al. 2022, App. G
    without GAN and perceptual terms). The last term fits only the decoder variance sigma_c to
    the stopped (sg) residual, so it leaves the L1/L2 objective of the networks unchanged.

    Args:
        ae: the autoencoder.
        x: (B, C, H, W) images in the data's scaling.
        reconstruction: ``'l1'`` or ``'l2'``.
        beta: weight of the KL term (>= 0).
        generator: for the posterior draw.
    Returns:
        (scalar loss, terms per data dimension: ``reconstruction``, ``kl``, ``decoder_nll``).
    """
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"Unknown reconstruction {reconstruction!r}; valid: "
                         f"{', '.join(RECONSTRUCTIONS)}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise ValueError(f"beta must be a number >= 0, got {beta!r}")
    ae._check_images(x)
    D = x[0].numel()
    mean, log_std = ae.encode_raw(x)
    e = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    x_hat = ae.decode_raw(mean + torch.exp(log_std) * e)
    residual = x - x_hat
    rec = residual.abs() if reconstruction == "l1" else residual.square()
    rec = rec.flatten(1).sum(1) / D  # (B,)
    kl = kl_to_standard_normal(mean, log_std) / D  # (B,)
    nll = -ae.decoder_log_prob(x, x_hat.detach()) / D  # (B,)
    loss = (rec + beta * kl + nll).mean()
    return loss, {"reconstruction": rec.mean().detach(), "kl": kl.mean().detach(),
                  "decoder_nll": nll.mean().detach()}


__all__ = ["KLAutoencoder", "RECONSTRUCTIONS", "autoencoder_loss"]
