"""Checkpoints: reading the reference's training checkpoints safely, and our inference format.

Reference checkpoints (yang-song/score_sde_pytorch ``utils.save_checkpoint``) are
``torch.save({'optimizer', 'model', 'ema', 'step'})`` pickles; ``model`` carries the ``module.``
prefix of ``DataParallel`` and ``ema`` is ``{'decay', 'num_updates', 'shadow_params'}`` with the
shadow list in ``model.parameters()`` order, trainable parameters only. They are read with
``torch.load(weights_only=True)``, allowing beyond tensors and containers only the numpy scalar
the reference's optimiser stores as its learning rate; anything else (e.g. a pickle that would
call ``os.system``) is refused before it can run.

Our own format is a directory written atomically, file by file::

    config.json          {"format", "config" (the model's config dict), "weights", "ema", "sha256"}
    model.safetensors    model.state_dict() (raw weights)
    ema.safetensors      model.state_dict() with each trainable parameter replaced by its EMA

No pickle is involved in reading it.

Every path that loads tensors into a model (this module, ``models.convert``, the training
resume and ``--mode sample``) checks them with :func:`check_tensors`: shapes, dtypes against
the model's (see :data:`FLOAT_DTYPES`) and finiteness of floating tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import safetensors
import safetensors.torch
import torch
from torch import nn

from models.ema import ExponentialMovingAverage, trainable_parameter_names
from models.utils import create_model, strip_module_prefix
from score_sde.utils import atomic_write_bytes

FORMAT = "score-sde-toolkit/inference-v1"
CONFIG_FILE = "config.json"
WEIGHT_FILES = {"raw": "model.safetensors", "ema": "ema.safetensors"}
REFERENCE_KEYS = ("optimizer", "model", "ema", "step")
_MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: truncated, wrong layout or wrong architecture."""


class UnsafeCheckpointError(CheckpointError):
    """A file refused unread: its pickle asks for something other than tensors, containers and
    allowlisted scalars, or its zip records are compressed (possible zip bomb)."""


# -- safe reading ------------------------------------------------------------------------------


def _numpy_allowlist() -> list:
    """The numpy globals a reference checkpoint needs: its Adam ``lr`` is a ``numpy.float64``.

    Pickles name the scalar constructor ``numpy._core.multiarray.scalar`` (numpy 2) or
    ``numpy.core.multiarray.scalar`` (numpy 1); both names map to the installed function.
    """
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    allow: list = [
        np.dtype,
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
    ]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25
    if dtypes is not None:
        allow.append(dtypes.Float64DType)
    return allow


def _check_zip_entries(path: Path) -> None:
    """Refuse a zip whose records are compressed: ``torch.save`` stores them uncompressed, and
    inflating a crafted record (a zip bomb) would allocate memory before any size check."""
    try:
        with zipfile.ZipFile(path) as archive:
            compressed = [i.filename for i in archive.infolist()
                          if i.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as e:  # bad version
        raise CheckpointError(
            f"{path}: cannot read checkpoint (truncated or damaged zip): {e}"
        ) from e
    if compressed:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: {len(compressed)} compressed zip record(s) "
            f"({_listed(compressed)}); torch.save writes uncompressed records only"
        )


def _unpickling_reason(error: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, from its message: a global or an opcode."""
    text = str(error)
    match = re.search(r"GLOBAL (\S+)", text)
    if match:
        return (
            f"the global {match.group(1)!r}, which is not a tensor, a container or an "
            "allowlisted numpy scalar"
        )
    match = re.search(r"Unsupported operand (\d+)", text)
    opcode = f" (opcode {int(match.group(1))})" if match else ""
    return (
        f"an unsupported pickle instruction{opcode}: not a torch.save file, or one that "
        "needs full unpickling"
    )


def safe_load(path: str | os.PathLike, allow: Sequence[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with the minimal numpy allowlist.

    Zip checkpoints (what ``torch.save`` writes) must have uncompressed records; a plain pickle
    (the legacy format) goes through the same weights-only unpickler.

    Args:
        path: the checkpoint file.
        allow: further classes the unpickler may rebuild as plain attribute bags (e.g.
            ``argparse.Namespace`` in DiT's training checkpoints); nothing else is called.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the pickle references a global outside the allowlist or an opcode
            the weights-only unpickler does not run (nothing is called).
        CheckpointError: the file is truncated, compressed or not a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if zipfile.is_zipfile(path):
        _check_zip_entries(path)
    try:
        with torch.serialization.safe_globals([*_numpy_allowlist(), *allow]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: its pickle asks for {_unpickling_reason(e)}. "
            "Weights-only loading never runs such code; only load this file with full "
            "unpickling if you trust its source."
        ) from None
    except Exception as e:  # anything the unpickler or the zip reader raises on a bad file
        first_line = str(e).splitlines()[0] if str(e) else "unexpected end of file"
        raise CheckpointError(
            f"{path}: cannot read checkpoint (truncated or not a torch.save file): "
            f"{type(e).__name__}: {first_line}"
        ) from e


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


#: Stored floating dtypes a floating model tensor may be loaded from (``load_state_dict`` casts
#: them): half-precision exports and float64 runs are routine. Integer, bool and complex tensors
#: never load into a floating one, and a non-floating model tensor (an integer buffer such as
#: ``num_batches_tracked``) needs its exact dtype.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_problem(name: str, value: torch.Tensor, expected: torch.Tensor | None) -> str | None:
    """Why ``value`` cannot be loaded as ``name`` (into ``expected``, if given), or None.

    Dtype: see :data:`FLOAT_DTYPES`. Finiteness: floating values must be finite, and stay
    finite in the model's dtype (a float64 1e300 is inf in float32).
    """
    target = expected.dtype if expected is not None else value.dtype
    if expected is not None and value.dtype != target:
        allowed = ", ".join(_dtype_name(d) for d in FLOAT_DTYPES) if target.is_floating_point \
            else _dtype_name(target)
        if not (target.is_floating_point and value.dtype in FLOAT_DTYPES):
            return (f"{name} is {_dtype_name(value.dtype)}, the model's is "
                    f"{_dtype_name(target)} (allowed: {allowed})")
    if not value.is_floating_point():
        return None
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        count = int((~finite).sum())
        return f"{name} has NaN or inf values ({count} of {value.numel()})"
    if target != value.dtype and target.is_floating_point and \
            torch.finfo(value.dtype).max > torch.finfo(target).max and \
            not bool(torch.isfinite(value.to(target)).all()):
        return (f"{name} has {_dtype_name(value.dtype)} values beyond the range of the model's "
                f"{_dtype_name(target)}")
    return None


def check_tensors(
    found: Mapping[str, Any],
    source: str | os.PathLike = "",
    expected: Mapping[str, torch.Tensor] | None = None,
    *,
    what: str = "model",
    strict: bool = True,
    owner: str = "model",
) -> None:
    """The one check of loaded tensors, used by every load path: names, shapes, dtypes, finiteness.

    Each entry of ``found`` with a counterpart in ``expected`` must be a tensor of its shape and
    a dtype it may be loaded as: the same, or for a floating counterpart any of
    :data:`FLOAT_DTYPES`. Every floating tensor must be finite (also after the cast to its
    counterpart's dtype). Entries without a counterpart (e.g. optimizer step counters) are only
    checked for finiteness, and only if floating; integer and bool tensors carry no NaN.

    Args:
        found: the loaded tensors by name.
        source: the file they came from, named first in the error.
        expected: the live tensors by name (e.g. ``model.state_dict()``, or tensors on the
            ``meta`` device); None checks finiteness only.
        what: the checkpoint entry ``found`` is (``'model'``, ``'ema'``, ``'optimizer'``); bad
            tensors are named ``<what>.<name>``.
        strict: ``found`` must have exactly ``expected``'s names; else only the names present
            in both are compared.
        owner: what ``expected`` belongs to (the model's class name), for the message.
    Raises:
        CheckpointError: naming ``source`` and listing the missing, unexpected, non-tensor,
            shape-mismatched, wrong-dtype and non-finite entries.
    """
    expected = expected if expected is not None else {}
    strict = strict and bool(expected)
    missing = [k for k in expected if k not in found] if strict else []
    unexpected = [k for k in found if k not in expected] if strict else []
    not_tensor, mismatched, bad = [], [], []
    for k, v in found.items():
        live = expected.get(k)
        if not isinstance(v, torch.Tensor):
            if live is not None or strict:
                not_tensor.append(k)
        elif live is not None and v.shape != live.shape:
            mismatched.append(f"{k} {tuple(v.shape)} vs model {tuple(live.shape)}")
        elif (problem := _tensor_problem(f"{what}.{k}", v, live)) is not None:
            bad.append(problem)
    layout = [
        f"{label} ({len(keys)}): {_listed(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("non-tensor values", not_tensor),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    where = source or "state dict"
    if layout:
        raise CheckpointError(
            f"{where}: {what} does not fit {owner} (wrong architecture or config?): "
            + "; ".join(layout)
        )
    if bad:
        raise CheckpointError(f"{where}: refused to load {len(bad)} bad tensor(s): {_listed(bad)}")


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any], source: str = "") -> None:
    """Strict check of ``state_dict`` against ``model.state_dict()`` by :func:`check_tensors`:
    keys, shapes, dtypes and finiteness.

    Raises:
        CheckpointError: naming ``source`` and listing the missing, unexpected, non-tensor,
            shape-mismatched, wrong-dtype and non-finite keys.
    """
    check_tensors(state_dict, source, model.state_dict(), what="model",
                  owner=type(model).__name__)


def load_model_state(
    model: nn.Module, state_dict: Mapping[str, Any], source: str | os.PathLike = ""
) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly, after stripping a ``module.`` prefix.

    Args:
        model: the built network.
        state_dict: parameter and buffer tensors by name.
        source: the file the state came from, for error messages.
    Returns:
        ``model``.
    Raises:
        CheckpointError: listing missing, unexpected and shape-mismatched keys.
    """
    state = strip_module_prefix(state_dict)
    check_state_dict(model, state, str(source))
    model.load_state_dict(state, strict=True)
    return model


def name_ema_shadow_params(
    model: nn.Module, ema_state: Mapping[str, Any], source: str | os.PathLike = ""
) -> dict[str, torch.Tensor]:
    """Map a reference ``ema['shadow_params']`` list to ``model``'s trainable parameter names.

    The list follows ``model.parameters()`` and skips non-trainable parameters (e.g. the
    Gaussian-Fourier ``W``); count, then shapes, dtypes and finiteness name by name
    (:func:`check_tensors`).

    Raises:
        CheckpointError: naming ``source`` and the mismatching or bad parameters.
    """
    shadows = ema_state.get("shadow_params") if isinstance(ema_state, Mapping) else None
    if not isinstance(shadows, (list, tuple)):
        raise CheckpointError(f"{source}: ema entry has no 'shadow_params' list")
    names = trainable_parameter_names(model)
    if len(shadows) != len(names):
        raise CheckpointError(
            f"{source}: ema has {len(shadows)} shadow parameters, {type(model).__name__} has "
            f"{len(names)} trainable parameters (wrong architecture or config?)"
        )
    params = dict(model.named_parameters())
    named = dict(zip(names, shadows))
    check_tensors(named, source, {n: params[n] for n in names}, what="ema",
                  owner=type(model).__name__)
    return named


def load_reference_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    ema: ExponentialMovingAverage | None = None,
) -> dict[str, Any]:
    """Read a reference training checkpoint ``{'optimizer', 'model', 'ema', 'step'}`` safely.

    Args:
        path: the ``.pth`` file (e.g. ``checkpoints/checkpoint_26.pth`` of a reference run).
        model: if given, its weights are loaded strictly from the checkpoint's ``model``.
        ema: if given (built on ``model``'s parameters), its state is loaded from the
            checkpoint's ``ema``; ``ema.copy_to(model.parameters())`` then gives the weights
            the reference samples and evaluates with.
    Returns:
        ``{'model': state dict without the module. prefix, 'ema': {'decay', 'num_updates',
        'shadow_params'}, 'optimizer': dict or None, 'step': int or None}``.
    Raises:
        FileNotFoundError, UnsafeCheckpointError, CheckpointError (see :func:`safe_load`).
    """
    if ema is not None and model is None:
        raise ValueError("loading the EMA needs the model (to check it against its parameters)")
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or not {"model", "ema"} <= set(ckpt):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not a reference training checkpoint: expected a dict with keys "
            f"{', '.join(REFERENCE_KEYS)}; found {found}"
        )
    if not isinstance(ckpt["model"], Mapping):
        raise CheckpointError(f"{path}: 'model' is a {type(ckpt['model']).__name__}, not a dict")
    out = {
        "model": strip_module_prefix(ckpt["model"]),
        "ema": ckpt["ema"],
        "optimizer": ckpt.get("optimizer"),
        "step": ckpt.get("step"),
    }
    if model is not None:
        load_model_state(model, out["model"], source=path)
    if ema is not None:
        named = name_ema_shadow_params(model, out["ema"], source=path)
        try:
            ema.load_state_dict({**out["ema"], "shadow_params": list(named.values())})
        except ValueError as e:
            raise CheckpointError(f"{path}: ema entry: {e}") from e
    return out


# -- our inference format -------------------------------------------------------------------------


def _config_to_dict(config) -> dict:
    """A JSON-able dict of ``config``; ``device`` is dropped (chosen when loading)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d.pop("device", None)
    try:
        json.dumps(d)
    except TypeError as e:
        raise TypeError(f"config is not JSON-serialisable ({e}); use plain values") from None
    return d


def ema_state_dict(model: nn.Module, ema: ExponentialMovingAverage) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each trainable parameter replaced by its EMA average."""
    state = dict(model.state_dict())
    state.update(ema.named_shadow_params(model))
    return state


def save_inference(
    model: nn.Module,
    config,
    out_dir: str | os.PathLike,
    ema: ExponentialMovingAverage | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` (and its EMA weights) as safetensors plus ``config.json`` in ``out_dir``.

    Each file is written atomically; ``config.json`` is written last and records the sha256 of
    the weight files, so a directory with a config is complete and consistent.

    Args:
        model: the network; its ``state_dict()`` is stored as ``model.safetensors``.
        config: the ml_collections config the model was built from (``device`` is not stored).
        out_dir: created if missing.
        ema: if given, ``ema.safetensors`` holds the full state dict with the EMA weights.
        metadata: extra JSON-able information (e.g. source checkpoint, step).
    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    states = {"raw": dict(model.state_dict())}
    if ema is not None:
        states["ema"] = ema_state_dict(model, ema)
    sha256 = {}
    for kind, state in states.items():
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        data = safetensors.torch.save(tensors, metadata={"format": FORMAT, "weights": kind})
        atomic_write_bytes(out / WEIGHT_FILES[kind], data)
        sha256[WEIGHT_FILES[kind]] = hashlib.sha256(data).hexdigest()
    record = {
        "format": FORMAT,
        "config": _config_to_dict(config),
        "weights": {kind: WEIGHT_FILES[kind] for kind in states},
        "ema": ({"decay": ema.decay, "num_updates": ema.num_updates} if ema is not None else None),
        "sha256": sha256,
        "metadata": dict(metadata or {}),
    }
    atomic_write_bytes(out / CONFIG_FILE, (json.dumps(record, indent=1) + "\n").encode())
    for kind, name in WEIGHT_FILES.items():
        if kind not in states:  # a stale file of an earlier save, no longer described
            (out / name).unlink(missing_ok=True)
    return out


def read_inference_record(directory: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of an inference directory, checked for its format."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory} (not an inference directory)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} record")
    return record


def load_safetensors(path: str | os.PathLike, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on CPU (no pickle involved).

    Args:
        path: the ``.safetensors`` file.
        sha256: if given, the file's bytes must have this hex digest.
    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, not safetensors, or a different sha256.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read weights: {e}") from e
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(
            f"{path}: sha256 differs from the one recorded in {CONFIG_FILE} "
            "(file changed, truncated or from another save)"
        )
    try:
        return safetensors.torch.load(data)
    except safetensors.SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file: {e}") from e


def load_inference(
    directory: str | os.PathLike,
    weights: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, ml_collections.ConfigDict]:
    """Build the model saved by :func:`save_inference` and load its weights strictly.

    Args:
        directory: the inference directory.
        weights: ``'ema'`` or ``'raw'``; default the EMA weights when saved, else the raw ones.
        device: where the model is put (also stored as ``config.device``).
    Returns:
        ``(model in eval mode, config)``.
    Raises:
        FileNotFoundError, CheckpointError (corrupt file, hash or architecture mismatch, or a
        tensor of the wrong dtype or with NaN/inf values, see :func:`check_tensors`; the
        sha256 in ``config.json`` only detects damage, not bad weights saved as such).
    """
    directory = Path(directory)
    record = read_inference_record(directory)
    available = record.get("weights", {})
    if weights is None:
        weights = "ema" if "ema" in available else "raw"
    if weights not in available:
        raise ValueError(
            f"{directory}: no {weights!r} weights; available: {', '.join(sorted(available))}"
        )
    if available[weights] != WEIGHT_FILES.get(weights):
        # config.json names the file: never follow it out of the directory.
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: {weights!r} weights must be in "
            f"{WEIGHT_FILES.get(weights)!r}, got {available[weights]!r}"
        )
    path = directory / available[weights]
    state = load_safetensors(path, sha256=record.get("sha256", {}).get(available[weights]))
    config = ml_collections.ConfigDict(record["config"])
    config.device = str(device)
    model = create_model(config)
    load_model_state(model, state, source=path)
    return model.eval(), config
