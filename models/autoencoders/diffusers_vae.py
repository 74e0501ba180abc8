"""Pretrained Stable-Diffusion VAEs (``diffusers.AutoencoderKL``) behind the autoencoder
interface, read from local files only (Rombach et al. 2022; the VAE the official DiT sampler
decodes with, e.g. ``stabilityai/sd-vae-ft-ema``).

Two ways to give the weights (nothing is downloaded; ``from_pretrained`` / ``from_single_file``
are never called):

* a diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or ``.bin``,
  read weights-only), or a pipeline folder with them in ``vae/``;
* one weight file (``.safetensors``; others weights-only) with a local ``config.json`` (the file
  or its folder). Its keys may be diffusers' or the original latent-diffusion ones
  (``encoder.down.0.block.0...``, optionally under ``first_stage_model.``), converted by
  diffusers' own key map.

The latent map z_model = (z - shift) * scale_factor takes ``scaling_factor`` and
``shift_factor`` from the VAE's config (0.18215 and none for the SD VAEs) unless overridden.

Config section (``name = 'sd_vae'``): ``path`` (folder or weight file), ``config`` (the
``config.json`` of a single weight file; '' for a folder), ``scale_factor`` and ``shift``
(None: the VAE config's).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from models.autoencoders.base import Autoencoder, register_autoencoder
from models.checkpoint import CheckpointError
from models.diffusers_io import (
    CONFIG_NAME,
    build_from_config,
    find_model_folder,
    find_weights,
    import_diffusers,
    load_weights_into,
    missing,
    read_config,
    read_weights,
)

#: what the missing-file errors tell the user to download
DOWNLOAD = "stabilityai/sd-vae-ft-ema (or stabilityai/sd-vae-ft-mse)"
#: prefixes of the original latent-diffusion layout of the VAE's keys
_LDM_MARKERS = ("encoder.down.", "first_stage_model.", "vae.encoder.down.")


@register_autoencoder("sd_vae")
class DiffusersVAE(Autoencoder):
    """A ``diffusers.AutoencoderKL`` as an :class:`Autoencoder`.

    Args:
        vae: the loaded AutoencoderKL.
        scale_factor: None: ``vae.config.scaling_factor``.
        shift: None: ``vae.config.shift_factor`` (0 when the config has none).
    """

    def __init__(self, vae: torch.nn.Module, scale_factor: float | None = None,
                 shift: float | None = None) -> None:
        cfg = vae.config
        scale_factor = cfg.get("scaling_factor", 1.0) if scale_factor is None else scale_factor
        shift = cfg.get("shift_factor") if shift is None else shift
        super().__init__(scale_factor, 0.0 if shift is None else shift)
        self.vae = vae
        self.in_channels = int(cfg["in_channels"])
        self.latent_channels = int(cfg["latent_channels"])
        self.downsampling = 2 ** (len(cfg["block_out_channels"]) - 1)
        self.source = ""

    @classmethod
    def from_config(cls, cfg) -> DiffusersVAE:
        """Build from a config section (keys in the module docstring)."""
        path = cfg.get("path", "")
        if not path:
            raise ValueError(f"the 'sd_vae' autoencoder needs path: a local folder holding "
                             f"{DOWNLOAD} (config.json + diffusion_pytorch_model.safetensors)")
        return load_sd_vae(path, cfg.get("config") or None, scale_factor=cfg.get("scale_factor"),
                           shift=cfg.get("shift"))

    def encode_raw(self, x):
        posterior = self.vae.encode(x).latent_dist  # diffusers clamps log var to [-30, 20]
        return posterior.mean, 0.5 * posterior.logvar

    def decode_raw(self, z):
        return self.vae.decode(z).sample

    def describe(self) -> dict:
        return {**super().describe(), "source": self.source,
                "vae_scaling_factor": self.vae.config.get("scaling_factor"),
                "vae_shift_factor": self.vae.config.get("shift_factor")}


def _is_ldm_layout(keys) -> bool:
    return any(k.startswith(_LDM_MARKERS) for k in keys)


def load_sd_vae(path: str | os.PathLike, config: str | os.PathLike | None = None, *,
                scale_factor: float | None = None, shift: float | None = None) -> DiffusersVAE:
    """An SD VAE from local files, in eval mode (CPU, the file's floats cast to float32).

    Args:
        path: a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
            ``.bin``; or a pipeline folder with ``vae/``), or one weight file.
        config: for a single weight file: its ``config.json`` (the file or its folder).
        scale_factor, shift: override the VAE config's ``scaling_factor`` / ``shift_factor``.
    Raises:
        ImportError: diffusers is not installed (naming the extra).
        FileNotFoundError: naming the missing file and what to download.
        CheckpointError: unsafe, damaged, non-finite or non-float weights, or keys that do not
            fit the config's architecture.
    """
    diffusers = import_diffusers()
    path = Path(path)
    if path.is_file():
        if config is None:
            raise ValueError(f"{path} is a single weight file: give its local config.json too "
                             f"(the AutoencoderKL config of {DOWNLOAD}); nothing is fetched")
        config_path = Path(config)
        if config_path.is_dir():
            config_path = config_path / CONFIG_NAME
        if not config_path.is_file():
            raise missing("the VAE config.json", config_path, DOWNLOAD)
        weights = path
    else:
        folder = find_model_folder(path, "vae", DOWNLOAD)
        config_path, weights = folder / CONFIG_NAME, find_weights(folder, DOWNLOAD)
    vae_config = read_config(config_path)
    vae = build_from_config(diffusers.AutoencoderKL, vae_config, config_path)
    state = read_weights(weights)
    if _is_ldm_layout(state):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
        try:
            state = convert_ldm_vae_checkpoint(state, dict(vae.config))
        except Exception as e:  # diffusers' converter on keys it does not expect
            raise CheckpointError(f"{weights}: cannot convert latent-diffusion VAE keys: "
                                  f"{type(e).__name__}: {e}") from None
    load_weights_into(vae, state, weights)
    ae = DiffusersVAE(vae.float(), scale_factor, shift)
    ae.source = str(weights)
    return ae


__all__ = ["DOWNLOAD", "DiffusersVAE", "load_sd_vae"]
