"""Bits/dim of a dataset split for ``--mode eval``: the probability-flow ODE likelihood of
uniformly dequantised data (Song et al. 2021, App. D) or the variational bound of a discrete
DDPM model (Ho et al. 2020, eq. 5), per image, with the mean and its standard error.

``eval_bpd`` writes every image's value to an ``.npz`` and reads it back on a rerun with the same
settings (an evaluation interrupted later, while sampling, does not solve the ODEs again).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import likelihood
import sde_lib
from score_sde import datasets
from score_sde.evaluation.scorers import _write_npz
from score_sde.utils import InverseScaler, ScoreFn

#: what a class-conditional model's loss and bits/dim records say of their labels
DATA_LABELS = "the data's own labels: conditional loss and bits/dim, -log2 p(x | y) / D"


def dequantized_bits_per_dim(sde: sde_lib.SDE, score_fn: ScoreFn, x: torch.Tensor,
                             inverse_scaler: InverseScaler, levels: int | None,
                             **options) -> tuple[torch.Tensor, dict]:
    """Bits/dim (B,) of images x (B, C, H, W) in [0, 1] on a grid of ``levels`` intensity levels,
    an upper bound through uniform dequantisation (Song et al. 2021, App. D); ``levels=None``:
    -log2 p(x) / D of continuous data. Returns bpd and the likelihood info (``nfe``, ``z`` ...).

    ``likelihood.bits_per_dim`` dequantises n-bit data as (k + u) / 2^n; data with L levels
    (17 for the digits) is dequantised as (k + u) / L instead by handing it n = ceil(log2 L) bits
    and an inverse scaler stretched by 2^n / L: the model sees the same y = a (k + u) / L + c, and
    the Jacobian term log(a 2^n / L) turns bits_per_dim's + n into the right + log2 L.
    """
    if levels is None:
        nats, info = likelihood.nats_per_dim(sde, score_fn, x, inverse_scaler, **options)
        return nats / math.log(2), info
    n_bits = max(1, math.ceil(math.log2(levels)))
    stretch = levels / 2**n_bits
    k = torch.round(x * (levels - 1)).long()
    bpd, info = likelihood.bits_per_dim(sde, score_fn, k, lambda y: inverse_scaler(y) * stretch,
                                        n_bits=n_bits, **options)
    return bpd, info


def eval_bpd(config, score_fn: ScoreFn, sde: sde_lib.SDE, out: Path, progress: bool, *,
             class_score_fn: Callable[[torch.Tensor], ScoreFn] | None = None) -> dict:
    """Bits/dim of every image of ``eval.bpd_dataset`` (Song et al. 2021, App. D; or the
    variational bound with ``eval.bpd_method = 'vlb'``, ``likelihood.vlb_bits_per_dim``):
    per-image values in ``out`` (.npz), mean and standard error; batch b's dequantisation noise
    and probes (or the bound's draws) come from seed ``config.seed + b``. An ``out`` written
    with the same settings (a run interrupted later, while sampling) is read instead of solved
    again.

    ``class_score_fn(y)`` (a class-conditional model) gives the score of p_t(x | y) for a
    batch's own labels y (B,); the bits/dim are then the conditional ones, and the summary
    says so under ``class_labels``."""
    split = config.eval.bpd_dataset
    data = datasets.get_dataset(config, split)
    vlb = config.eval.get("bpd_method", "ode") == "vlb"  # the bound of a discrete DDPM model
    if vlb:
        options = {"bpd_method": "vlb", "vlb_spacing": config.eval.get("vlb_spacing")}
    else:
        options = {k: config.eval[k] for k in ("rtol", "atol") if k in config.eval}
    conditional = class_score_fn is not None
    settings = {"split": split, "batch_size": config.eval.batch_size, "n": len(data),
                "seed": config.seed, "levels": data.levels, **options}
    if conditional:  # absent otherwise: an unconditional run's cache stays valid
        settings["class_labels"] = True
    settings = json.dumps(settings, sort_keys=True)
    if out.is_file():
        with np.load(out, allow_pickle=False) as saved:
            if str(saved["settings"]) == settings:
                return _bpd_summary(saved["bpd"], int(saved["nfe"]), split, data, out, options,
                                    conditional)
    iterator = datasets.DataIterator(data, config.eval.batch_size, shuffle=False,
                                     device=config.device, with_labels=conditional)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    values, nfe = [], 0
    for b, x in enumerate(tqdm(iterator, total=iterator.batches_per_epoch, disable=not progress,
                               desc=f"bits/dim ({split})")):
        generator = torch.Generator(device=config.device).manual_seed(config.seed + b)
        batch_score_fn = score_fn
        if conditional:
            x, labels = x
            batch_score_fn = class_score_fn(labels)
        if vlb:
            bpd, info = likelihood.vlb_bits_per_dim(sde, batch_score_fn, x, inverse_scaler,
                                                    levels=data.levels, generator=generator,
                                                    spacing=options["vlb_spacing"])
        else:
            bpd, info = dequantized_bits_per_dim(sde, batch_score_fn, x, inverse_scaler,
                                                 data.levels, generator=generator, **options)
        values.append(bpd.detach().double().cpu())
        nfe += info["nfe"]
    bpd = torch.cat(values).numpy()
    _write_npz(out, bpd=bpd, labels=data.labels.numpy(), nfe=np.int64(nfe),
               settings=np.asarray(settings))
    return _bpd_summary(bpd, nfe, split, data, out, options, conditional)


def _bpd_summary(bpd: np.ndarray, nfe: int, split: str, data, out: Path, options,
                 conditional: bool = False) -> dict:
    stderr = float(bpd.std(ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    summary = {"mean": float(bpd.mean()), "stderr": stderr, "num_images": len(bpd),
               "split": split, "levels": data.levels, "nfe": nfe, "per_image": str(out),
               **options}
    if conditional:
        summary["class_labels"] = DATA_LABELS
    return summary


__all__ = ["DATA_LABELS", "dequantized_bits_per_dim", "eval_bpd"]
