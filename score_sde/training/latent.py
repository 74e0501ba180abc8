"""Latent configs on the training side: the autoencoder of ``config.data.autoencoder``, checked,
loaded frozen, and the shape the score model sees (latent score SDEs: Rombach et al. 2022;
LSGM, Vahdat, Kreis & Kautz 2021).

``config.data.autoencoder.name``: ``'none'`` (a pixel model, the default of every config),
``'kl'`` (the toolkit's own :class:`models.autoencoders.KLAutoencoder`, trained by
``python main.py --config digits_ae --mode train_autoencoder --workdir runs/ae``; ``checkpoint``
names that workdir or one of its checkpoint files; its architecture keys ``latent_channels``,
``channels``, ``channel_mult``, ``num_res_blocks`` must be the trained ones) or ``'sd_vae'`` (a
Stable-Diffusion VAE from local files: ``path``, ``config``). ``scale_factor`` and ``shift`` of
z_model = (z - shift) * scale_factor: None takes the autoencoder's own (the SD VAE config's
``scaling_factor``; for ``kl`` the value its training run stored: 1 / the std of the training
latents, as Rombach et al. 2022, Sec. 4.3.2), a number overrides it; the values used are recorded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from models.autoencoders import AUTOENCODERS, Autoencoder, create_autoencoder, get_autoencoder
from models.checkpoint import CheckpointError, safe_load
from models.ema import ExponentialMovingAverage
from models.latent_space import PIXEL, autoencoder_name, is_latent, latent_shape
from score_sde import datasets

#: the command that trains the own autoencoder (named by the errors)
TRAIN_COMMAND = "python main.py --config digits_ae --mode train_autoencoder --workdir runs/ae"
#: ``data.autoencoder.reconstruction`` choices (models.autoencoders.kl.RECONSTRUCTIONS)
_KL_INT_KEYS = ("latent_channels", "channels", "num_res_blocks")


def latent_data_shape(config) -> tuple[int, ...]:
    """The shape (c, h, w) of one sample the score model sees: the latent of the config's images
    for a latent config, else ``datasets.data_shape(config)`` (images or points)."""
    return latent_shape(config) if is_latent(config) else datasets.data_shape(config)


def _number_or_none(section, key: str, positive: bool) -> None:
    value = section.get(key, None)
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        what = "a positive number" if positive else "a finite number"
        raise ValueError(f"config.data.autoencoder.{key} must be {what} or None (the "
                         f"autoencoder's own), got {value!r}")


def check_autoencoder_config(config) -> None:
    """Check ``config.data.autoencoder`` at the door (no weights are read).

    Raises:
        ValueError: an unknown name (listing the valid ones), a bad scale or architecture value,
            non-image data, a 'kl' without ``checkpoint`` (naming the command that trains one),
            an 'sd_vae' without ``path``, or image sides the autoencoder cannot divide.
        TypeError: a section that is not a dict.
    """
    section = config.data.get("autoencoder", None)
    if section is None:
        return
    if not hasattr(section, "get"):
        raise TypeError(f"config.data.autoencoder must be a ConfigDict section, got {section!r}")
    name = autoencoder_name(config)
    if name == PIXEL:
        return
    try:
        get_autoencoder(name)  # imports the implementations first
    except (KeyError, ValueError):
        raise ValueError(f"Unknown config.data.autoencoder.name {name!r}; valid: {PIXEL}, "
                         f"{', '.join(sorted(AUTOENCODERS))}") from None
    _number_or_none(section, "scale_factor", positive=True)
    _number_or_none(section, "shift", positive=False)
    if name == "kl":
        for key in _KL_INT_KEYS:
            value = section.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config.data.autoencoder.{key} must be a positive integer, "
                                 f"got {value!r}")
        mult = section.get("channel_mult")
        if not isinstance(mult, (tuple, list)) or not mult or not all(
                isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in mult):
            raise ValueError(f"config.data.autoencoder.channel_mult must be a non-empty tuple of "
                             f"positive integers, got {mult!r}")
    if config.data.get("low_res_size", 0):
        raise ValueError(f"config.data.autoencoder.name = {name!r} with data.low_res_size = "
                         f"{config.data.low_res_size}: super-resolution stages work on pixels "
                         "(set data.autoencoder.name = 'none')")
    latent_shape(config)  # non-image data, divisibility, the SD VAE's config.json


def check_autoencoder_checkpoint(config, mode: str = "train") -> None:
    """The autoencoder weights a latent config's ``--mode`` reads are named and exist, checked
    before the run starts: the own autoencoder's ``checkpoint`` always; the SD VAE's ``path``
    for every mode but sample (which stops at the latents without it).

    Raises:
        ValueError: no checkpoint / path named.
        FileNotFoundError: the path or the workdir's checkpoints are missing; the message names
            the command that trains the autoencoder (or what to download).
    """
    name = autoencoder_name(config)
    if name == "kl":
        find_autoencoder_checkpoint(config.data.autoencoder.get("checkpoint", ""))
    elif name == "sd_vae" and mode != "sample" and not can_decode(config):
        from models.autoencoders.diffusers_vae import DOWNLOAD

        raise ValueError(f"config.data.autoencoder.path is empty: --mode {mode} of this latent "
                         f"config needs the SD VAE on disk: download {DOWNLOAD} to a local "
                         f"folder and set --config.data.autoencoder.path=<folder>")


def find_autoencoder_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file ``data.autoencoder.checkpoint`` names: the file itself, or the newest
    checkpoint of a ``--mode train_autoencoder`` workdir.

    Raises:
        ValueError: an empty path.
        FileNotFoundError: nothing there, naming the command that trains one.
    """
    from score_sde.training.checkpoints import latest_checkpoint

    if not str(path or ""):
        raise ValueError(f"config.data.autoencoder.checkpoint is empty: the 'kl' autoencoder "
                         f"is trained first ({TRAIN_COMMAND}), then named with "
                         f"--config.data.autoencoder.checkpoint=runs/ae")
    path = Path(path)
    if path.is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        where = "has no checkpoints" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"config.data.autoencoder.checkpoint = {str(path)!r} {where}: "
                                f"train the autoencoder there first: python main.py --config "
                                f"digits_ae --mode train_autoencoder --workdir {path}")
    return found


def autoencoder_section(config) -> dict:
    """``config.data.autoencoder`` as the dict ``models.autoencoders.create_autoencoder`` reads
    (``in_channels`` = ``data.num_channels``; the scale is set by :func:`apply_latent_scale`)."""
    section = config.data.autoencoder.to_dict()
    section.update(in_channels=config.data.num_channels, scale_factor=None, shift=None)
    if section["name"] == "kl":
        section.update(scale_factor=1.0, shift=0.0, channel_mult=tuple(section["channel_mult"]))
    return section


def apply_latent_scale(ae: Autoencoder, config, own: dict | None = None) -> None:
    """Set ``ae``'s z_model map from ``data.autoencoder.scale_factor`` / ``shift``, or, where
    None, from ``own`` (what the autoencoder's training stored) or the autoencoder's current
    values (the SD VAE config's)."""
    section, own = config.data.autoencoder, own or {}
    scale = section.get("scale_factor", None)
    shift = section.get("shift", None)
    scale = own.get("scale_factor", ae.scale_factor) if scale is None else scale
    shift = own.get("shift", ae.shift) if shift is None else shift
    ae.set_latent_scale(float(scale), float(shift))


def _load_kl_weights(ae: Autoencoder, path: Path) -> dict:
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path}: not an autoencoder checkpoint of --mode "
                              f"train_autoencoder (no 'model' weights)")
    try:  # the architecture, then the EMA weights (what its snapshots and scale are of)
        ae.load_state_dict(ckpt["model"], strict=True)
        if "ema" in ckpt:  # a --mode train_autoencoder checkpoint; else its weights alone
            ema = ExponentialMovingAverage(ae.parameters(), decay=0.999)
            ema.load_state_dict(ckpt["ema"])
            ema.copy_to(ae.parameters())
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: does not match config.data.autoencoder's architecture "
                              f"(latent_channels, channels, channel_mult, num_res_blocks must be "
                              f"those it was trained with): {first}") from None
    if not all(torch.isfinite(p).all() for p in ae.parameters()):
        raise CheckpointError(f"{path}: the autoencoder weights hold NaN/inf values")
    scale = ckpt.get("latent_scale", {})
    return scale if isinstance(scale, dict) else {}


def load_config_autoencoder(config, device: torch.device | str | None = None
                            ) -> Autoencoder | None:
    """The autoencoder of a latent config (for 'kl': the EMA weights of its training run),
    frozen (eval mode, no gradients, float32) on
    ``device`` (default ``config.device``), its latent scale set (:func:`apply_latent_scale`);
    None for a pixel config.

    Raises:
        ValueError: a bad ``config.data.autoencoder`` (:func:`check_autoencoder_config`).
        FileNotFoundError: a missing checkpoint (naming the command that trains it) or SD VAE
            file (naming what to download).
        CheckpointError: weights that do not fit the architecture, or unsafe/damaged files.
        ImportError: 'sd_vae' without diffusers (naming the extra).
    """
    if not is_latent(config):
        return None
    check_autoencoder_config(config)
    section = autoencoder_section(config)
    own = None
    if section["name"] == "kl":
        path = find_autoencoder_checkpoint(section.get("checkpoint", ""))
        ae = create_autoencoder(section)
        own = _load_kl_weights(ae, path)
        ae.source = str(path)
    else:
        ae = create_autoencoder(section)
    apply_latent_scale(ae, config, own)
    ae = ae.float().eval().requires_grad_(False)
    return ae.to(device if device is not None else config.device)


def can_decode(config) -> bool:
    """Whether a latent config names its decoder's weights: always for 'kl' (a missing
    checkpoint is an error), for 'sd_vae' once ``data.autoencoder.path`` is set (without it
    an official DiT checkpoint still samples latents)."""
    section = config.data.autoencoder
    return not (section.name == "sd_vae" and not str(section.get("path", "") or ""))


def get_model_scaler(config):
    """Batches -> model space: a latent config's iterators already yield model-space latents
    (:mod:`training.latent_data`), so the identity; else ``datasets.get_data_scaler``."""
    return (lambda z: z) if is_latent(config) else datasets.get_data_scaler(config)


def get_model_inverse_scaler(config, ae: Autoencoder | None):
    """Model space -> data in [0, 1]: for a latent config the decoder, (decode(z) + 1) / 2, in
    chunks of ``eval.batch_size`` latents on the autoencoder's device, the images returned on
    z's device (an SD VAE decoding a whole training batch at 256 px would need far more memory;
    the only place samples are decoded); else ``datasets.get_data_inverse_scaler``."""
    if ae is None:
        return datasets.get_data_inverse_scaler(config)
    chunk = config.eval.batch_size

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return torch.cat([((ae.decode(part.to(ae.device)) + 1.0) / 2.0).to(z.device)
                          for part in z.split(chunk)])

    return decode


def describe_autoencoder(ae: Autoencoder | None) -> dict | None:
    """What records say of the autoencoder of a run (None for a pixel model): kind, shapes, the
    scale and shift used, and its source file."""
    if ae is None:
        return None
    return {**ae.describe(), "source": getattr(ae, "source", "")}


#: ``data.autoencoder.decoder_variance`` choices
DECODER_VARIANCES = ("auto", "learned", "fitted")


def bound_settings(config, split: str) -> dict:
    """The bound's settings from ``config.data.autoencoder``, checked at the door.

    Called before any file is read (``training.validation.validate_run``) and again by the
    bound itself.

    Raises:
        ValueError: an unknown ``decoder_variance`` (listing the valid ones), ``bound_draws`` or
            ``decoder_fit_images`` not a positive / non-negative integer, a fit split that is not
            'train' or 'test' or (for a ``'fitted'`` variance) is the evaluated split (the
            variance must come from held-out images), or ``eval.bpd_method`` other than 'ode'.
    """
    if config.eval.get("bpd_method", "ode") != "ode":
        raise ValueError(f"config.eval.bpd_method = {config.eval.bpd_method!r}: a latent model's "
                         "data bits/dim is the LSGM bound with the latent ODE likelihood; set "
                         "--config.eval.bpd_method=ode")
    section = config.data.autoencoder
    variance = section.get("decoder_variance", "auto")
    if variance not in DECODER_VARIANCES:
        raise ValueError(f"Unknown config.data.autoencoder.decoder_variance {variance!r}; "
                         f"valid: {', '.join(DECODER_VARIANCES)}")
    draws = section.get("bound_draws", 4)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"config.data.autoencoder.bound_draws must be an integer >= 1, got "
                         f"{draws!r}")
    fit_images = section.get("decoder_fit_images", 1000)
    if isinstance(fit_images, bool) or not isinstance(fit_images, int) or fit_images < 0:
        raise ValueError(f"config.data.autoencoder.decoder_fit_images must be an integer >= 0 "
                         f"(0: the whole split), got {fit_images!r}")
    fit_split = section.get("decoder_fit_split", "train")
    if fit_split not in ("train", "test"):
        raise ValueError(f"Unknown config.data.autoencoder.decoder_fit_split {fit_split!r}; "
                         "valid: train, test")
    if variance == "fitted" and fit_split == split:
        raise ValueError(f"config.data.autoencoder.decoder_fit_split = {fit_split!r} is the "
                         "evaluated split: fit the decoder variance on held-out images (another "
                         "split)")
    return {"decoder_variance": variance, "num_draws": draws, "fit_split": fit_split,
            "fit_images": fit_images, "split": split}



__all__ = [
    "DECODER_VARIANCES",
    "bound_settings",
    "TRAIN_COMMAND",
    "apply_latent_scale",
    "autoencoder_section",
    "can_decode",
    "check_autoencoder_checkpoint",
    "check_autoencoder_config",
    "describe_autoencoder",
    "find_autoencoder_checkpoint",
    "get_model_inverse_scaler",
    "get_model_scaler",
    "is_latent",
    "latent_data_shape",
    "load_config_autoencoder",
]
