"""Official DiT checkpoints (facebookresearch/DiT), read without running pickled code.

Two layouts are read:

* released weights (``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``): ``torch.save(state_dict)``
  of the EMA model;
* training checkpoints (``results/<run>/checkpoints/0400000.pt``): ``torch.save({'model', 'ema',
  'opt', 'args'})`` with the raw and EMA state dicts, the optimizer state and the run's
  ``argparse.Namespace`` (``model`` e.g. 'DiT-XL/2', ``image_size``, ``num_classes``, ...). As the
  official ``find_model``, the EMA weights are taken by default.

Files go through :func:`models.checkpoint.safe_load` (``torch.load(weights_only=True)``), with
``argparse.Namespace`` as the one class allowed beyond tensors, containers and scalars: a pickle
asking for anything else (e.g. ``os.system``) raises ``UnsafeCheckpointError`` before it runs.
The weights are checked by :func:`models.checkpoint.check_tensors` (names, shapes, dtypes, NaN).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from models.checkpoint import CheckpointError, check_tensors, safe_load
from models.dit import DiT, build_dit
from models.utils import strip_module_prefix

#: The entries of an official training checkpoint.
TRAINING_KEYS = ("model", "ema", "opt", "args")
_WEIGHT_KEYS = ("ema", "model")


class DiTCheckpoint(NamedTuple):
    """What :func:`load_dit_checkpoint` read."""

    state_dict: dict[str, torch.Tensor]
    #: the training run's arguments as a plain dict; None for a released state dict.
    args: dict[str, Any] | None


def _weights(ckpt: Any, key: str, path) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """The state dict selected by ``key``, the args and the entry's name, for either layout."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: not a DiT checkpoint: a {type(ckpt).__name__}, not a dict")
    if not ({"model", "ema"} & set(ckpt)):  # a released state dict
        return dict(ckpt), None, "state_dict"
    if key not in ckpt:
        raise CheckpointError(f"{path}: training checkpoint has no {key!r} entry; found "
                              f"{', '.join(map(str, ckpt))}")
    state = ckpt[key]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: {key!r} is a {type(state).__name__}, not a state dict")
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        args = dict(vars(args))
    elif args is not None and not isinstance(args, Mapping):
        raise CheckpointError(f"{path}: 'args' is a {type(args).__name__}, not an "
                              "argparse.Namespace")
    return dict(state), None if args is None else dict(args), key


def load_dit_checkpoint(
    path: str | os.PathLike, model: DiT | None = None, key: str = "ema"
) -> DiTCheckpoint:
    """Read an official DiT checkpoint safely and, if ``model`` is given, load it strictly.

    Args:
        path: a released ``.pt`` state dict or an official training checkpoint.
        model: a :class:`DiT` built for the checkpoint (e.g. ``build_dit('DiT-XL/2',
            input_size=32)`` for 256 px, or :func:`build_dit_from_args`); its state is loaded
            with ``strict=True`` after the checks.
        key: which weights of a training checkpoint: ``'ema'`` (default, as the official
            ``find_model``) or ``'model'`` (the raw weights). A released file holds one set.
    Returns:
        ``DiTCheckpoint(state_dict, args)``: the selected weights (``module.`` prefix removed)
        and the run's arguments as a plain dict (None for a released state dict).
    Raises:
        ValueError: an unknown ``key``.
        FileNotFoundError, UnsafeCheckpointError, CheckpointError: a missing, unsafe or damaged
            file, an unknown layout, missing or unexpected keys (listed), shape or dtype
            mismatches, NaN or inf values (naming the tensor).
    """
    if key not in _WEIGHT_KEYS:
        raise ValueError(f"Unknown DiT checkpoint key {key!r}; valid: {', '.join(_WEIGHT_KEYS)}")
    state, args, what = _weights(safe_load(path, allow=[argparse.Namespace]), key, path)
    state = strip_module_prefix(state)
    non_tensor = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise CheckpointError(f"{path}: not a DiT state dict: non-tensor entries "
                              f"{', '.join(map(str, non_tensor[:10]))}")
    if model is None:
        check_tensors(state, path, what=what)
    else:
        check_tensors(state, path, model.state_dict(), what=what, owner=type(model).__name__)
        model.load_state_dict(state, strict=True)
    return DiTCheckpoint(state, args)


def build_dit_from_args(args: Mapping[str, Any], **overrides) -> DiT:
    """The DiT an official training run built: ``args['model']`` (e.g. 'DiT-XL/2') at input
    ``args['image_size'] // 8`` (the SD-VAE latent) with ``args['num_classes']`` classes and
    learned sigma, updated by ``overrides``.

    Raises:
        ValueError: args without those entries, or an unknown model name.
    """
    missing = [k for k in ("model", "image_size", "num_classes") if k not in args]
    if missing:
        raise ValueError(f"DiT training args lack {', '.join(missing)}; found "
                         f"{', '.join(sorted(args))}")
    return build_dit(args["model"], **{"input_size": args["image_size"] // 8,
                                       "num_classes": args["num_classes"], **overrides})
