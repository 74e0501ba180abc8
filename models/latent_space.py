"""Model space of a latent config: the shape the score network sees when
``config.data.autoencoder.name != 'none'`` (latent score SDEs, Rombach et al. 2022; LSGM,
Vahdat, Kreis & Kautz 2021).

``config.data.image_size`` and ``data.num_channels`` always describe the *images* (what the data
loaders read and the autoencoder encodes). The score network of a latent config is built for the
latent (c, h, w) instead: :func:`model_space_config` is the config with ``data.num_channels = c``,
``data.image_size = h`` and ``data.centered = True`` (latents are used as they are: the image
scaling to [-1, 1] happens once, before the encoder, never again on z). The latent shape is read
from the config alone (the own autoencoder's architecture keys, or the SD VAE's local
``config.json``), without loading weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

#: ``data.autoencoder.name`` of a pixel model
PIXEL = "none"
#: (latent channels, downsampling) of the Stable-Diffusion VAEs (sd-vae-ft-ema / -mse), the
#: latent shape of an 'sd_vae' config whose ``path`` is not set yet
SD_VAE_LATENT = (4, 8)


def autoencoder_name(config) -> str:
    """``config.data.autoencoder.name`` ('none' when the section is absent: a pixel model)."""
    section = config.data.get("autoencoder", None)
    if section is None:
        return PIXEL
    return section.get("name", PIXEL) or PIXEL


def is_latent(config) -> bool:
    """Whether the score model of ``config`` works on latents of an autoencoder."""
    return autoencoder_name(config) != PIXEL


def _sd_vae_config(section) -> dict:
    from models.autoencoders.diffusers_vae import DOWNLOAD
    from models.diffusers_io import CONFIG_NAME, find_model_folder, missing, read_config

    path = Path(section.get("path", "") or "")
    if not str(section.get("path", "") or ""):
        raise ValueError(f"config.data.autoencoder.path is empty: the 'sd_vae' autoencoder needs "
                         f"a local folder holding {DOWNLOAD} (config.json + "
                         f"diffusion_pytorch_model.safetensors), or one weight file with "
                         f"data.autoencoder.config")
    if path.is_file():
        config_path = Path(section.get("config", "") or "")
        if not str(section.get("config", "") or ""):
            raise ValueError(f"config.data.autoencoder.path = {str(path)!r} is a single weight "
                             "file: set data.autoencoder.config to its local config.json")
        if config_path.is_dir():
            config_path = config_path / CONFIG_NAME
        if not config_path.is_file():
            raise missing("the VAE config.json", config_path, DOWNLOAD)
    else:
        config_path = find_model_folder(path, "vae", DOWNLOAD) / CONFIG_NAME
    return read_config(config_path)


def latent_shape(config) -> tuple[int, int, int]:
    """The latent (c, h, w) of the config's images (C, H, W) under ``data.autoencoder``.

    Raises:
        ValueError: a pixel config, non-image data, or image sides the autoencoder cannot
            divide (naming the keys).
        FileNotFoundError: the SD VAE's config.json is not on disk (naming what to download).
    """
    name = autoencoder_name(config)
    if name == PIXEL:
        raise ValueError("config.data.autoencoder.name is 'none' (a pixel model): no latent shape")
    if "dim" in config.data:
        raise ValueError(f"config.data.autoencoder.name = {name!r} needs images, but "
                         f"config.data.dataset = {config.data.dataset!r} holds points "
                         f"(data.dim): use 'none'")
    section = config.data.autoencoder
    if name == "sd_vae" and not str(section.get("path", "") or ""):
        c, f = SD_VAE_LATENT  # no VAE on disk yet: the SD VAEs' layout (sampling latents only)
    elif name == "sd_vae":
        vae = _sd_vae_config(section)
        c, f = int(vae["latent_channels"]), 2 ** (len(vae["block_out_channels"]) - 1)
    elif name == "kl":
        c, f = int(section.latent_channels), 2 ** (len(tuple(section.channel_mult)) - 1)
    else:  # another registered autoencoder: build it to ask (no weights needed)
        from models.autoencoders import create_autoencoder

        ae = create_autoencoder({**section.to_dict(), "in_channels": config.data.num_channels})
        return ae.latent_shape((config.data.num_channels, config.data.image_size,
                                config.data.image_size))
    size = config.data.image_size
    if size % f:
        raise ValueError(f"config.data.image_size = {size} must be divisible by the "
                         f"autoencoder's downsampling factor {f} (data.autoencoder.name = "
                         f"{name!r})")
    return c, size // f, size // f


def model_space_config(config):
    """``config`` itself for a pixel model; for a latent one a copy whose ``data.num_channels``,
    ``data.image_size`` are the latent's c, h and ``data.centered`` is True (module docstring),
    what the score network is built from."""
    if not is_latent(config):
        return config
    c, h, _ = latent_shape(config)
    resolved = copy.deepcopy(config)
    with resolved.unlocked():
        resolved.data.num_channels = c
        resolved.data.image_size = h
        resolved.data.centered = True
    return resolved


__all__ = ["PIXEL", "SD_VAE_LATENT", "autoencoder_name", "is_latent", "latent_shape",
           "model_space_config"]
