"""Image conditioning of the score networks: super-resolution stages of a cascade.

Cascaded diffusion (Ho, Saharia et al. 2022, Sec. 3; SR3, Saharia et al. 2021) conditions a
network at resolution H on a low-resolution image y (B, C_y, h, w). With
``config.model.cond_channels = C_y > 0`` a model

* upsamples y to H x W (``config.model.cond_upsample``: 'bicubic', the default, or 'nearest';
  :func:`score_sde.utils.resize.upsample`) and concatenates it, with one flag channel, to the input
  channels. The input convolution over ``cat([x, y_up, flag])`` is kept as two convolutions
  whose outputs add up: the reference's own input convolution over x (unchanged name and shape)
  and ``cond_conv`` over ``[y_up, flag]`` (no bias, zero-initialised), so a freshly built
  conditional model starts as its unconditional self;
* embeds the augmentation level s (B,) (a time in [0, 1] of the augmentation SDE, the "noise
  conditioning augmentation" of Ho, Saharia et al. 2022, Sec. 4.1) like the time, with the
  model's own embedding type, through a two-layer MLP ``cond_level_embed`` whose last layer is
  zero-initialised; the result is added to the time embedding.

The null conditioning of classifier-free guidance on the image (Ho & Salimans 2022) is a zero
image with flag 0 and level 0; a real conditioning has flag 1. ``model(x, t)`` without
``cond_image`` sees the null conditioning for every sample; with
``config.model.cond_dropout_prob = p`` the model replaces each sample's conditioning by the null
one with probability p in training mode.

With ``cond_channels`` absent or 0 nothing is built and a conditioning input is refused, so the
state dict and outputs are the reference's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from score_sde.utils.resize import UPSAMPLE_METHODS, upsample


def read_cond_channels(config) -> int:
    """``config.model.cond_channels`` (0 when absent or None), an integer >= 0."""
    value = config.model.get("cond_channels", 0)
    value = 0 if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.model.cond_channels must be an integer >= 0 (0: no image "
                         f"conditioning), got {value!r}")
    return value


def read_image_cond_options(config) -> dict:
    """The keyword arguments of :meth:`ImageConditional._init_image_cond` from ``config.model``:
    ``cond_channels``, ``cond_upsample`` (default 'bicubic'), ``cond_dropout_prob`` (default 0).

    Raises:
        ValueError: naming the bad value and the valid ones.
    """
    channels = read_cond_channels(config)
    method = config.model.get("cond_upsample", None) or "bicubic"
    if method not in UPSAMPLE_METHODS:
        raise ValueError(f"Unknown config.model.cond_upsample {method!r}; valid: "
                         f"{', '.join(UPSAMPLE_METHODS)}")
    p = config.model.get("cond_dropout_prob", None)
    p = 0.0 if p is None else p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"config.model.cond_dropout_prob must be a number in [0, 1), got {p!r}")
    if p and not channels:
        raise ValueError(f"config.model.cond_dropout_prob = {p} needs an image to drop: set "
                         "config.model.cond_channels > 0 (or cond_dropout_prob = 0)")
    return {"cond_channels": channels, "cond_upsample": method, "cond_dropout_prob": float(p)}


class ImageConditional:
    """Mixin: ``cond_channels``, ``cond_conv`` and ``cond_level_embed`` of an image-conditional
    network (module docstring).

    A model calls :meth:`_init_image_cond` in ``__init__`` after its own modules, adds
    :meth:`image_cond_features` to the output of its input convolution and
    :meth:`cond_level_embedding` to its time embedding.
    """

    cond_channels: int = 0
    cond_upsample: str = "bicubic"
    cond_dropout_prob: float = 0.0

    def _init_image_cond(self, *, cond_channels: int, cond_upsample: str, cond_dropout_prob: float,
                         input_conv: nn.Conv2d, level_features: Callable[[torch.Tensor],
                                                                         torch.Tensor],
                         features_dim: int, temb_dim: int, act: nn.Module) -> None:
        """Build ``cond_conv`` like ``input_conv`` (kernel, stride, padding; C_y + 1 inputs) and
        ``cond_level_embed`` = dense(features_dim, temb_dim), act, dense(temb_dim, temb_dim) on
        ``level_features(s)`` (B, features_dim); both end zero-initialised. Build them after the
        model's own modules, so those draw the same random initialisation as without."""
        self.cond_channels = cond_channels
        self.cond_upsample = cond_upsample
        self.cond_dropout_prob = cond_dropout_prob
        if not cond_channels:
            return
        self.cond_conv = nn.Conv2d(cond_channels + 1, input_conv.out_channels,
                                   kernel_size=input_conv.kernel_size, stride=input_conv.stride,
                                   padding=input_conv.padding, bias=False)
        nn.init.zeros_(self.cond_conv.weight)
        if isinstance(level_features, nn.Module):  # e.g. Fourier features: in the state dict
            self.cond_level_features = level_features
        else:
            self._level_features = level_features
        self.cond_level_embed = nn.Sequential(
            nn.Linear(features_dim, temb_dim), act, nn.Linear(temb_dim, temb_dim))
        nn.init.zeros_(self.cond_level_embed[2].weight)
        nn.init.zeros_(self.cond_level_embed[2].bias)

    def _cond_inputs(self, x: torch.Tensor, cond_image: torch.Tensor | None,
                     cond_level: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(y_up (B, C_y, H, W), flag (B, 1, H, W), level (B,)) with conditioning dropout
        applied; None for an unconditional model (which refuses a conditioning)."""
        name = type(self).__name__
        if not self.cond_channels:
            if cond_image is not None or cond_level is not None:
                raise ValueError(f"cond_image / cond_level given to {name} without image "
                                 "conditioning (config.model.cond_channels = 0)")
            return None
        batch, (height, width) = x.shape[0], x.shape[-2:]
        if cond_image is None:  # the null conditioning for every sample
            if cond_level is not None:
                raise ValueError(f"{name}: cond_level given without cond_image")
            y_up = x.new_zeros(batch, self.cond_channels, height, width)
            return y_up, x.new_zeros(batch, 1, height, width), x.new_zeros(batch)
        if (cond_image.dim() != 4 or cond_image.shape[:2] != (batch, self.cond_channels)
                or cond_image.shape[-1] > width or cond_image.shape[-2] > height):
            raise ValueError(f"{name}: cond_image must be (B={batch}, {self.cond_channels}, h, w) "
                             f"with h, w <= {height}, got {tuple(cond_image.shape)}")
        if cond_level is None:
            cond_level = x.new_zeros(batch)
        if cond_level.shape != (batch,):
            raise ValueError(f"{name}: cond_level must be ({batch},), got "
                             f"{tuple(cond_level.shape)}")
        y_up = upsample(cond_image.to(x.dtype), height, self.cond_upsample)  # (B, C_y, H, W)
        keep = x.new_ones(batch)
        if self.training and self.cond_dropout_prob > 0:
            keep = (torch.rand(batch, device=x.device) >= self.cond_dropout_prob).to(x.dtype)
        flag = keep.view(-1, 1, 1, 1).expand(-1, 1, height, width)
        return y_up * keep.view(-1, 1, 1, 1), flag, cond_level.to(x.dtype) * keep

    def image_cond_terms(self, x: torch.Tensor, cond_image: torch.Tensor | None,
                         cond_level: torch.Tensor | None
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The two additive terms of the conditioning: ``cond_conv([y_up, flag])`` (the input
        convolution's share of the concatenated channels; (B, out, H', W')) and the level
        embedding (B, temb_dim); (None, None) for an unconditional model."""
        inputs = self._cond_inputs(x, cond_image, cond_level)
        if inputs is None:
            return None, None
        y_up, flag, level = inputs
        features = self.cond_conv(torch.cat([y_up, flag], dim=1))
        embed = getattr(self, "cond_level_features", None) or self._level_features
        level_emb = self.cond_level_embed(embed(level).to(x.dtype))
        return features, level_emb
