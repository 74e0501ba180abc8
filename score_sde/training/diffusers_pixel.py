"""A diffusers UNet2DModel pipeline folder (``google/ddpm-cifar10-32`` layout) as
``--checkpoint`` of ``main.py --mode sample`` / ``--mode likelihood``.

The folder is loaded by :func:`models.diffusers_unet.load_diffusers_unet` (local files only,
weights checked); sampling then runs on the scheduler's own ``DiscreteVPSDE``. The config
supplies the data shape and the sampler, and must describe the same SDE
(``training.sde = 'discrete_vpsde'`` with the scheduler's ``beta_schedule``, ``beta_start``,
``beta_end`` and ``num_scales`` = ``num_train_timesteps``), so that every derived setting
(the last time 1/N, the record) is the model's; a mismatch names the keys to set.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from models.diffusers_unet import DiffusersUNet, is_diffusers_pixel_folder, load_diffusers_unet
from score_sde.training.sampling import get_sde

#: what a record calls the layout
LAYOUT = "diffusers UNet2DModel pipeline folder (the scheduler's DiscreteVPSDE)"


def is_diffusers_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``--checkpoint`` names a diffusers pixel pipeline folder."""
    return Path(path).is_dir() and is_diffusers_pixel_folder(path)


def load_diffusers_pixel(config, path: str | os.PathLike) -> DiffusersUNet:
    """The pipeline at ``path`` on ``config.device``, in eval mode, checked against the config.

    Raises:
        ValueError: the config's data shape or SDE differ from the model's, naming the keys.
    """
    model, scheduler = load_diffusers_unet(path)
    unet_config = model.unet.config
    problems = []
    if config.data.num_channels != unet_config.in_channels:
        problems.append(f"--config.data.num_channels={unet_config.in_channels}")
    size = unet_config.sample_size
    if isinstance(size, int) and config.data.image_size != size:
        problems.append(f"--config.data.image_size={size}")
    sde = model.sde
    ours = get_sde(config) if config.training.sde == "discrete_vpsde" else None
    # a trained_betas table has no config keys: only the kind of SDE and N must agree
    same = ours is not None and ours.N == sde.N and (
        scheduler.get("trained_betas") is not None
        or bool(torch.allclose(ours.alphas_cumprod, sde.alphas_cumprod, rtol=1e-5, atol=0)))
    if not same:
        problems.append(
            f"--config.training.sde=discrete_vpsde --config.model.beta_schedule="
            f"{scheduler.get('beta_schedule') or 'linear'} --config.model.beta_start="
            f"{scheduler.get('beta_start', 1e-4)} --config.model.beta_end="
            f"{scheduler.get('beta_end', 0.02)} --config.model.num_scales={sde.N}")
    if problems:
        raise ValueError(f"{path} ({LAYOUT}) does not fit the config; set {' '.join(problems)}")
    return model.to(config.device).eval()


__all__ = ["LAYOUT", "is_diffusers_checkpoint", "load_diffusers_pixel"]
