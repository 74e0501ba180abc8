"""Validation before work: config values, dataset files and checkpoints, each refused with a
message naming the value and what is allowed.

``main.py`` calls :func:`validate_run` before it builds anything; the training loop re-checks the
config (cheap) and checks a checkpoint's structure before restoring it. Errors are ours:
``TypeError`` / ``ValueError`` for config values, :class:`DatasetError` for data,
``CheckpointError`` (``models.checkpoint``) for checkpoint files.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from numbers import Real
from pathlib import Path
from typing import Any

import torch

import samplers
import sde_lib
from models.checkpoint import (
    CheckpointError,
    check_state_dict,
    check_tensors,
    name_ema_shadow_params,
    safe_load,
)
from models.latent_space import model_space_config
from models.memory import MEMORY_KEYS
from models.utils import get_model
from score_sde import datasets, losses
from score_sde.discrete_diffusion import space_timesteps
from score_sde.training import acceleration, classes, distributed
from score_sde.training.latent import check_autoencoder_checkpoint, check_autoencoder_config
from score_sde.training.sampling import get_sde
from score_sde.training.super_resolution import check_super_resolution_config

#: top-level entries of a training checkpoint (``training.checkpoints.save_checkpoint``)
CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step", "rng", "data")


class DatasetError(ValueError):
    """A dataset that cannot be used: missing or corrupt files, or samples of the wrong shape."""


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


# -- dataset files ------------------------------------------------------------------------------


def validate_dataset(config, splits: tuple[str, ...] = ("train",),
                     verified: str | os.PathLike | None = None) -> None:
    """Load each split once and check its samples against the config.

    Image folders are checked file by file: every image is decoded once (a truncated JPEG passes
    PIL's ``verify``, not its decoder). ``verified`` names a JSON file remembering the files
    (path, size, mtime) already decoded, so a restarted run does not decode them again. Other
    datasets are read in full.

    Args:
        config: the experiment config (``data.*``, ``training.batch_size``).
        splits: the splits to check.
        verified: optional cache of decoded image files (written atomically).

    Raises:
        DatasetError: missing or corrupt files, or samples whose shape is not
            ``datasets.data_shape(config)``, naming the dataset, the file or value and what is
            expected; chained to the underlying error.
        ValueError: a class-conditional config (``model.num_classes = K > 0``) on a dataset
            without classes or with more than K (``training.classes.check_dataset_classes``).
    """
    name = config.data.dataset
    expected = datasets.data_shape(config)
    for split in splits:
        try:
            dataset = datasets.get_dataset(config, split)
            if name == "folder":
                _decode_images(dataset.data, verified)
        except DatasetError:
            raise
        except Exception as e:  # any reader's error on a bad file becomes one clear message
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DatasetError(f"dataset {name!r} ({split} split) cannot be used: "
                               f"{type(e).__name__}: {detail}") from e
        shape = tuple(dataset.data.shape[1:])
        if shape != expected:
            raise DatasetError(
                f"dataset {name!r} ({split} split) has samples of shape {shape}, but the config "
                f"expects {expected} (data.image_size / data.num_channels / data.dim)"
            )
        batch = config.training.batch_size
        if split == "train" and len(dataset) < batch:
            raise DatasetError(f"dataset {name!r} has {len(dataset)} training samples, fewer "
                               f"than config.training.batch_size={batch}")
        if isinstance(dataset.data, torch.Tensor) and dataset.data.is_floating_point() and \
                not bool(torch.isfinite(dataset.data).all()):
            raise DatasetError(f"dataset {name!r} ({split} split) contains NaN or inf values")
        classes.check_dataset_classes(config, dataset, split)


def _decode_images(images, verified: str | os.PathLike | None) -> None:
    """Decode each file of ``images`` (``datasets.folder.FolderImages``) as training will."""
    import json

    from score_sde.utils import atomic_write_bytes

    known: dict[str, list[int]] = {}
    if verified is not None and Path(verified).is_file():
        with contextlib.suppress(ValueError, OSError):
            known = dict(json.loads(Path(verified).read_text()))
    done = {}
    for i, path in enumerate(images.files):
        stat = path.stat()
        key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
        if known.get(key) != stamp:
            try:
                images[[i]]  # EXIF, alpha, resize: everything training does to it
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ...
                raise DatasetError(f"image {path} is corrupt or not an image: "
                                   f"{type(e).__name__}: {e}") from e
        done[key] = stamp
    if verified is not None and done != known:
        atomic_write_bytes(verified, json.dumps(done).encode())


# -- checkpoints --------------------------------------------------------------------------------


def _byte_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def validate_training_checkpoint(ckpt: Any, path: str | os.PathLike,
                                 generators: Mapping[str, Any] | None = None,
                                 iterators: Mapping[str, Any] | None = None) -> None:
    """Structure of a loaded training checkpoint: the entries, step, RNG states, data positions.

    Args:
        ckpt: what ``safe_load`` returned.
        path: the file, for the messages.
        generators, iterators: the live ones whose states the checkpoint must hold (names only).
    Raises:
        CheckpointError: naming the file and the entry that is missing or malformed.
    """
    where = str(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{where}: not a training checkpoint (a {type(ckpt).__name__}, "
                              "expected a dict)")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{where}: not a training checkpoint of this toolkit; missing "
                              f"{', '.join(missing)}")
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{where}: 'step' must be an integer >= 0, got {step!r}")
    for key in ("model", "ema", "optimizer"):
        if not isinstance(ckpt[key], dict):
            raise CheckpointError(f"{where}: {key!r} must be a state dict, got "
                                  f"{type(ckpt[key]).__name__}")
    rng = ckpt["rng"]
    if not (isinstance(rng, dict) and _byte_tensor(rng.get("torch"))
            and isinstance(rng.get("generators"), dict)):
        raise CheckpointError(f"{where}: 'rng' must hold 'torch' (a uint8 state) and "
                              "'generators'")
    for name in generators or {}:
        if not _byte_tensor(rng["generators"].get(name)):
            raise CheckpointError(f"{where}: no state of generator {name!r} in 'rng'")
    data = ckpt["data"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: 'data' must map iterator names to positions")
    for name in iterators or {}:
        position = data.get(name)
        if not (isinstance(position, dict) and set(position) >= {"epoch", "batch", "seed"}
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                        for v in (position["epoch"], position["batch"]))
                and isinstance(position["seed"], int)):
            raise CheckpointError(f"{where}: data position {name!r} must be "
                                  f"{{'epoch', 'batch', 'seed'}} integers, got {position!r}")


def check_training_tensors(ckpt: Mapping[str, Any], model: torch.nn.Module,
                           path: str | os.PathLike,
                           params: list[torch.Tensor] | None = None) -> None:
    """Dtypes, shapes and finiteness of a training checkpoint's tensors against the live ones,
    by ``models.checkpoint.check_tensors``: the model's state dict, the EMA's shadow parameters
    and the optimizer's per-parameter buffers (``exp_avg`` ...; scalar counters such as
    ``step`` need only be finite if floating).

    Args:
        ckpt: a checkpoint that passed :func:`validate_training_checkpoint`.
        model: the live model (may be on the ``meta`` device).
        path: the file, for the messages.
        params: the optimizer's parameters in its order; default ``model.parameters()``.
    Raises:
        CheckpointError: naming the file and the entry.
    """
    check_state_dict(model, ckpt["model"], str(path))
    name_ema_shadow_params(model, ckpt["ema"], path)
    params = list(model.parameters()) if params is None else params
    found, expected = {}, {}
    state = ckpt["optimizer"].get("state", {})
    for index, entries in (state.items() if isinstance(state, Mapping) else ()):
        for key, value in (entries.items() if isinstance(entries, Mapping) else ()):
            name = f"state.{index}.{key}"
            found[name] = value
            if (isinstance(index, int) and 0 <= index < len(params)
                    and isinstance(value, torch.Tensor) and value.dim() > 0):
                expected[name] = params[index]  # a buffer with the parameter's shape and dtype
    check_tensors(found, path, expected, what="optimizer", strict=False,
                  owner=type(model).__name__)


def validate_checkpoint_file(path: str | os.PathLike, config) -> dict:
    """Read a training checkpoint weights-only and check it against ``config``'s model.

    The model is built on the ``meta`` device (no memory) to compare keys, shapes and dtypes;
    every floating tensor must be finite (:func:`check_training_tensors`).

    Returns:
        the loaded checkpoint.
    Raises:
        CheckpointError: unreadable, unsafe, truncated, malformed, non-finite, or for another
            architecture, naming the file and the reason.
    """
    ckpt = safe_load(path)
    validate_training_checkpoint(ckpt, path)
    config = config.copy_and_resolve_references()
    config.device = "meta"
    with torch.device("meta"):
        model = get_model(config.model.name)(model_space_config(config))
    check_training_tensors(ckpt, model, path)
    return ckpt


def validate_run(config, workdir: str | os.PathLike, mode: str, world_size: int = 1) -> None:
    """Everything ``main.py`` checks before work: the mode against the world size, the config,
    the dataset (train and likelihood modes, and the labelled splits of a class-conditional
    eval) and, for training, the checkpoints a resume would read.

    Raises:
        ValueError, TypeError: config values or a multi-process launch of a one-process mode.
        DatasetError: dataset files.
        CheckpointError: the checkpoints of ``workdir``.
    """
    from score_sde.training import checkpoints  # imports this module

    if world_size > 1 and mode != "train":
        raise ValueError(f"--mode {mode} runs in one process; only --mode train is "
                         f"data-parallel (launched with {world_size} processes by torchrun)")
    validate_config(config, world_size)
    check_autoencoder_checkpoint(config, mode)  # a latent config's autoencoder is on disk
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
