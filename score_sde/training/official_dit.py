"""Official DiT checkpoints (facebookresearch/DiT) as ``--checkpoint`` of a DiT config.

``main.py --mode sample --config <a dit config> --checkpoint DiT-XL-2-256x256.pt`` builds the
config's model and loads the file through ``models.dit_checkpoint.load_dit_checkpoint`` (read
weights-only, every tensor checked, keys strict; the EMA weights of a training checkpoint, as the
official ``find_model``). Which layout a file has is read from its pickle with the tensors
memory-mapped (:func:`official_dit_layout`), so a 2.7 GB file is read once, by the loader.

A file for another architecture (DiT-XL/2 weights with a DiT-B/2 config) is refused with the
architecture the file holds next to the one the config builds (:func:`dit_architecture`), and
the config keys to change.
"""

from __future__ import annotations

import argparse
import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import CheckpointError
from models.dit import DiT
from models.dit_checkpoint import TRAINING_KEYS, load_dit_checkpoint
from models.utils import create_model, strip_module_prefix

#: what a layout is called in records and messages
LAYOUTS = {"state_dict": "official DiT weights (a released state dict)",
           "training": "official DiT training checkpoint (its EMA weights)"}
#: the config key that sets each entry of :func:`dit_architecture`
_CONFIG_KEYS = {"hidden_size": "model.hidden_size", "depth": "model.depth",
                "patch_size": "model.patch_size", "mlp_ratio": "model.mlp_ratio",
                "in_channels": "data.num_channels", "input_size": "data.image_size",
                "label_rows": "model.num_classes", "learn_sigma": "model.learn_sigma"}


def official_dit_layout(path: str | os.PathLike) -> str | None:
    """``'state_dict'`` (a released DiT file), ``'training'`` (an official training checkpoint,
    ``{'model', 'ema', 'opt', 'args'}``) or None (anything else: this toolkit's or the
    reference's checkpoints, safetensors, unreadable files, which their own loaders judge).

    Only the pickle is read (``torch.load(weights_only=True, mmap=True)``: tensors are
    memory-mapped, not read); compressed or non-zip files give None.
    """
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            if any(i.compress_type != zipfile.ZIP_STORED for i in archive.infolist()):
                return None
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any unreadable or non-DiT pickle: not an official DiT file
        return None
    if not isinstance(ckpt, Mapping):
        return None
    if set(TRAINING_KEYS) <= set(ckpt) and "optimizer" not in ckpt:
        return "training"
    keys = set(strip_module_prefix({str(k): None for k in ckpt}))
    if "x_embedder.proj.weight" in keys and all(isinstance(v, torch.Tensor)
                                                for v in ckpt.values()):
        return "state_dict"
    return None


def dit_architecture(state: Mapping[str, torch.Tensor]) -> dict[str, int | float | bool]:
    """The DiT hyperparameters a state dict's shapes determine (the official key names):
    hidden size D, depth, patch p, MLP ratio, input channels C, input size, label-table rows
    (K, or K + 1 with the null label) and learned sigma (2 C output channels). ``num_heads``
    leaves no trace in the shapes.

    Raises:
        CheckpointError: a state dict without DiT's keys.
    """
    state = strip_module_prefix(state)
    try:
        proj = state["x_embedder.proj.weight"]  # (D, C, p, p)
        tokens = state["pos_embed"].shape[1]  # (1, T, D)
        out = state["final_layer.linear.weight"].shape[0]  # p^2 C_out
        mlp = state["blocks.0.mlp.fc1.weight"].shape[0]  # mlp_ratio D
    except (KeyError, AttributeError, IndexError) as e:
        raise CheckpointError(f"not a DiT state dict: no {e} entry of the official layout") \
            from None
    hidden, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    table = state.get("y_embedder.embedding_table.weight")
    return {
        "hidden_size": int(hidden),
        "depth": 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
        "patch_size": int(patch),
        "mlp_ratio": mlp / hidden,
        "in_channels": int(channels),
        "input_size": math.isqrt(tokens) * int(patch),
        "label_rows": 0 if table is None else int(table.shape[0]),
        "learn_sigma": out == 2 * channels * patch * patch,
    }


def _describe(arch: Mapping) -> str:
    return ", ".join(f"{k}={v}" for k, v in arch.items())


def load_official_dit(config, path: str | os.PathLike, layout: str) -> nn.Module:
    """The DiT of ``config`` with the weights of the official file at ``path`` (EMA of a
    training checkpoint), in eval mode on ``config.device``.

    Raises:
        CheckpointError: a config whose model is not ``dit``; an unsafe or damaged file,
            non-finite values, or weights of another architecture: the message names the
            file's architecture, the config's, the config keys that differ, and the first
            mismatched tensors.
    """
    if config.model.name != "dit":
        raise CheckpointError(f"{path} ({LAYOUTS[layout]}) needs a config with "
                              f"config.model.name='dit', got {config.model.name!r}")
    model = create_model(config)
    if not isinstance(model, DiT):
        raise TypeError(f"config.model.name='dit' built a {type(model).__name__}, not a DiT")
    try:
        load_dit_checkpoint(path, model, key="ema")  # one read on success
    except CheckpointError as e:
        # Read again without a model (only on failure): a damaged, unsafe or non-finite file
        # fails here too, with the loader's message; otherwise compare the architectures.
        state = load_dit_checkpoint(path, key="ema").state_dict
        try:
            found = dit_architecture(state)
        except CheckpointError:  # not even DiT's keys: the loader's message lists them
            raise e from None
        built = dit_architecture(model.state_dict())
        differ = [f"{k} {built[k]} -> {found[k]} (--config.{_CONFIG_KEYS[k]})"
                  for k in found if found[k] != built[k]]
        if not differ:
            raise
        raise CheckpointError(
            f"{path} holds a DiT with {_describe(found)}, but the config builds one with "
            f"{_describe(built)} (label_rows: num_classes K, + 1 null row with "
            f"class_dropout_prob > 0); change {', '.join(differ)}, or use the config made for "
            f"this checkpoint. The loader said: {e}") from None
    return model.eval()
