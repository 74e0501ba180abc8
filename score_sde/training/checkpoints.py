"""Training checkpoints in the reference's two kinds, written atomically, read weights-only.

* ``checkpoints-meta/checkpoint.pth`` — the frequent preemption checkpoint, overwritten
  every ``training.snapshot_freq_for_preemption`` steps and at every snapshot step, after the
  snapshot and its sample grid: it marks its step done, and training resumes from it alone;
* ``checkpoints/checkpoint_{n}.pth`` — numbered snapshots every ``training.snapshot_freq`` steps
  (n = step / snapshot_freq) and at the end.

Both hold ``{'model', 'ema', 'optimizer', 'step'}`` as the reference plus ``'rng'`` (every
generator state as uint8 tensors) and ``'data'`` (iterator positions as ints), and, for a run
with ``training.vlb_importance_sampling``, ``'importance_sampler'`` (the history of the L_vlb
terms), so a resumed run continues bit for bit. Only tensors, numbers, strings and containers
are stored; loading uses ``torch.load(weights_only=True)`` (``models.checkpoint.safe_load``).
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import CheckpointError, safe_load
from models.memory import match_optimizer_state_layout
from score_sde.losses import load_optimizer_state
from score_sde.training.checkpoint_validation import (
    check_training_tensors,
    validate_training_checkpoint,
)
from score_sde.training.nonfinite import check_state_finite
from score_sde.utils import WriteError, atomic_write_bytes

log = logging.getLogger(__name__)

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


class CheckpointWriteError(WriteError):
    """A checkpoint could not be written (e.g. a full disk); the previous one is intact."""


def atomic_save(obj: Any, path: str | os.PathLike, what: str = "") -> None:
    """``torch.save`` into memory, then :func:`utils.atomic_write_bytes` (temporary file beside
    ``path``, flush + fsync, ``os.replace``, fsync of the directory).

    A crash leaves either the old file or the new one, never a partial file.

    Raises:
        utils.WriteError: the write failed; its message names ``what``.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer(), what=what,  # no copy of a large checkpoint
                       hint="Free space and run again to resume.")


def remove_stale_temporaries(workdir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in the checkpoint folders (names
    ``.<file>.<...>.tmp``); returns them. Call only while holding the workdir's lock
    (:class:`training.lock.WorkdirLock`), so that no other process writes there."""
    removed = []
    for folder in (Path(workdir) / META_DIR, Path(workdir) / SNAPSHOT_DIR):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


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

    Raises:
        FloatingPointError: a NaN/inf in the model, EMA or optimizer state (nothing is written).
        CheckpointWriteError: the write failed (e.g. no space left on device); the file at
            ``path`` is still the previous checkpoint and no temporary file is left.
    """
    check_state_finite(state)
    step = int(state["step"])
    ckpt = {
        "model": state["model"].state_dict(),
        "ema": state["ema"].state_dict(),
        "optimizer": state["optimizer"].state_dict(),
        "step": step,
        "rng": rng_state(state["generators"]),
        "data": {name: it.state_dict() for name, it in state["iterators"].items()},
    }
    if state.get("importance_sampler") is not None:
        ckpt["importance_sampler"] = state["importance_sampler"].state_dict()
    if state.get("grad_scaler") is not None:  # fp16: the loss scale and its growth tracker
        ckpt["grad_scaler"] = state["grad_scaler"].state_dict()
    if state.get("latent_scale") is not None:  # an autoencoder's run (training.autoencoder)
        ckpt["latent_scale"] = {k: float(v) for k, v in state["latent_scale"].items()}
    try:
        atomic_save(ckpt, path, what=f"the checkpoint of step {step}")
    except WriteError as e:
        raise CheckpointWriteError(e.errno, e.strerror) from e.__cause__


def restore_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into the live ``state`` (strict keys) and return it.

    Raises:
        CheckpointError: unreadable, unsafe, malformed, for another model, or holding a tensor
            of the wrong dtype or with NaN/inf values (naming the file and the entry).
    """
    ckpt = safe_load(path)
    validate_training_checkpoint(ckpt, path, state["generators"], state["iterators"])
    params = [p for group in state["optimizer"].param_groups for p in group["params"]]
    check_training_tensors(ckpt, state["model"], path, params)
    try:
        state["model"].load_state_dict(ckpt["model"], strict=True)
        state["ema"].load_state_dict(ckpt["ema"])
        load_optimizer_state(state["optimizer"], ckpt["optimizer"])
        match_optimizer_state_layout(state["optimizer"])  # channels_last switched on resume
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: does not match the model of this config: "
                              f"{first_line}") from e
    try:
        set_rng_state(ckpt["rng"], state["generators"])
        for name, it in state["iterators"].items():
            it.load_state_dict(ckpt["data"][name])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unusable RNG state or data position: {e}") from e
    sampler = state.get("importance_sampler")
    if sampler is not None:
        if "importance_sampler" in ckpt:
            try:
                sampler.load_state_dict(ckpt["importance_sampler"])
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from e
        else:
            log.warning("%s holds no importance-sampler history (a run without "
                        "training.vlb_importance_sampling): the steps are drawn uniformly until "
                        "every step has its history again", path)
    _restore_grad_scaler(ckpt, state.get("grad_scaler"), path)
    state["step"] = int(ckpt["step"])
    return state


def _restore_grad_scaler(ckpt: dict, scaler, path) -> None:
    """The fp16 loss scale of ``ckpt`` into ``scaler`` (a resumed fp16 run continues with the
    scale it had, as an uninterrupted run); a checkpoint without one (an fp32/bf16 run) starts
    the scaler at its initial scale and says so."""
    if scaler is None:
        return
    saved = ckpt.get("grad_scaler")
    if saved is None:
        log.warning("%s holds no fp16 loss scale (a run in another training.precision): the "
                    "gradient scaler starts at its initial scale %g", path, scaler.get_scale())
        return
    if not isinstance(saved, dict) or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in saved.values()):
        raise CheckpointError(f"{path}: the 'grad_scaler' entry is not a dict of finite numbers: "
                              f"{saved!r}")
    try:
        scaler.load_state_dict(saved)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unusable 'grad_scaler' state: {e}") from e


def resume_checkpoint(workdir: str | os.PathLike) -> Path | None:
    """The checkpoint a training run resumes from: the preemption checkpoint, written after the
    outputs of its step (numbered snapshot, sample grid), so it marks that step done; ``None``
    when there is none (a numbered snapshot newer than it belongs to a step to redo)."""
    path = meta_path(workdir)
    return path if path.is_file() else None


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
    steps = [_recorded_step(p) for p in candidates]
    return candidates[steps.index(max(steps))]


def _recorded_step(path: Path) -> int:
    ckpt = safe_load(path)
    step = ckpt.get("step") if isinstance(ckpt, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: not a training checkpoint of this toolkit (no valid "
                              "'step')")
    return step
