"""Checks of training checkpoints before they are restored: the structure of a loaded checkpoint
(entries, step, RNG states, data positions) and its tensors against the live model, EMA and
optimizer, each refused with a ``CheckpointError`` (``models.checkpoint``) naming the file and the
entry.

``training.checkpoints`` runs both checks before restoring; ``training.validation.validate_run``
reads the checkpoints a resume would use with :func:`validate_checkpoint_file`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from models.checkpoint import (
    CheckpointError,
    check_state_dict,
    check_tensors,
    name_ema_shadow_params,
    safe_load,
)
from models.latent_space import model_space_config
from models.utils import get_model

#: top-level entries of a training checkpoint (``training.checkpoints.save_checkpoint``)
CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step", "rng", "data")


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


__all__ = [
    "CHECKPOINT_KEYS",
    "check_training_tensors",
    "validate_checkpoint_file",
    "validate_training_checkpoint",
]
