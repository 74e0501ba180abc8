"""Validation before work: config values, dataset files and checkpoints, each refused with a
message naming the value and what is allowed.

``main.py`` calls :func:`validate_run` before it builds anything; the training loop re-checks the
config (cheap) and checks a checkpoint's structure before restoring it. Errors are ours:
``TypeError`` / ``ValueError`` for config values, :class:`DatasetError` for data,
``CheckpointError`` (``models.checkpoint``) for checkpoint files.

This module holds the config checks and :func:`validate_run`; the dataset checks live in
``training.dataset_validation`` and the checkpoint checks in ``training.checkpoint_validation``,
both re-exported here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from numbers import Real
from pathlib import Path
from typing import Any

import torch

import samplers
import sde_lib
from models.latent_space import is_latent, model_space_config
from models.memory import MEMORY_KEYS
from models.utils import get_model
from score_sde import datasets, losses
from score_sde.discrete_diffusion import space_timesteps
from score_sde.training import acceleration, checkpoints, classes, distributed
from score_sde.training.checkpoint_validation import (
    CHECKPOINT_KEYS,
    check_training_tensors,
    validate_checkpoint_file,
    validate_training_checkpoint,
)
from score_sde.training.dataset_validation import DatasetError, validate_dataset
from score_sde.training.latent import (
    bound_settings,
    check_autoencoder_checkpoint,
    check_autoencoder_config,
)
from score_sde.training.sampling import get_sde
from score_sde.training.super_resolution import check_super_resolution_config

# -- config values ------------------------------------------------------------------------------


def _get(config, key: str) -> tuple[bool, Any]:
    node = config
    for part in key.split("."):
        if not isinstance(node, Mapping) and not hasattr(node, "keys"):
            return False, None
        if part not in node:
            return False, None
        node = node[part]
    return True, node


def _require(config, key: str) -> Any:
    present, value = _get(config, key)
    if not present:
        raise ValueError(f"config.{key} is missing")
    return value


def _int(config, key: str, low: int = 1, *, optional: bool = False,
         nullable: bool = False) -> None:
    present, value = _get(config, key)
    if not present or (nullable and value is None):
        if optional or nullable:
            return
        raise ValueError(f"config.{key} is missing; expected an integer >= {low}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"config.{key} must be an integer >= {low}, got "
                        f"{type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"config.{key} must be an integer >= {low}, got {value}")


def _real(config, key: str, low: float = -math.inf, high: float = math.inf, *,
          low_open: bool = False, high_open: bool = False, optional: bool = True) -> None:
    present, value = _get(config, key)
    if math.isinf(high):
        allowed = f"a finite number {'>' if low_open else '>='} {low}" if low > -math.inf \
            else "a finite number"
    else:
        lb, hb = "(" if low_open else "[", ")" if high_open else "]"
        allowed = f"a number in {lb}{low}, {high}{hb}"
    if not present:
        if optional:
            return
        raise ValueError(f"config.{key} is missing; expected {allowed}")
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"config.{key} must be {allowed}, got {type(value).__name__} {value!r}")
    value = float(value)
    if (not math.isfinite(value) or value < low or value > high
            or (low_open and value == low) or (high_open and value == high)):
        raise ValueError(f"config.{key} must be {allowed}, got {value!r}")


def _bool(config, key: str) -> None:
    present, value = _get(config, key)
    if present and not isinstance(value, bool):
        raise TypeError(f"config.{key} must be True or False, got {type(value).__name__} "
                        f"{value!r}")


def _name(config, key: str, registry, *, optional: bool = False) -> None:
    present, value = _get(config, key)
    if not present:
        if optional:
            return
        raise ValueError(f"config.{key} is missing; valid: {', '.join(registry.names())}")
    try:
        registry.get(value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"config.{key}: {e}") from None


def _check_resolutions(config) -> None:
    """image_size divisible by 2^(levels - 1); every attention resolution reachable."""
    present, ch_mult = _get(config, "model.ch_mult")
    if not present or "image_size" not in config.data:
        return
    if (not isinstance(ch_mult, (tuple, list)) or not ch_mult
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in ch_mult)):
        raise TypeError(f"config.model.ch_mult must be a non-empty tuple of positive integers, "
                        f"got {ch_mult!r}")
    size, levels = config.data.image_size, len(ch_mult)
    if size % 2 ** (levels - 1):
        raise ValueError(
            f"config.data.image_size={size} does not fit config.model.ch_mult={tuple(ch_mult)}: "
            f"{levels} resolutions halve the image {levels - 1} times, so the size must be "
            f"divisible by {2 ** (levels - 1)}"
        )
    resolutions = [size // 2**k for k in range(levels)]
    present, attn = _get(config, "model.attn_resolutions")
    if present:
        if not isinstance(attn, (tuple, list)) or any(
                isinstance(r, bool) or not isinstance(r, int) for r in attn):
            raise TypeError(f"config.model.attn_resolutions must be a tuple of integers, got "
                            f"{attn!r}")
        bad = [r for r in attn if r not in resolutions]
        if bad:
            raise ValueError(
                f"config.model.attn_resolutions={tuple(attn)}: {bad} never occur; the "
                f"resolutions of image_size {size} with ch_mult {tuple(ch_mult)} are {resolutions}"
            )


def validate_config(config, world_size: int = 1) -> None:
    """Check the values a run reads before anything is built.

    Types, positive learning rate, batch sizes and frequencies, the global batch divisible by
    ``world_size``, image size against the model's resolutions, and the registered names of the
    SDE, model, optimiser, dataset, sampler, predictor and corrector; the class and guidance
    keys (``model.num_classes``, ``sampling.classes``, ``sampling.cfg_scale``,
    ``sampling.cfg_official``: ``training.classes.check_class_config``); the memory options
    ``model.grad_checkpoint`` and ``model.channels_last`` against the model (``models.memory``);
    precision, compile and ``training.grad_accum``
    (``training.acceleration.check_acceleration_config``).

    Raises:
        TypeError: a value of the wrong type (naming ``config.<key>``, the value and the type
            allowed).
        ValueError: a value out of range, an unknown name (listing the valid ones), a missing key.
    """
    for key in ("training.batch_size", "training.n_iters", "training.snapshot_freq",
                "training.snapshot_freq_for_preemption", "training.log_freq",
                "training.eval_freq", "eval.batch_size"):
        _int(config, key, optional=key == "eval.batch_size")
    for key in ("training.continuous", "training.reduce_mean", "training.likelihood_weighting",
                "training.snapshot_sampling", "training.skip_nonfinite", "data.centered",
                "data.random_flip", "data.uniform_dequantization", "model.grad_checkpoint",
                "model.channels_last"):
        _bool(config, key)
    _real(config, "training.max_skip_fraction", 0.0, 1.0)
    _int(config, "seed", low=0)
    _int(config, "num_threads", low=0, optional=True)
    device = _require(config, "device")
    if not isinstance(device, str):
        raise TypeError(f"config.device must be a string ('auto', 'cpu', 'cuda', 'cuda:0'), got "
                        f"{device!r}")
    if device != "auto":
        try:
            torch.device(device)
        except RuntimeError:
            raise ValueError(f"config.device={device!r} is not a device; use 'auto', 'cpu', "
                             "'cuda' or 'cuda:N'") from None
    distributed.check_divisible(config.training.batch_size, world_size,
                                "config.training.batch_size")

    _name(config, "optim.optimizer", losses.OPTIMIZERS)
    _real(config, "optim.lr", 0.0, low_open=True, optional=False)
    _real(config, "optim.beta1", 0.0, 1.0, high_open=True)
    _real(config, "optim.eps", 0.0, low_open=True)
    _real(config, "optim.weight_decay", 0.0)
    _int(config, "optim.warmup", low=0, optional=True)
    _real(config, "optim.grad_clip")  # negative = no clipping

    _name(config, "training.sde", sde_lib.SDES)
    try:
        get_model(_require(config, "model.name"))  # imports (registers) the architectures
    except (TypeError, ValueError) as e:
        raise type(e)(f"config.model.name: {e}") from None
    _real(config, "model.ema_rate", 0.0, 1.0)
    _real(config, "model.dropout", 0.0, 1.0, high_open=True)
    _int(config, "model.num_scales", optional=True)
    _int(config, "model.nf", optional=True)
    _int(config, "model.num_res_blocks", optional=True)
    for low, high in (("beta_min", "beta_max"), ("sigma_min", "sigma_max")):
        _real(config, f"model.{low}", 0.0, low_open=True)
        _real(config, f"model.{high}", 0.0, low_open=True)
        if low in config.model and high in config.model and \
                config.model[low] >= config.model[high]:
            raise ValueError(f"config.model.{low}={config.model[low]} must be below "
                             f"config.model.{high}={config.model[high]}")
    if any(config.model.get(key, False) for key in MEMORY_KEYS):
        with torch.device("meta"):  # the builder refuses what its model does not support
            get_model(config.model.name)(model_space_config(config))

    _name(config, "data.dataset", datasets.DATASETS)
    _int(config, "data.image_size", optional=True)
    _int(config, "data.num_channels", optional=True)
    _int(config, "data.dim", optional=True)
    _int(config, "data.num_samples", optional=True)
    datasets.check_loader_config(config)  # num_workers, cache, alpha_background
    _check_resolutions(config)

    _name(config, "sampling.method", samplers.SAMPLERS, optional=True)
    if config.get("sampling", {}).get("method", "pc") == "pc":
        _name(config, "sampling.predictor", samplers.PREDICTORS, optional=True)
        _name(config, "sampling.corrector", samplers.CORRECTORS, optional=True)
    _int(config, "sampling.nfe", optional=True, nullable=True)  # None: the sampler's default
    _int(config, "sampling.adaptive_nfe", 2, optional=True, nullable=True)  # None: no budget
    _real(config, "sampling.snr", 0.0, low_open=True)
    classes.check_class_config(config)
    check_discrete_diffusion_config(config)
    check_super_resolution_config(config)  # data.low_res_size, model.cond_*, training.cond_aug_*
    acceleration.check_acceleration_config(config, world_size)
    check_autoencoder_config(config)  # data.autoencoder (training.latent)


def _choice(config, key: str, choices: tuple[str, ...]) -> Any:
    present, value = _get(config, key)
    if present and value not in choices:
        raise ValueError(f"config.{key}={value!r}; valid: {', '.join(choices)}")
    return value if present else None


def check_discrete_diffusion_config(config) -> None:
    """The keys of improved-DDPM training and bits/dim (``training.loss``, ``vlb_rescale``,
    ``vlb_importance_sampling``, ``eval.bpd_method``, ``eval.vlb_spacing``): 'hybrid' needs
    discrete training (``training.continuous = False``, ``reduce_mean = True``) of a
    ``discrete_vpsde`` / ``vpsde`` model with ``model.learn_sigma``; a model with
    ``learn_sigma`` needs 'hybrid' (it never trains v otherwise); importance sampling needs
    'hybrid'; 'vlb' bits/dim need a discrete model of such an SDE and a valid spacing.

    Raises:
        TypeError, ValueError: naming the key, its value and what is allowed.
    """
    for key in ("training.vlb_rescale", "training.vlb_importance_sampling"):
        _bool(config, key)
    loss = _choice(config, "training.loss", losses.OBJECTIVES) or "simple"
    t = config.training
    sde_name = t.get("sde")
    ddpm_sdes = [n for n in sde_lib.SDES.names()
                 if hasattr(sde_lib.SDES.get(n), "index_to_time")]
    learn_sigma = bool(config.get("model", {}).get("learn_sigma", False))

    def needs_discrete_ddpm(what: str) -> None:
        if t.get("continuous", True) or sde_name not in ddpm_sdes:
            raise ValueError(f"{what} needs a discrete DDPM model (it needs "
                             f"training.continuous=False and training.sde in "
                             f"{', '.join(ddpm_sdes)}); got continuous={t.get('continuous')}, "
                             f"sde={sde_name!r}")

    if loss == "hybrid":
        needs_discrete_ddpm("config.training.loss='hybrid'")
        if not learn_sigma:
            raise ValueError("config.training.loss='hybrid' needs config.model.learn_sigma=True "
                             "(L_vlb trains the network's variances v)")
        if not t.get("reduce_mean", True):
            raise ValueError("config.training.loss='hybrid' averages over dimensions (the "
                             "official L_hybrid); set config.training.reduce_mean=True")
    elif learn_sigma and not t.get("continuous", True):
        raise ValueError("config.model.learn_sigma=True with config.training.loss='simple' would "
                         "never train the variances v; set training.loss='hybrid'")
    if t.get("vlb_importance_sampling", False) and loss != "hybrid":
        raise ValueError("config.training.vlb_importance_sampling=True needs "
                         "config.training.loss='hybrid'")
    method = _choice(config, "eval.bpd_method", ("ode", "vlb"))
    if method == "vlb":
        needs_discrete_ddpm("config.eval.bpd_method='vlb'")
        spacing = config.eval.get("vlb_spacing")
        if spacing is not None:
            space_timesteps(get_sde(config).N, spacing)  # a bad spacing fails here, naming it


def validate_run(config, workdir: str | os.PathLike, mode: str, world_size: int = 1) -> None:
    """Everything ``main.py`` checks before work: the mode against the world size, the config,
    the dataset (train and likelihood modes, and the labelled splits of a class-conditional
    eval) and, for training, the checkpoints a resume would read.

    Raises:
        ValueError, TypeError: config values or a multi-process launch of a one-process mode.
        DatasetError: dataset files.
        CheckpointError: the checkpoints of ``workdir``.
    """
    if world_size > 1 and mode != "train":
        raise ValueError(f"--mode {mode} runs in one process; only --mode train is "
                         f"data-parallel (launched with {world_size} processes by torchrun)")
    validate_config(config, world_size)
    check_autoencoder_checkpoint(config, mode)  # a latent config's autoencoder is on disk
    bpd = mode == "likelihood" or (mode == "eval" and config.get("eval", {}).get("enable_bpd"))
    if bpd and is_latent(config):  # the bound's settings, before any network is loaded
        bound_settings(config, config.eval.get("bpd_dataset", "test"))
    if mode == "train":
        validate_dataset(config, ("train", "test"), Path(workdir) / "verified_images.json")
        for path in (checkpoints.meta_path(workdir),
                     *[p for _, p in checkpoints.list_snapshots(workdir)[-1:]]):
            if Path(path).is_file():
                validate_checkpoint_file(path, config)
    elif mode == "likelihood":
        validate_dataset(config, (config.eval.get("bpd_dataset", "test"),))
    elif mode == "eval" and classes.read_num_classes(config):  # loss and bits/dim read labels
        e = config.get("eval", {})
        splits = {"test"} if e.get("enable_loss") else set()
        if e.get("enable_bpd"):
            splits.add(e.get("bpd_dataset", "test"))
        if splits:
            validate_dataset(config, tuple(sorted(splits)))


__all__ = [
    "CHECKPOINT_KEYS",
    "DatasetError",
    "check_discrete_diffusion_config",
    "check_training_tensors",
    "validate_checkpoint_file",
    "validate_config",
    "validate_dataset",
    "validate_run",
    "validate_training_checkpoint",
]
