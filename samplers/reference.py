"""The reference implementation's sampling entry points, on top of :func:`samplers.sample`.

``get_sampling_fn(config, sde, shape, inverse_scaler, eps)``, ``get_pc_sampler(...)`` and
``get_ode_sampler(...)`` keep the arguments of yang-song/score_sde_pytorch ``sampling.py`` and
return ``sampling_fn(model) -> (samples, nfe)``. Samplers never import ``models`` (the layer
rule), so the network enters through ``to_score_fn``: training code passes
``functools.partial(models.utils.get_score_fn, sde)``, which is called as
``to_score_fn(model, continuous=continuous)``; without it the argument of ``sampling_fn`` is
already a ``score_fn(x, t)``. Unlike the reference, the NFE returned is the exact count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import sde_lib
from samplers.base import sample
from samplers.controllable import colorize, inpaint
from samplers.ode import ODESampler  # noqa: F401  (registers 'ode')
from samplers.pc import CORRECTORS, PREDICTORS, Corrector, Predictor
from score_sde.utils import InverseScaler, ScoreFn

#: ``to_score_fn(model, continuous=...) -> score_fn``: the adapter from a network to a score.
ToScoreFn = Callable[..., ScoreFn]
SamplingFn = Callable[..., tuple[torch.Tensor, int]]


def _sampling_fn(sde, shape, inverse_scaler, continuous, to_score_fn, device, method, options):
    """``sampling_fn(model, *, generator=None, z=None) -> (inverse_scaler(x), nfe)``."""
    shape = tuple(int(s) for s in shape)

    def sampling_fn(model: Any, *, generator: torch.Generator | None = None,
                    z: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        score_fn = model if to_score_fn is None else to_score_fn(model, continuous=continuous)
        x_T = shape if z is None else z
        x, info = sample(sde, score_fn, x_T, method, generator=generator, device=device,
                         **options)
        return inverse_scaler(x), info["nfe"]

    return sampling_fn


def get_pc_sampler(
    sde: sde_lib.SDE,
    shape,
    predictor: str | type[Predictor],
    corrector: str | type[Corrector],
    inverse_scaler: InverseScaler,
    snr: float,
    n_steps: int = 1,
    probability_flow: bool = False,
    continuous: bool = False,
    denoise: bool = True,
    eps: float = 1e-3,
    device: torch.device | str | None = None,
    *,
    to_score_fn: ToScoreFn | None = None,
) -> SamplingFn:
    """Predictor-corrector sampler with the reference's arguments (Song et al. 2021, Alg. 1-3).

    Args:
        sde, shape (B, *D), inverse_scaler, snr, n_steps, probability_flow, denoise, eps,
            device: as the reference (``predictor``/``corrector`` a registered name or class).
        continuous: passed to ``to_score_fn`` (the model's time convention).
        to_score_fn: network -> ``score_fn``; None when ``sampling_fn`` receives a score_fn.
    Returns:
        ``sampling_fn(model, *, generator=None, z=None) -> (samples, nfe)`` with N = sde.N.
    """
    options = dict(predictor=predictor, corrector=corrector, snr=snr, n_steps=n_steps,
                   probability_flow=probability_flow, denoise=denoise, eps=eps)
    return _sampling_fn(sde, shape, inverse_scaler, continuous, to_score_fn, device, "pc",
                        options)


def get_ode_sampler(
    sde: sde_lib.SDE,
    shape,
    inverse_scaler: InverseScaler,
    denoise: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    eps: float = 1e-3,
    device: torch.device | str | None = None,
    *,
    continuous: bool = True,
    to_score_fn: ToScoreFn | None = None,
) -> SamplingFn:
    """Probability-flow ODE sampler with the reference's arguments (Song et al. 2021, eq. 13);
    ``method`` is a torchdiffeq solver (the reference's scipy ``'RK45'`` maps to ``'dopri5'``).
    ``sampling_fn(model, z=latent)`` decodes a given latent as the reference."""
    solver = "dopri5" if method == "RK45" else method
    options = dict(solver=solver, rtol=rtol, atol=atol, eps=eps, denoise=denoise)
    return _sampling_fn(sde, shape, inverse_scaler, continuous, to_score_fn, device, "ode",
                        options)


def get_sampling_fn(
    config,
    sde: sde_lib.SDE,
    shape,
    inverse_scaler: InverseScaler,
    eps: float,
    *,
    to_score_fn: ToScoreFn | None = None,
) -> SamplingFn:
    """The sampler named by ``config.sampling.method`` (``'pc'`` or ``'ode'``), configured from
    ``config.sampling.{predictor, corrector, snr, n_steps_each, probability_flow,
    noise_removal}``, ``config.training.continuous`` and ``config.device``.

    Returns:
        ``sampling_fn(model) -> (samples, nfe)``; see :func:`get_pc_sampler`.
    """
    method = str(config.sampling.method).lower()
    device = getattr(config, "device", None)
    continuous = bool(config.training.continuous)
    if method == "ode":
        return get_ode_sampler(sde, shape, inverse_scaler, denoise=config.sampling.noise_removal,
                               eps=eps, device=device, continuous=continuous,
                               to_score_fn=to_score_fn)
    if method == "pc":
        return get_pc_sampler(
            sde,
            shape,
            PREDICTORS.get(str(config.sampling.predictor).lower()),
            CORRECTORS.get(str(config.sampling.corrector).lower()),
            inverse_scaler,
            snr=config.sampling.snr,
            n_steps=config.sampling.n_steps_each,
            probability_flow=config.sampling.probability_flow,
            continuous=continuous,
            denoise=config.sampling.noise_removal,
            eps=eps,
            device=device,
            to_score_fn=to_score_fn,
        )
    raise ValueError(f"Unknown sampling method {config.sampling.method!r}; valid: ode, pc")


def _pc_options(predictor, corrector, snr, n_steps, probability_flow, denoise, eps):
    return dict(predictor=predictor, corrector=corrector, snr=snr, n_steps=n_steps,
                probability_flow=probability_flow, denoise=denoise, eps=eps)


def get_pc_inpainter(
    sde: sde_lib.SDE,
    predictor: str | type[Predictor],
    corrector: str | type[Corrector],
    inverse_scaler: InverseScaler,
    snr: float,
    n_steps: int = 1,
    probability_flow: bool = False,
    continuous: bool = False,
    denoise: bool = True,
    eps: float = 1e-5,
    *,
    to_score_fn: ToScoreFn | None = None,
) -> Callable[..., torch.Tensor]:
    """The reference's PC inpainter (controllable_generation.py) on :func:`inpaint`:
    ``pc_inpainter(model, data, mask) -> inverse_scaler(samples)``; unlike the reference it
    applies the same denoising as unconditional sampling (Song et al. 2021, App. I.2)."""
    options = _pc_options(predictor, corrector, snr, n_steps, probability_flow, denoise, eps)

    def pc_inpainter(model, data, mask, *, generator: torch.Generator | None = None):
        score_fn = model if to_score_fn is None else to_score_fn(model, continuous=continuous)
        x, _ = inpaint(sde, score_fn, data, mask, "pc", generator=generator, **options)
        return inverse_scaler(x)

    return pc_inpainter


def get_pc_colorizer(
    sde: sde_lib.SDE,
    predictor: str | type[Predictor],
    corrector: str | type[Corrector],
    inverse_scaler: InverseScaler,
    snr: float,
    n_steps: int = 1,
    probability_flow: bool = False,
    continuous: bool = False,
    denoise: bool = True,
    eps: float = 1e-5,
    *,
    to_score_fn: ToScoreFn | None = None,
) -> Callable[..., torch.Tensor]:
    """The reference's PC colorizer on :func:`colorize`:
    ``pc_colorizer(model, gray_scale_img) -> inverse_scaler(samples)`` (Song et al. 2021,
    App. I.3)."""
    options = _pc_options(predictor, corrector, snr, n_steps, probability_flow, denoise, eps)

    def pc_colorizer(model, gray_scale_img, *, generator: torch.Generator | None = None):
        score_fn = model if to_score_fn is None else to_score_fn(model, continuous=continuous)
        x, _ = colorize(sde, score_fn, gray_scale_img, "pc", generator=generator, **options)
        return inverse_scaler(x)

    return pc_colorizer


__all__ = [
    "get_ode_sampler",
    "get_pc_colorizer",
    "get_pc_inpainter",
    "get_pc_sampler",
    "get_sampling_fn",
]
