"""Training a super-resolution stage: the low-resolution conditioning of each batch, with noise
conditioning augmentation (Ho, Saharia et al. 2022, Sec. 4.2; SR3, Saharia et al. 2021).

A config with ``data.low_res_size = h > 0`` trains an image-conditional model
(``model.cond_channels = data.num_channels``, :mod:`models.image_conditioning`) on pairs made
from each batch x (B, C, H, W) in model space:

    y   = A x                    (B, C, h, h)   ``data.downsample``: 'area' | 'bicubic'
    s   ~ p(s) on [0, s_max]     (B,)           ``training.cond_aug_dist``: 'uniform' | 'fixed'
    y_s = m(s) y + sigma(s) eps  (B, C, h, h)   marginals of ``training.cond_aug_sde``

with s_max = ``training.cond_aug_max`` (a time of the augmentation SDE; 0 = no augmentation).
The network gets y_s and s (``cond_image``, ``cond_level``) and upsamples y_s itself. The level
and the noise are drawn from the loss's generator before the loss's own draws, so a resumed run
draws the same (the generator states are in the checkpoints).
"""

from __future__ import annotations

import math

import torch

import sde_lib
from models.image_conditioning import read_cond_channels, read_image_cond_options
from models.utils import get_cond_score_factory, get_score_fn
from samplers import ClassifierFreeGuidance
from samplers.base import NoiseSource
from samplers.cascade import Stage, augment, super_resolve
from score_sde.datasets import data_shape, get_data_inverse_scaler, get_data_scaler
from score_sde.training.sampling import sampling_options
from score_sde.utils.resize import DOWNSAMPLE_METHODS, downsample

#: ``training.cond_aug_dist``: s ~ U[0, s_max] per example, or s = s_max for every example
AUG_DISTRIBUTIONS = ("uniform", "fixed")


def read_low_res_size(config) -> int:
    """``config.data.low_res_size`` (0 when absent: not a super-resolution stage), checked with
    ``data.downsample`` and ``model.cond_channels``.

    Raises:
        ValueError: a size that is not an integer in [1, image_size) or, for 'area', does not
            divide image_size; an unknown ``data.downsample``; ``model.cond_channels`` other than
            ``data.num_channels`` for a super-resolution stage, or > 0 without a low resolution.
    """
    size = config.data.get("low_res_size", 0)
    size = 0 if size is None else size
    channels = read_cond_channels(config)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"config.data.low_res_size must be an integer >= 0 (0: no low-resolution "
                         f"conditioning), got {size!r}")
    if not size:
        if channels:
            raise ValueError(f"config.model.cond_channels = {channels} needs the low-resolution "
                             "images it is conditioned on: set config.data.low_res_size")
        return 0
    image_size = config.data.image_size
    method = config.data.get("downsample", "area")
    if method not in DOWNSAMPLE_METHODS:
        raise ValueError(f"Unknown config.data.downsample {method!r}; valid: "
                         f"{', '.join(DOWNSAMPLE_METHODS)}")
    if size >= image_size or (method == "area" and image_size % size):
        raise ValueError(f"config.data.low_res_size = {size} must be below data.image_size = "
                         f"{image_size}" + (" and divide it (data.downsample = 'area')"
                                            if method == "area" else ""))
    if channels != config.data.num_channels:
        raise ValueError(f"config.model.cond_channels must equal data.num_channels = "
                         f"{config.data.num_channels} for a super-resolution stage "
                         f"(data.low_res_size = {size}), got {channels}")
    return size


def get_aug_sde(config) -> sde_lib.SDE:
    """The augmentation SDE ``training.cond_aug_sde`` (default 'vpsde'), with its default
    parameters (VP: beta in [0.1, 20]; VE: sigma in [0.01, 50])."""
    return sde_lib.get_sde(config.training.get("cond_aug_sde", None) or "vpsde")


def read_aug_options(config) -> tuple[str, float]:
    """(``training.cond_aug_dist``, ``training.cond_aug_max``), checked.

    Raises:
        ValueError: an unknown distribution, or s_max outside [0, T] of the augmentation SDE.
    """
    dist = config.training.get("cond_aug_dist", None) or "uniform"
    if dist not in AUG_DISTRIBUTIONS:
        raise ValueError(f"Unknown config.training.cond_aug_dist {dist!r}; valid: "
                         f"{', '.join(AUG_DISTRIBUTIONS)}")
    s_max = config.training.get("cond_aug_max", 0.0)
    s_max = 0.0 if s_max is None else s_max
    T = get_aug_sde(config).T
    if (isinstance(s_max, bool) or not isinstance(s_max, (int, float))
            or not math.isfinite(s_max) or not 0 <= s_max <= T):
        raise ValueError(f"config.training.cond_aug_max must be a level in [0, {T}] (a time of "
                         f"training.cond_aug_sde; 0: no augmentation), got {s_max!r}")
    return dist, float(s_max)


def check_super_resolution_config(config) -> None:
    """Every key of this module and of the model's image conditioning, checked at the door."""
    read_image_cond_options(config)
    if read_low_res_size(config):
        read_aug_options(config)
        level = config.get("sampling", {}).get("cond_level", 0.0)
        T = get_aug_sde(config).T
        if (isinstance(level, bool) or not isinstance(level, (int, float))
                or not 0 <= level <= T):
            raise ValueError(f"config.sampling.cond_level must be a level in [0, {T}] (a time "
                             f"of training.cond_aug_sde), got {level!r}")
        read_cond_cfg_scale(config)


def low_res(config, x: torch.Tensor) -> torch.Tensor:
    """The conditioning image A x (B, C, h, h) of x (B, C, H, W): ``data.downsample`` to
    ``data.low_res_size``."""
    return downsample(x, config.data.low_res_size, config.data.get("downsample", "area"))


def conditioning_kwargs(config, batch: torch.Tensor, generator: torch.Generator | None
                        ) -> dict[str, torch.Tensor]:
    """``{'cond_image': y_s, 'cond_level': s}`` for a training or evaluation step on ``batch``
    (B, C, H, W) in model space (module docstring); ``{}`` when the config is not a
    super-resolution stage (its steps are called exactly as before)."""
    if not config.data.get("low_res_size", 0):
        return {}
    dist, s_max = read_aug_options(config)
    y = low_res(config, batch)  # (B, C, h, h)
    if dist == "uniform":
        s = torch.rand(batch.shape[0], generator=generator, device=batch.device,
                       dtype=batch.dtype) * s_max
    else:
        s = batch.new_full((batch.shape[0],), s_max)
    y_s = augment(y, get_aug_sde(config), s, NoiseSource(generator)) if s_max > 0 else y
    return {"cond_image": y_s, "cond_level": s}


def read_cond_cfg_scale(config) -> float | None:
    """``config.sampling.cond_cfg_scale`` s (None when absent or None: no guidance), a finite
    number; guidance on the image in DiT's convention eps_u + s (eps_c - eps_u)."""
    scale = config.get("sampling", {}).get("cond_cfg_scale", None)
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"config.sampling.cond_cfg_scale must be a finite number (1: the "
                         f"conditional model alone) or None, got {scale!r}")
    return float(scale)


def guided_factory(factory, uncond_score_fn, scale: float | None):
    """``factory`` with classifier-free guidance on the image (Ho & Salimans 2022): the score
    (1 + w) score(x | y_s) - w score(x), w = s - 1, the unconditional score that of the null
    conditioning (``models.image_conditioning``); two network calls per score (None or s = 1:
    ``factory`` itself)."""
    if scale is None or scale == 1.0:
        return factory

    def guided(y_s, level):
        return ClassifierFreeGuidance(factory(y_s, level), uncond_score_fn, scale - 1.0)

    return guided


def sampling_stage(config, sde: sde_lib.SDE, model) -> Stage:
    """The ``samplers.cascade.Stage`` of a super-resolution config and its network (eval mode):
    the model's score factory (guided by ``sampling.cond_cfg_scale``), ``config.sampling``'s
    sampler, the augmentation SDE and the level ``sampling.cond_level`` (truncation:
    ``sampling.cond_truncate``)."""
    method, options = sampling_options(config)
    continuous = config.training.continuous
    factory = guided_factory(get_cond_score_factory(sde, model, continuous),
                             get_score_fn(sde, model, train=False, continuous=continuous),
                             read_cond_cfg_scale(config))
    return Stage(sde=sde, shape=data_shape(config), method=method, options=options,
                 score_factory=factory,
                 aug_sde=get_aug_sde(config),
                 aug_level=float(config.sampling.get("cond_level", 0.0)),
                 truncate=bool(config.sampling.get("cond_truncate", False)))


@torch.no_grad()
def super_resolve_test_images(config, sde: sde_lib.SDE, model, dataset, num: int,
                              generator: torch.Generator | None) -> torch.Tensor:
    """Super-resolution (B, C, H, W) in data space of the first ``num`` images of ``dataset``
    (cycled), downsampled to ``data.low_res_size``: the snapshot samples of a super-resolution
    stage, whose null-conditioned samples alone would say little."""
    device = next(model.parameters()).device
    index = torch.arange(num) % len(dataset)
    x = get_data_scaler(config)(dataset.as_float(index).to(device))
    y = low_res(config, x)
    samples, _ = super_resolve(sampling_stage(config, sde, model), y, generator=generator)
    return get_data_inverse_scaler(config)(samples)
