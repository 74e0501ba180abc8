"""Drawing samples from a trained model with the sampler named by ``config.sampling``.

The reference's keys map onto :func:`samplers.sample` options: ``method`` is the registered
sampler name (``pc``, ``ode``, ``dpm_solver++_2m`` ...); every other option a sampler accepts
is read from ``config.sampling`` under its own name or the reference's alias
(``n_steps_each`` -> ``n_steps``, ``noise_removal`` -> ``denoise``), so a new sampler option
needs no code here, only a config key.

A class-conditional model (``model.num_classes = K > 0``) samples class ``classes[i mod n]`` for
sample i (``training.classes``) and, with ``sampling.cfg_scale = s``, classifier-free guidance
in one batched network call per score evaluation (:func:`sampling_score_fn`).
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
from configs.sampling import ACCELERATION_KEYS, CLASS_KEYS
from models.conditioning import read_num_classes
from models.ema import ExponentialMovingAverage
from models.utils import get_score_fn
from score_sde.training import acceleration
from score_sde.training.classes import guidance_weight, sample_class_labels, sample_classes
from score_sde.utils import ScoreFn
from score_sde.utils.precision import precision_scope

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
    # chosen at run time (PC: 'batch', or 'sample' with seeds; ddpm: learned if the model has v)
    for name in ("step_rule", "variance"):
        if name in resolved and resolved[name] is None and name in info:
            resolved[name] = info[name]
    precision = acceleration.sampling_precision(config)
    record = {
        "method": method,
        "options": resolved,
        "nfe": info["nfe"],
        "precision": acceleration.precision_record(
            precision, "config.sampling.precision",
            "float32 solver state (or the input's dtype if wider)"),
        "compile": bool(config.sampling.get("compile", False)),
        "not_applied": not_applied(config, method),
    }
    if read_num_classes(config):
        record.update(class_record(config, info))
    return record


def not_applied(config, method: str | None = None) -> dict[str, Any]:
    """The ``config.sampling`` keys set (not ``None``) that sampler ``method`` (default:
    ``config.sampling.method``) does not read: every config carries every sampler's keys, so a
    record lists these as not applied rather than refusing them."""
    method = config.sampling.method if method is None else method
    read = ({config_key(method, name) for name in samplers.option_defaults(method)}
            | {"method", *CLASS_KEYS, *ACCELERATION_KEYS})
    return {k: v for k, v in sorted(config.sampling.items()) if k not in read and v is not None}


def class_record(config, info: dict) -> dict[str, Any]:
    """The class and guidance entries of a class-conditional run's record: ``classes`` (the
    classes cycled, and the rule) and ``guidance`` (DiT's s = ``cfg_scale`` and w = s - 1 both,
    the convention, and the sampler report's guidance: batched, NFE per call, channels)."""
    scale = config.sampling.get("cfg_scale")
    guidance: dict[str, Any] = {
        "cfg_scale": scale, "w": guidance_weight(config),
        "convention": "DiT's s: eps_u + s (eps_c - eps_u) = (1 + w) score_c - w score_u with "
                      "w = s - 1",
        "cfg_official": bool(config.sampling.get("cfg_official", False)),
    }
    if scale is None:
        guidance["applied"] = "none: the conditional model alone (cfg_scale = None)"
    elif scale == 1:
        guidance["applied"] = "none: s = 1 is the conditional model alone"
    else:
        guidance.update(info.get("guidance", {}))
        guidance["applied"] = ("batched: one network call on the doubled batch (conditional, "
                               "null label) per score evaluation, twice a plain call's compute")
    return {"classes": {"classes": list(sample_classes(config)),
                        "rule": "sample i has class classes[i mod len(classes)]"},
            "guidance": guidance}


@contextlib.contextmanager
def ema_weights(model: nn.Module, ema: ExponentialMovingAverage) -> Iterator[nn.Module]:
    """Temporarily swap the EMA averages into ``model`` (the reference samples with them)."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())


def sampling_score_fn(config, sde: sde_lib.SDE, model: nn.Module,
                      class_labels: torch.Tensor | None = None) -> ScoreFn:
    """The ``score_fn(x, t)`` sampling uses (eval mode): the model's, with ``class_labels`` (B,)
    bound for a class-conditional model and, when ``config.sampling.cfg_scale = s`` is set and
    not 1, classifier-free guidance (Ho & Salimans 2022) in DiT's convention eps_u + s (eps_c -
    eps_u), i.e. ``samplers.ClassifierFreeGuidance.batched`` with w = s - 1: the network sees the
    doubled batch with labels cat([y, null]) once per call (``cfg_official``: channels 0-2 only).

    Raises:
        ValueError: class labels for an unconditional model, or a guidance scale for a model
            without a null label.
    """
    continuous = config.training.continuous
    num_classes = getattr(model, "num_classes", 0)
    w = guidance_weight(config)
    if class_labels is None:
        if w is not None:
            raise ValueError(f"config.sampling.cfg_scale={w + 1} needs a class-conditional model "
                             "and class labels to guide towards (config.model.num_classes > 0)")
        return get_score_fn(sde, model, train=False, continuous=continuous)
    if not num_classes:
        raise ValueError(f"class labels given to the unconditional {type(model).__name__} "
                         "(config.model.num_classes = 0)")
    if w is None or w == 0:  # s = 1 is the conditional model alone
        return get_score_fn(sde, model, train=False, continuous=continuous,
                            class_labels=class_labels)
    null = getattr(model, "null_label", None)
    if null is None:
        raise ValueError(f"config.sampling.cfg_scale needs a model with a null label; "
                         f"{type(model).__name__} has none (null_label is None)")
    doubled = torch.cat([class_labels, torch.full_like(class_labels, null)])  # (2B,)
    score_fn = get_score_fn(sde, model, train=False, continuous=continuous,
                            class_labels=doubled)
    return samplers.ClassifierFreeGuidance.batched(
        score_fn, w, official_dit=bool(config.sampling.get("cfg_official", False)))


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
    class_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Samples (B, *D) in data space (images in [0, 1]) from ``model`` in eval mode.

    The network runs in ``config.sampling.precision`` (bf16: autocast of its forward alone, its
    outputs back in float32) and is compiled with ``config.sampling.compile``.

    Args:
        config: reads ``sampling.*`` and ``training.continuous``.
        sde: the SDE the model was trained with.
        model: the network (swap EMA weights in with :func:`ema_weights` first).
        shape: (B, *D) of the samples.
        inverse_scaler: model space -> data space (``datasets.get_data_inverse_scaler``).
        generator: the random source of the sampler.
        progress: tqdm bar over the sampler steps.
        class_labels: (B,) classes of a class-conditional model; default: sample i has class
            ``classes[i mod len(classes)]`` (:func:`training.classes.sample_classes`). Guidance
            as :func:`sampling_score_fn`.
    Returns:
        samples and the sampler's report (``nfe`` ...; ``guidance`` when guided).
    """
    method, options = sampling_options(config)
    device = next(model.parameters()).device
    if class_labels is None and getattr(model, "num_classes", 0):
        sampled = sample_classes(config)
        if sampled is None:
            raise ValueError(f"the model has {model.num_classes} classes but "
                             "config.model.num_classes = 0; set it to the model's")
        class_labels = sample_class_labels(sampled, 0, shape[0], device)
    precision = acceleration.sampling_precision(config)
    network = acceleration.inference_network(config, model, precision)
    score_fn = sampling_score_fn(config, sde, network, class_labels)
    with precision_scope(precision):  # the network's dtype; the solver state stays float32
        x, info = samplers.sample(sde, score_fn, shape, method, generator=generator,
                                  progress=progress, device=device, **options)
    return inverse_scaler(x), info
