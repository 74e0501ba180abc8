"""Time grids for the fast samplers, from T down to eps, and the marginal table on a grid.

Each grid is a plain function ``grid(sde, n_steps, eps) -> (n_steps + 1,)`` float64 tensor,
decreasing from ``sde.T`` to ``eps`` (as k-diffusion's ``get_sigmas_karras``), registered by name so
samplers take ``grid='logsnr'``. Grids defined in the noise level sigma = s/m or the log-SNR
lambda = log(m^2 / s^2) are mapped back to t with ``sde.log_snr_inverse``, so they work for every
SDE (VP, sub-VP, VE) without knowing which one it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import sde_lib
from score_sde.utils import Registry

TIME_GRIDS = Registry("time grid")
register_time_grid = TIME_GRIDS.register


def _check(sde: sde_lib.SDE, n_steps: int, eps: float) -> None:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if not (isinstance(eps, (int, float)) and 0 < eps < sde.T):
        raise ValueError(f"eps must be a number in (0, T={sde.T}), got {eps!r}")


def _with_exact_ends(t: torch.Tensor, sde: sde_lib.SDE, eps: float) -> torch.Tensor:
    # log_snr_inverse round-trips to ~1e-12; pin the ends: every sampler starts at T, stops at eps.
    t[0], t[-1] = sde.T, eps
    return t


def _log_snr(sde: sde_lib.SDE, t: float) -> torch.Tensor:
    return sde.log_snr(torch.tensor(float(t), dtype=torch.float64))


@register_time_grid("uniform")
def uniform_time_grid(sde: sde_lib.SDE, n_steps: int, eps: float = 1e-3) -> torch.Tensor:
    """Uniform in t: t_i = T - i (T - eps) / n (Song et al. 2021, the reference's grid).

    Returns:
        (n_steps + 1,) float64 times from T to eps.
    """
    _check(sde, n_steps, eps)
    return _with_exact_ends(torch.linspace(sde.T, eps, n_steps + 1, dtype=torch.float64), sde, eps)


@register_time_grid("quadratic")
def quadratic_time_grid(sde: sde_lib.SDE, n_steps: int, eps: float = 1e-3) -> torch.Tensor:
    """Quadratic in the step index, dense near eps: t_i = eps + (T - eps) (1 - i/n)^2
    (the "quadratic" skip of DDIM, Song, Meng & Ermon 2021, App. D.2).

    Returns:
        (n_steps + 1,) float64 times from T to eps.
    """
    _check(sde, n_steps, eps)
    u = torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64)
    return _with_exact_ends(eps + (sde.T - eps) * u**2, sde, eps)


@register_time_grid("karras")
def karras_time_grid(
    sde: sde_lib.SDE, n_steps: int, eps: float = 1e-3, rho: float = 7.0
) -> torch.Tensor:
    """The rho grid of EDM in the noise level sigma = s/m (Karras et al. 2022, eq. 5):
    sigma_i = (sigma_max^(1/rho) + i/n (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho with
    sigma_max = sigma(T), sigma_min = sigma(eps), mapped to t through lambda = -2 log sigma.

    Returns:
        (n_steps + 1,) float64 times from T to eps.
    """
    _check(sde, n_steps, eps)
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho!r}")
    # Work in log sigma = -lambda/2 so huge VE sigmas and tiny VP ones stay exact.
    log_sigma_max = -0.5 * float(_log_snr(sde, sde.T))
    log_sigma_min = -0.5 * float(_log_snr(sde, eps))
    u = torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)
    a, b = math.exp(log_sigma_max / rho), math.exp(log_sigma_min / rho)
    log_sigma = rho * torch.log(a + u * (b - a))
    return _with_exact_ends(sde.log_snr_inverse(-2.0 * log_sigma), sde, eps)


@register_time_grid("logsnr")
def logsnr_time_grid(sde: sde_lib.SDE, n_steps: int, eps: float = 1e-3) -> torch.Tensor:
    """Uniform in log-SNR lambda(t) (the "logSNR" grid of DPM-Solver, Lu et al. 2022, Sec. 3.3).

    Returns:
        (n_steps + 1,) float64 times from T to eps.
    """
    _check(sde, n_steps, eps)
    lam = torch.linspace(
        float(_log_snr(sde, sde.T)), float(_log_snr(sde, eps)), n_steps + 1, dtype=torch.float64
    )
    return _with_exact_ends(sde.log_snr_inverse(lam), sde, eps)


def get_time_grid(name: str, sde: sde_lib.SDE, n_steps: int, eps: float = 1e-3) -> torch.Tensor:
    """The registered grid ``name`` ('uniform', 'quadratic', 'karras', 'logsnr') on ``sde``."""
    return TIME_GRIDS.get(name)(sde, n_steps, eps)


@dataclass(frozen=True)
class MarginalTable:
    """m(t), s(t), sigma = s/m and half log-SNR lambda/2 = log(m/s) on a time grid, as Python
    floats computed once in float64 outside the sampling loop (so steps are plain
    tensor-times-float arithmetic), and the times as a tensor for the score calls."""

    t: torch.Tensor  # (n + 1,) on the samples' device and dtype
    m: list[float]
    s: list[float]
    sigma: list[float]
    half_lambda: list[float]


def marginal_table(sde: sde_lib.SDE, t: torch.Tensor, like: torch.Tensor) -> MarginalTable:
    """Tabulate the marginal coefficients of ``sde`` on the float64 grid ``t`` (n + 1,).

    ``like`` gives the device and dtype of the returned times.
    """
    t64 = t.to(torch.float64).cpu()
    m, s = sde.marginal_coeffs(t64)
    half_lambda = 0.5 * sde.log_snr(t64)
    return MarginalTable(
        t=t64.to(device=like.device, dtype=like.dtype),
        m=m.tolist(),
        s=s.tolist(),
        sigma=(s / m).tolist(),
        half_lambda=half_lambda.tolist(),
    )


__all__ = [
    "TIME_GRIDS",
    "MarginalTable",
    "get_time_grid",
    "karras_time_grid",
    "logsnr_time_grid",
    "marginal_table",
    "quadratic_time_grid",
    "register_time_grid",
    "uniform_time_grid",
]
