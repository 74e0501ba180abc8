"""Convert a reference training checkpoint to our inference format (safetensors + JSON config).

Usage::

    python -m models.convert CKPT OUT_DIR --config CONFIG

``CKPT`` is a ``checkpoint_*.pth`` of yang-song/score_sde_pytorch (read weights-only, see
``models.checkpoint``). The reference stores no config in its checkpoints, so ``--config`` gives
the one the model was trained with: a JSON file holding a config dict (or a file with that dict
under ``"config"``, like the reference fixtures' JSON), or a config name (resolved through the
``configs`` package once it provides ``get_config(name)``). ``OUT_DIR`` receives
``config.json``, ``model.safetensors`` (raw weights) and ``ema.safetensors`` (EMA weights, the
default at load time); ``models.checkpoint.load_inference(OUT_DIR)`` rebuilds the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import ml_collections

from models.checkpoint import (
    CheckpointError,
    load_reference_checkpoint,
    save_inference,
)
from models.ema import ExponentialMovingAverage
from models.utils import create_model


def _from_json(path: Path) -> ml_collections.ConfigDict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: cannot read a JSON config: {e}") from e
    if isinstance(d, dict) and "model" not in d and isinstance(d.get("config"), dict):
        d = d["config"]  # a record holding the config (fixture JSON, our config.json)
    if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
        raise ValueError(f"--config {path}: expected a config dict with a 'model' section")
    return ml_collections.ConfigDict(d)


def _from_name(name: str) -> ml_collections.ConfigDict:
    """Hook: a config by name from the ``configs`` package (``configs.get_config(name)``)."""
    try:
        import configs
    except ImportError:
        configs = None
    get_config = getattr(configs, "get_config", None)
    if get_config is None:
        raise ValueError(
            f"--config {name!r}: not a JSON file, and config names need configs.get_config "
            "(not available yet); pass the training config as a JSON file"
        )
    return get_config(name)


def resolve_config(name_or_path: str) -> ml_collections.ConfigDict:
    """The model config from a JSON file path or a registered config name."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        return _from_json(path)
    return _from_name(name_or_path)


def convert(
    ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, config: ml_collections.ConfigDict
) -> dict:
    """Convert a reference checkpoint to ``out_dir`` (raw and EMA weights + ``config.json``).

    Args:
        ckpt_path: the reference ``.pth`` training checkpoint.
        out_dir: the inference directory to write.
        config: the config the checkpoint's model was trained with.
    Returns:
        A summary: ``step``, ``ema_decay``, ``ema_num_updates``, ``num_params``, ``out_dir``.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.device = "cpu"
    model = create_model(config)
    ema = ExponentialMovingAverage(model.parameters(), decay=config.model.get("ema_rate", 0.999))
    ckpt = load_reference_checkpoint(ckpt_path, model, ema=ema)
    step = ckpt["step"]
    sha = hashlib.sha256(Path(ckpt_path).read_bytes()).hexdigest()
    metadata = {
        "source": str(ckpt_path),
        "source_sha256": sha,
        "source_format": "yang-song/score_sde_pytorch training checkpoint",
        "step": int(step) if isinstance(step, int) else None,
    }
    save_inference(model, config, out_dir, ema=ema, metadata=metadata)
    return {
        "out_dir": str(out_dir),
        "step": metadata["step"],
        "ema_decay": ema.decay,
        "ema_num_updates": ema.num_updates,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m models.convert",
        description="Convert a score_sde_pytorch checkpoint to safetensors + config.json.",
    )
    parser.add_argument("ckpt", help="reference training checkpoint (.pth)")
    parser.add_argument("out_dir", help="output directory (created if missing)")
    parser.add_argument(
        "--config",
        required=True,
        help="the training config: a JSON file of the config dict, or a config name",
    )
    args = parser.parse_args(argv)
    try:
        summary = convert(args.ckpt, args.out_dir, resolve_config(args.config))
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {summary['out_dir']}: config.json, model.safetensors, ema.safetensors "
        f"({summary['num_params']} parameters, step {summary['step']}, EMA decay "
        f"{summary['ema_decay']}, {summary['ema_num_updates']} updates)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
