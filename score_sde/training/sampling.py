"""Drawing samples from a trained model with the sampler named by ``config.sampling``.

The reference's keys map onto :func:`samplers.sample` options: ``method`` is the registered
sampler name (``pc``, ``ode``, ``dpm_solver++_2m`` ...); every other option a sampler accepts
is read from ``config.sampling`` under its own name or the reference's alias
(``n_steps_each`` -> ``n_steps``, ``noise_removal`` -> ``denoise``), so a new sampler option
needs no code here, only a config key.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

import samplers
import sde_lib
from models.ema import ExponentialMovingAverage
from models.utils import get_score_fn

#: sampler option -> the reference's config.sampling key
ALIASES = {"n_steps": "n_steps_each", "denoise": "noise_removal"}
#: final sampling time per SDE (the reference's ``sampling_eps``); 1e-3 for the others
SAMPLING_EPS = {"vesde": 1e-5}
_SDE_ARGS = {"beta_min": "beta_min", "beta_max": "beta_max", "sigma_min": "sigma_min",
             "sigma_max": "sigma_max", "N": "num_scales", "schedule": "beta_schedule",
             "beta_start": "beta_start", "beta_end": "beta_end"}


def get_sde(config) -> sde_lib.SDE:
    """The SDE ``config.training.sde`` with its constants from ``config.model`` (beta_min,
    beta_max, sigma_min, sigma_max, num_scales -> N, as the reference's ``run_lib``; for
    ``discrete_vpsde`` beta_schedule -> schedule, beta_start, beta_end)."""
    cls = sde_lib.SDES.get(config.training.sde)
    accepted = inspect.signature(cls).parameters
    kwargs = {arg: config.model[key] for arg, key in _SDE_ARGS.items()
              if arg in accepted and key in config.model}
    return cls(**kwargs)


def sampling_eps(config) -> float:
    """The last time of the reverse process (1e-5 for VE, 1e-3 otherwise, as the reference;
    for ``discrete_vpsde`` the time 1/N of the table's first step, index 0)."""
    if config.training.sde == "discrete_vpsde":
        return 1.0 / get_sde(config).N
    return SAMPLING_EPS.get(config.training.sde, 1e-3)


def config_key(method: str, option: str) -> str:
    """The ``config.sampling`` key of ``option`` of sampler ``method``: the sampler's own
    ``config_keys`` entry, else the reference's alias, else the option's name."""
    keys = samplers.SAMPLERS.get(method).config_keys
    return keys.get(option, ALIASES.get(option, option))


def sampling_options(config) -> tuple[str, dict[str, Any]]:
    """``(method, options)`` for :func:`samplers.sample` from ``config.sampling``: each option
    the method accepts, from its key (or the reference's alias) where that is not ``None``."""
    method = config.sampling.method
    accepted = samplers.option_defaults(method)
    options = {}
    for name in sorted(accepted):
        key = config_key(method, name)
        if key != "method" and config.sampling.get(key) is not None:
            options[name] = config.sampling[key]
    if "eps" in accepted and "eps" not in options:
        options["eps"] = sampling_eps(config)
    return method, options


def sampling_record(config, info: dict) -> dict[str, Any]:
    """What a sampling run did, for its record: the method, every option as it ran (given or the
    sampler's default), the counted NFE from the sampler's report ``info``, and the
    ``config.sampling`` keys set for a method that does not read them (``not_applied``)."""
    method, options = sampling_options(config)
    resolved = samplers.resolved_options(method, options)
    if "N" in resolved and resolved["N"] is None:  # PC's default: the SDE's number of steps
        resolved["N"] = get_sde(config).N
    for name in ("step_rule",):  # chosen at run time (PC: 'batch', or 'sample' with seeds)
        if name in resolved and resolved[name] is None and name in info:
            resolved[name] = info[name]
    read = {config_key(method, name) for name in resolved} | {"method"}
    return {
        "method": method,
        "options": resolved,
        "nfe": info["nfe"],
        "not_applied": {k: v for k, v in sorted(config.sampling.items())
                        if k not in read and v is not None},
    }


@contextlib.contextmanager
def ema_weights(model: nn.Module, ema: ExponentialMovingAverage) -> Iterator[nn.Module]:
    """Temporarily swap the EMA averages into ``model`` (the reference samples with them)."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())


@torch.no_grad()
def generate(
    config,
    sde: sde_lib.SDE,
    model: nn.Module,
    shape: tuple[int, ...],
    *,
    inverse_scaler,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Samples (B, *D) in data space (images in [0, 1]) from ``model`` in eval mode.

    Args:
        config: reads ``sampling.*`` and ``training.continuous``.
        sde: the SDE the model was trained with.
        model: the network (swap EMA weights in with :func:`ema_weights` first).
        shape: (B, *D) of the samples.
        inverse_scaler: model space -> data space (``datasets.get_data_inverse_scaler``).
        generator: the random source of the sampler.
        progress: tqdm bar over the sampler steps.
    Returns:
        samples and the sampler's report (``nfe`` ...).
    """
    method, options = sampling_options(config)
    score_fn = get_score_fn(sde, model, train=False, continuous=config.training.continuous)
    device = next(model.parameters()).device
    x, info = samplers.sample(sde, score_fn, shape, method, generator=generator,
                              progress=progress, device=device, **options)
    return inverse_scaler(x), info
