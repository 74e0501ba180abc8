"""Reproducible evaluation: per-sample-seeded, resumable sampling and JSON evaluation records.

Sample k of an evaluation run is drawn with seed ``base_seed + k`` (``samplers.sample(...,
seeds=...)``), so it does not depend on the batch it falls in or on interruptions: a run of
``num_samples`` is the seed range ``[base_seed, base_seed + num_samples)``. With a ``sample_dir``
every finished batch is written atomically as ``samples_<b>.npz`` (samples, seeds, NFE and the
sampler configuration); a restarted run loads the batches it finds and draws only the rest.

Each score is saved as a JSON record beside the fixed facts needed to reproduce it::

    {"format": "score-sde-toolkit/eval-record-v1", "created": "...", "versions": {...},
     "checkpoint": ..., "metrics": {"fid": 3.1, ...}, "num_samples": 50000,
     "seeds": {"base": 0, "first": 0, "last": 49999, "rule": "sample k uses seed base + k"},
     "sampler": {"method": "pc", "options": {... every option, defaults filled in ...},
                 "shape_per_sample": [3, 32, 32], "batch_size": 500},
     "nfe": 2000, "nfe_per_batch": [...], ...}

written with a temporary file, fsync and ``os.replace``, so a record on disk is always whole.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import io
import json
import math
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import samplers
import sde_lib
from score_sde.utils import ScoreFn, __version__
from score_sde.utils.io import atomic_write_bytes

RECORD_FORMAT = "score-sde-toolkit/eval-record-v1"
SEED_RULE = "sample k uses seed base + k"
#: sampler options whose ``None`` is resolved at run time and reported by the sampler
RUN_TIME_OPTIONS = ("N", "step_rule", "variance")


# -- JSON helpers ------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """A JSON-ready copy of ``value``: numpy / torch scalars to numbers, arrays and tensors to
    lists, paths, dtypes and devices to strings, classes and functions to their qualified names,
    non-finite floats to ``None``."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    if inspect.isclass(value) or inspect.isfunction(value):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as indented JSON to ``path`` atomically; returns the path."""
    path = Path(path)
    text = json.dumps(to_jsonable(record), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


def read_record(path: str | os.PathLike) -> dict:
    """Read a record written by :func:`write_record`, checking its format tag."""
    record = json.loads(Path(path).read_text())
    if record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path}: not an evaluation record (format {record.get('format')!r}, "
                         f"expected {RECORD_FORMAT!r})")
    return record


# -- sampler configuration ---------------------------------------------------------------------


def seed_range(base_seed: int, num_samples: int) -> dict:
    """The record's description of the seeds of ``num_samples`` samples from ``base_seed``."""
    return {"base": int(base_seed), "first": int(base_seed),
            "last": int(base_seed) + int(num_samples) - 1, "rule": SEED_RULE}


def file_checkpoint_id(path: str | os.PathLike) -> dict:
    """A checkpoint's identity for a record: its path, size and sha256."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def evaluation_record(
    *,
    metrics: Mapping[str, Any],
    sampling: Mapping[str, Any] | None = None,
    checkpoint: Any = None,
    num_samples: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Assemble a record: ``metrics`` with the sampling facts of :func:`sample_for_eval`'s info
    (number of samples, seed range, full sampler configuration, NFE), the checkpoint id and
    versions. ``num_samples`` is needed only without ``sampling`` (e.g. a dataset evaluation)."""
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"toolkit": __version__, "torch": torch.__version__},
        "checkpoint": checkpoint,
        "metrics": dict(metrics),
    }
    if sampling is not None:
        record.update({k: sampling[k] for k in ("num_samples", "seeds", "sampler", "nfe",
                                                 "nfe_per_batch", "nfe_total")})
    elif num_samples is not None:
        record["num_samples"] = int(num_samples)
    if extra:
        record.update(extra)
    return to_jsonable(record)


# -- resumable, per-sample-seeded sampling ------------------------------------------------------


def _batch_file(sample_dir: Path, index: int) -> Path:
    return sample_dir / f"samples_{index:05d}.npz"


def _save_batch(path: Path, samples: torch.Tensor, seeds: Sequence[int], report: dict,
                config_json: str) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, samples=samples.detach().cpu().numpy(), seeds=np.asarray(seeds, np.int64),
             report=np.asarray(json.dumps(to_jsonable(report))), config=np.asarray(config_json))
    atomic_write_bytes(path, buffer.getvalue())


def _load_batch(path: Path, seeds: Sequence[int], config_json: str) -> tuple[torch.Tensor, dict]:
    try:
        with np.load(path, allow_pickle=False) as data:
            samples, stored_seeds = data["samples"], data["seeds"]
            report, config = json.loads(str(data["report"])), str(data["config"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: unreadable sample batch ({type(e).__name__}: {e}); delete it "
                         "to draw this batch again") from e
    if config != config_json:
        ours, theirs = json.loads(config_json), json.loads(config)
        diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        raise ValueError(f"{path} was drawn with a different configuration (differs in: "
                         f"{', '.join(diff)}); use another sample_dir or delete its batches")
    if stored_seeds.tolist() != list(seeds):
        raise ValueError(f"{path}: holds seeds {stored_seeds[0]}..{stored_seeds[-1]}, expected "
                         f"{seeds[0]}..{seeds[-1]}")
    return torch.from_numpy(samples), report


def sample_for_eval(
    sde: sde_lib.SDE,
    score_fn: ScoreFn,
    shape_per_sample: Sequence[int],
    num_samples: int,
    batch_size: int,
    base_seed: int,
    method: str,
    *,
    sample_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    on_batch: Callable[[torch.Tensor], None] | None = None,
    keep_samples: bool = True,
    batch_score_fn: Callable[[int, int], ScoreFn] | None = None,
    conditioning: Mapping[str, Any] | None = None,
    **options: Any,
) -> tuple[torch.Tensor | None, dict]:
    """Draw ``num_samples`` samples for evaluation in batches, sample k with seed
    ``base_seed + k`` (``samplers.sample(..., seeds=...)``), resuming from ``sample_dir``.

    Args:
        sde, score_fn, method, **options: as for :func:`samplers.sample`.
        shape_per_sample: D of one sample, e.g. (3, 32, 32).
        num_samples: N, the total number of samples.
        batch_size: samples per ``samplers.sample`` call (the last batch may be smaller).
        base_seed: seed of sample 0.
        sample_dir: if given, batch b is saved as ``samples_<b:05d>.npz`` once drawn, and batches
            already there are loaded instead of drawn (after checking that their seeds and
            sampler configuration match this call).
        device, dtype: where x_T is drawn (see :func:`samplers.sample`).
        progress: a progress bar per batch.
        on_batch: called with each batch (B, *D) on the CPU, in order, drawn or loaded; with
            ``keep_samples=False`` this streams 50 000 samples into a feature extractor without
            holding them all.
        keep_samples: return the samples (else ``None``).
        batch_score_fn: ``batch_score_fn(start, stop)`` gives the score function of samples
            start..stop-1 instead of ``score_fn`` (a class-conditional model: their classes
            bound, guidance applied).
        conditioning: what ``batch_score_fn`` conditions on (classes, guidance), recorded under
            ``sampler['conditioning']`` and checked on resume like the sampler configuration.
    Returns:
        samples (N, *D) on the CPU (or ``None``), and an info dict with ``num_samples``,
        ``seeds`` (the seed range), ``sampler`` (method, every option, shape, batch size, dtype,
        device), ``nfe`` (score evaluations per batch: an int when all batches agree, else their
        mean), ``nfe_per_batch``, ``nfe_total``, ``reports`` and ``resumed_batches``.
    """
    shape = tuple(int(s) for s in shape_per_sample)
    if not shape or min(shape) < 1:
        raise ValueError(f"shape_per_sample must be positive sizes, got {tuple(shape_per_sample)}")
    for name, value, low in (("num_samples", num_samples, 1), ("batch_size", batch_size, 1),
                             ("base_seed", base_seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    sampler = {
        "method": method, "options": samplers.resolved_options(method, options),
        "shape_per_sample": list(shape), "batch_size": batch_size,
        "dtype": str(dtype or torch.get_default_dtype()),
        # per-sample generators live on this device; CPU and CUDA streams differ
        "device": str(torch.device(device) if device is not None else torch.device("cpu")),
    }
    if conditioning is not None:
        sampler["conditioning"] = dict(conditioning)
    config_json = json.dumps(to_jsonable({**sampler, "base_seed": base_seed}), sort_keys=True)
    directory = Path(sample_dir) if sample_dir is not None else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)

    batches, nfe_per_batch, reports, resumed = [], [], [], 0
    for b, start in enumerate(range(0, num_samples, batch_size)):
        seeds = list(range(base_seed + start, base_seed + min(start + batch_size, num_samples)))
        path = _batch_file(directory, b) if directory is not None else None
        if path is not None and path.exists():
            x, report = _load_batch(path, seeds, config_json)
            resumed += 1
        else:
            fn = score_fn if batch_score_fn is None else batch_score_fn(start, start + len(seeds))
            x, report = samplers.sample(sde, fn, (len(seeds), *shape), method, seeds=seeds,
                                        device=device, dtype=dtype, progress=progress, **options)
            x = x.detach().cpu()
            if path is not None:
                _save_batch(path, x, seeds, report, config_json)
        if on_batch is not None:
            on_batch(x)
        if keep_samples:
            batches.append(x)
        nfe_per_batch.append(int(report["nfe"]))
        reports.append(to_jsonable(report))
    nfe = nfe_per_batch[0] if len(set(nfe_per_batch)) == 1 else float(np.mean(nfe_per_batch))
    # options the sampler chooses at run time (PC's N from the SDE and its per-sample step rule,
    # ddpm's variance) are recorded as they ran, from the first batch's report
    sampler["options"] = {**sampler["options"], **{
        name: reports[0][name] for name in RUN_TIME_OPTIONS
        if sampler["options"].get(name, 0) is None and name in reports[0]}}
    info = {
        "num_samples": num_samples, "seeds": seed_range(base_seed, num_samples),
        "sampler": to_jsonable(sampler), "nfe": nfe, "nfe_per_batch": nfe_per_batch,
        "nfe_total": int(sum(nfe_per_batch)), "reports": reports, "resumed_batches": resumed,
    }
    return (torch.cat(batches) if keep_samples else None), info
