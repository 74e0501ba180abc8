"""Convert a reference training checkpoint to our inference format (safetensors + JSON config).

Usage::

    python -m models.convert CKPT OUT_DIR --config CONFIG [--config.<section>.<key>=VALUE ...]
        [--overwrite]

``CKPT`` is a ``checkpoint_*.pth`` of yang-song/score_sde_pytorch (read weights-only, see
``models.checkpoint``). The reference stores no config in its checkpoints, so ``--config`` gives
the one the model was trained with: a config name of ``configs/registry.py`` (``ve_cifar``), a
config file (``configs/ve/cifar10_ncsnpp_continuous.py``), or a JSON file holding a config dict
(or a file with that dict under ``"config"``, like the reference fixtures' JSON).
``--config.<section>.<key>=VALUE`` changes an existing key of it, as in ``main.py``.
``OUT_DIR`` receives ``config.json``, ``model.safetensors`` (raw weights) and ``ema.safetensors``
(EMA weights, the default at load time); ``models.checkpoint.load_inference(OUT_DIR)`` rebuilds
the model. An existing ``OUT_DIR`` is refused unless it is empty, or is an inference directory
and ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import json
import os
import sys
from pathlib import Path

import ml_collections

from configs.registry import CONFIGS
from models.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    load_reference_checkpoint,
    read_inference_record,
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


def _from_module(module: str, where: str) -> ml_collections.ConfigDict:
    try:
        get_config = importlib.import_module(module).get_config
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--config {where}: cannot load a config from it: {e}") from e
    return get_config()


def _from_name(name: str) -> ml_collections.ConfigDict:
    """A config by its short name in ``configs.registry.CONFIGS``."""
    if name not in CONFIGS:
        raise ValueError(
            f"--config {name!r}: not a file, and unknown config name; valid: "
            f"{', '.join(sorted(CONFIGS))} (or a .py config file or a JSON config)"
        )
    return _from_module(CONFIGS[name], repr(name))


def _from_python(path: Path) -> ml_collections.ConfigDict:
    """A config file of this repository (``configs/...py``, imported as its module)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        relative = path.resolve().relative_to(repo)
    except ValueError:
        raise ValueError(f"--config {path}: a .py config must be inside {repo}/configs "
                         "(or pass its short name, or a JSON config)") from None
    return _from_module(".".join(relative.with_suffix("").parts), str(path))


def resolve_config(name_or_path: str) -> ml_collections.ConfigDict:
    """The training config from a registered name, a ``.py`` config file or a JSON file."""
    path = Path(name_or_path)
    if path.suffix in (".json", ".py"):
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        return _from_json(path) if path.suffix == ".json" else _from_python(path)
    if path.is_file():
        return _from_json(path)
    return _from_name(name_or_path)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Set ``--config.<section>.<key>=VALUE`` overrides in place; VALUE is a Python literal
    (``16``, ``(1, 2, 2)``, ``True``) or else a string. Only existing keys may be set.

    Raises:
        ValueError: a malformed override or an unknown key (listing the valid ones).
        TypeError: a value of another type than the key's.
    """
    for item in overrides:
        key, sep, text = item.removeprefix("--config.").partition("=")
        if not item.startswith("--config.") or not sep or not key:
            raise ValueError(f"unrecognised argument {item!r}; overrides are "
                             "--config.<section>.<key>=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, field = key.split(".")
        node = config
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ValueError(f"--config.{key}: no section {part!r} in the config")
            node = node[part]
        if field not in node:
            raise ValueError(f"--config.{key}: unknown key {field!r}; valid: "
                             f"{', '.join(sorted(node.keys()))}")
        try:
            node[field] = value
        except TypeError as e:
            raise TypeError(f"--config.{key}={text}: {e}") from None


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output path that is a file, or a non-empty directory unless ``overwrite`` and
    it is an inference directory (one written by :func:`models.checkpoint.save_inference`).

    Raises:
        FileExistsError: naming the path and what to do.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory; choose another path")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise FileExistsError(f"output directory {out} is not empty; pass --overwrite to "
                              "replace the converted files in it, or choose another path")
    try:
        read_inference_record(out)
    except (FileNotFoundError, CheckpointError):
        raise FileExistsError(f"output directory {out} is not empty and is not an inference "
                              f"directory (no valid {CONFIG_FILE}); --overwrite only replaces "
                              "an earlier conversion") from None
    return out


def convert(
    ckpt_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: ml_collections.ConfigDict,
    overwrite: bool = False,
) -> dict:
    """Convert a reference checkpoint to ``out_dir`` (raw and EMA weights + ``config.json``).

    Args:
        ckpt_path: the reference ``.pth`` training checkpoint.
        out_dir: the inference directory to write (see :func:`check_output_dir`).
        config: the config the checkpoint's model was trained with.
        overwrite: replace an earlier conversion in ``out_dir``.
    Returns:
        A summary: ``step``, ``ema_decay``, ``ema_num_updates``, ``num_params``, ``out_dir``.
    Raises:
        FileExistsError: ``out_dir`` is taken.
        CheckpointError: the checkpoint does not fit the config, or holds tensors of the wrong
            dtype or with NaN/inf values (``models.checkpoint.check_tensors``).
    """
    check_output_dir(out_dir, overwrite)
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
    parser.add_argument(
        "out_dir", help="output directory (created if missing; must be empty, see --overwrite)"
    )
    parser.add_argument(
        "--config",
        required=True,
        help="the training config: a config name ("
        + ", ".join(CONFIGS)
        + "), a configs/...py file, or a JSON file of the config dict; "
        "--config.<section>.<key>=VALUE changes a key, e.g. --config.model.nf=64",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier conversion in OUT_DIR (an existing non-empty "
        "OUT_DIR is refused otherwise)",
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        config = resolve_config(args.config)
        apply_overrides(config, overrides)
        summary = convert(args.ckpt, args.out_dir, config, overwrite=args.overwrite)
    except (CheckpointError, ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
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
