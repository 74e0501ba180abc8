"""Reading diffusers models from local files only: the optional dependency, configs and weights.

diffusers is an optional extra (``pip install -e ".[latent]"``). Its models are built here with
``from_config`` (no download: ``from_pretrained`` is never called, so the hub is never asked) and
their weights are read as safetensors, or ``.bin`` through the weights-only loader
(:func:`models.checkpoint.safe_load`), then checked like every other load path
(:func:`models.checkpoint.load_model_state`: keys strict, shapes, floating dtypes, finiteness).

The layout is diffusers' own: a folder with ``config.json`` and
``diffusion_pytorch_model.safetensors`` (or ``.bin``), possibly inside a subfolder (``vae/``,
``unet/``) of a pipeline folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import CheckpointError, load_model_state, load_safetensors, safe_load

EXTRA = 'pip install -e ".[latent]"'
CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
#: attention parameter names of diffusers files saved before 0.14 -> today's names
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def import_diffusers():
    """The ``diffusers`` module, or an ImportError naming the extra that installs it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"this needs the optional dependency diffusers: {EXTRA} "
                          f"(or pip install diffusers); import failed: {e}") from None
    return diffusers


def missing(what: str, path: Path, download: str) -> FileNotFoundError:
    """The error for a missing local file: what was looked for, where, and what to download."""
    folder = path.parent if path.suffix else path
    return FileNotFoundError(
        f"{what} not found at {path}. Nothing is downloaded at run time: download {download} "
        f"once (config.json and diffusion_pytorch_model.safetensors, e.g. `huggingface-cli "
        f"download <repo> --local-dir {folder}`) and point the config at that folder")


def find_model_folder(path: str | os.PathLike, subfolder: str, download: str) -> Path:
    """The folder holding ``config.json``: ``path`` itself or ``path/subfolder`` (a pipeline)."""
    path = Path(path)
    if not path.exists():
        raise missing("the model folder", path, download)
    for folder in (path, path / subfolder):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise missing(f"{CONFIG_NAME} (in the folder or its {subfolder}/)", path / CONFIG_NAME,
                  download)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A diffusers ``config.json`` as a dict (ValueError if it is not a JSON object)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the model config: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a model config must be a JSON object, got "
                         f"{type(config).__name__}")
    return config


def find_weights(folder: Path, download: str) -> Path:
    """``diffusion_pytorch_model.safetensors`` in ``folder``, else the ``.bin``."""
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise missing(f"weights ({' or '.join(WEIGHT_NAMES)})", folder / WEIGHT_NAMES[0], download)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weight file: ``.safetensors`` without pickle, anything else through
    ``torch.load(weights_only=True)``; the result must be a flat name -> tensor mapping."""
    path = Path(path)
    state = load_safetensors(path) if path.suffix == ".safetensors" else safe_load(path)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"],
                                                                          Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of tensors, got {type(state).__name__}")
    return dict(state)


def rename_old_attention(state: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
    """Rename pre-0.14 attention entries (``...attentions.0.query.weight``) to today's
    (``...attentions.0.to_q.weight``) where the model has the new name and not the old one."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if k not in expected and len(parts) >= 2 and parts[-2] in _OLD_ATTENTION:
            new = ".".join([*parts[:-2], _OLD_ATTENTION[parts[-2]], parts[-1]])
            if new in expected:
                # (C, C) linear weights of today vs the old (C, C, 1, 1) conv ones
                v = v.reshape(expected[new].shape) if v.numel() == expected[new].numel() else v
                k = new
        out[k] = v
    return out


def build_from_config(cls: type, config: Mapping[str, Any], source: str | os.PathLike) -> nn.Module:
    """``cls.from_config(config)`` (a diffusers model class) with randomly initialised weights,
    or a ValueError naming the config file."""
    try:
        return cls.from_config(dict(config))
    except Exception as e:  # diffusers raises several kinds on a config it cannot build
        raise ValueError(f"{source}: diffusers cannot build {cls.__name__} from this config: "
                         f"{type(e).__name__}: {e}") from None


def load_weights_into(model: nn.Module, state: Mapping[str, Any], source: str | os.PathLike
                      ) -> nn.Module:
    """Load ``state`` strictly into ``model`` (old attention names renamed), every tensor
    checked (keys, shapes, floating dtypes, finiteness); returns the model in eval mode."""
    state = rename_old_attention(state, model.state_dict())
    load_model_state(model, state, source=source)
    return model.eval()


__all__ = [
    "CONFIG_NAME",
    "EXTRA",
    "WEIGHT_NAMES",
    "build_from_config",
    "find_model_folder",
    "find_weights",
    "import_diffusers",
    "load_weights_into",
    "read_config",
    "read_weights",
    "rename_old_attention",
]
