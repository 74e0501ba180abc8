"""Training checkpoints in the reference's two kinds, written atomically, read weights-only.

* ``checkpoints-meta/checkpoint.pth`` — the frequent preemption checkpoint, overwritten
  every ``training.snapshot_freq_for_preemption`` steps;
* ``checkpoints/checkpoint_{n}.pth`` — numbered snapshots every ``training.snapshot_freq`` steps
  (n = step / snapshot_freq) and at the end.

Both hold ``{'model', 'ema', 'optimizer', 'step'}`` as the reference plus ``'rng'`` (every
generator state as uint8 tensors) and ``'data'`` (iterator positions as ints), so a resumed
run continues bit for bit. Only tensors, numbers, strings and containers are stored; loading
uses ``torch.load(weights_only=True)`` (``models.checkpoint.safe_load``).
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import CheckpointError, safe_load

META_DIR, META_FILE = "checkpoints-meta", "checkpoint.pth"
SNAPSHOT_DIR = "checkpoints"
_SNAPSHOT = re.compile(r"checkpoint_(\d+)\.pth")


def meta_path(workdir: str | os.PathLike) -> Path:
    """``workdir/checkpoints-meta/checkpoint.pth``."""
    return Path(workdir) / META_DIR / META_FILE


def snapshot_path(workdir: str | os.PathLike, n: int) -> Path:
    """``workdir/checkpoints/checkpoint_{n}.pth``."""
    return Path(workdir) / SNAPSHOT_DIR / f"checkpoint_{n}.pth"


def list_snapshots(workdir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Numbered snapshots of ``workdir`` as (n, path), ascending."""
    folder = Path(workdir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SNAPSHOT.fullmatch(p.name))]
    return sorted(found)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, flush + fsync, ``os.replace``, then
    fsync of the directory.

    A crash leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


# -- random number generator states ------------------------------------------------------------


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG state the run uses: torch's global CPU (dropout) and CUDA generators and the
    named ``generators`` (loss draws), as uint8 tensors."""
    state = {"torch": torch.get_rng_state(), "generators": {
        name: g.get_state() for name, g in generators.items()
    }}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


# -- whole training state ----------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a training checkpoint ``{'model', 'ema', 'optimizer', 'step', 'rng', 'data'}``.

    ``state`` holds the live objects (``model``, ``ema``, ``optimizer``, ``step``, and
    ``generators`` / ``iterators`` dicts); their ``state_dict()``s are what is written.
    """
    atomic_save({
        "model": state["model"].state_dict(),
        "ema": state["ema"].state_dict(),
        "optimizer": state["optimizer"].state_dict(),
        "step": int(state["step"]),
        "rng": rng_state(state["generators"]),
        "data": {name: it.state_dict() for name, it in state["iterators"].items()},
    }, path)


def restore_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into the live ``state`` (strict keys) and return it.

    Raises:
        CheckpointError: unreadable, unsafe or missing entries (naming the file and entry).
    """
    ckpt = safe_load(path)
    missing = [k for k in ("model", "ema", "optimizer", "step", "rng", "data") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint of this toolkit; "
                              f"missing {', '.join(missing)}")
    try:
        state["model"].load_state_dict(ckpt["model"], strict=True)
        state["ema"].load_state_dict(ckpt["ema"])
        state["optimizer"].load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: does not match the model of this config: {e}") from e
    state["step"] = int(ckpt["step"])
    set_rng_state(ckpt["rng"], state["generators"])
    for name, it in state["iterators"].items():
        it.load_state_dict(ckpt["data"][name])
    return state


def latest_checkpoint(workdir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: the preemption checkpoint or the newest snapshot,
    whichever is further along (by its recorded step); ``None`` in a fresh workdir."""
    candidates = []
    if meta_path(workdir).is_file():
        candidates.append(meta_path(workdir))
    snapshots = list_snapshots(workdir)
    if snapshots:
        candidates.append(snapshots[-1][1])
    if len(candidates) < 2:
        return candidates[0] if candidates else None
    steps = [int(safe_load(p)["step"]) for p in candidates]
    return candidates[steps.index(max(steps))]
