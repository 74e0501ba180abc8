"""Time grids tuned to a score model: few-step deterministic sampling with optimised step times.

A fixed-NFE solver's error depends on where its steps fall as much as on its order: the steps are
needed where the data prediction x0_hat changes along the probability-flow ODE, i.e. where the noise
level crosses the data's scales, which a generic grid (uniform log-SNR, EDM's rho) cannot know. The
tuner chooses the n step times of one deterministic fast sampler by minimising its global error
against a fine-step solution of the same ODE from the same pilot noise, in the spirit of
"Optimal Stepsize for Diffusion Sampling" (Pei et al. 2025) and the learned schedules of Watson et
al. (2021) and Sabour et al. (2024, "Align Your Steps"):

    min over t_1 > ... > t_(n-1) of  E || Phi_solver(x_T; T = t_0, ..., t_n = eps) - Phi(x_T) ||^2,

with Phi(x_T) the teacher (a third-order solver with many steps). The times are parametrised by
the log-SNR increments, Delta lambda_i = (lambda(eps) - lambda(T)) softmax(theta)_i, so every
candidate is a valid decreasing grid with the exact ends; theta starts from the registered grids
and an optional ``init`` grid (a short search from each, then the rest of the budget from the best
end point). The search is quasi-Newton, L-BFGS-B (Byrd et al. 1995) on log MSE with
forward-difference gradients: the error is a smooth function of the times, and on the oracle
problems this reaches 2-10 times lower errors than Powell's derivative-free method for the same
number of candidates. The tuning is a one-time cost paid on a pilot batch (reported as
``info['nfe']``); the tuned grid is then passed as ``grid=`` and sampling costs exactly its
``nfe``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from tqdm.auto import tqdm

import sde_lib
from samplers.base import SAMPLERS, sample
from samplers.fast_base import FastSampler, check_float, check_int, check_time_grid
from samplers.grids import TIME_GRIDS, get_time_grid
from score_sde.utils import ScoreFn

#: Log-error of a candidate whose steps collapse in float64 or whose samples are not finite
#: (finite: the line search takes differences of objective values).
_REJECTED = 100.0


class _BudgetSpent(Exception):
    """Raised by the objective once a search has tried its share of candidates."""


def _resample(sde, grid: torch.Tensor, n_steps: int, eps: float) -> torch.Tensor:
    """``grid`` moved to n_steps steps, with its ends pinned to T and eps: a grid with fewer steps
    keeps its times and gains midpoints (in log-SNR) of its widest steps, one at a time; a grid
    with more steps has its log-SNR, as a function of the step fraction, interpolated."""
    lam = sde.log_snr(grid).numpy()
    lam[0], lam[-1] = _log_snr_at(sde, sde.T), _log_snr_at(sde, eps)
    while len(lam) - 1 < n_steps:
        i = int(np.argmax(np.diff(lam)))
        lam = np.insert(lam, i + 1, 0.5 * (lam[i] + lam[i + 1]))
    if len(lam) - 1 > n_steps:
        lam = np.interp(np.linspace(0.0, 1.0, n_steps + 1), np.linspace(0.0, 1.0, len(lam)), lam)
    return _times(sde, lam, eps)


def _log_snr_at(sde, t: float) -> float:
    return float(sde.log_snr(torch.tensor(t, dtype=torch.float64)))


def _times(sde, lam: np.ndarray, eps: float) -> torch.Tensor:
    """The float64 times of the log-SNRs ``lam``, with the ends pinned to exactly T and eps."""
    t = sde.log_snr_inverse(torch.tensor(lam, dtype=torch.float64))
    t[0], t[-1] = sde.T, eps
    return t


def _steps_taken(sde, score_fn, x_T, method, nfe, options) -> tuple[int, int]:
    """The number of steps ``method`` takes for ``nfe`` (one callback per step), and the
    evaluations it spent."""
    ends: list[torch.Tensor] = []
    _, info = sample(sde, score_fn, x_T, method, nfe=nfe,
                     callback=lambda i, t, x, x0: ends.append(t), **options)
    return len(ends), info["nfe"]


def tune_time_grid(
    sde: sde_lib.SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...] | torch.Tensor,
    method: str = "unipc_3",
    *,
    nfe: int = 10,
    eps: float = 1e-3,
    teacher: str = "dpm_solver++_3m",
    teacher_nfe: int = 500,
    max_evals: int = 2000,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> tuple[torch.Tensor, dict]:
    """Step times for ``method`` at ``nfe`` that minimise its error against a fine-step solution
    of the probability-flow ODE (Song et al. 2021, eq. 13) from pilot noise (see module docstring).

    Args:
        sde, score_fn: the SDE and score to tune for (the tuned grid is specific to both).
        shape: (P, *D) of the pilot batch drawn from the prior, or the pilot x_T itself; a few
            hundred samples suffice.
        method: a deterministic fixed-grid fast sampler (e.g. 'unipc_3', the default and the
            most accurate on tuned grids in ``benchmarks/sampler_quality.py``,
            'dpm_solver++_3m', 'ddim', 'edm_heun').
        nfe: the budget the grid is for.
        eps: the final time.
        teacher: the fine-step sampler giving the reference solution, run with ``teacher_nfe``.
        max_evals: cap on the number of candidate grids tried (each costs ``nfe`` evaluations
            on the pilot batch).
        init: a grid to start from besides the registered ones, e.g. one tuned for a smaller
            budget (its times are kept and its widest log-SNR steps halved until the step
            count is this budget's; a longer grid is interpolated).
        generator: the pilot noise's random source.
        progress: show a tqdm bar over the candidates.
        device, dtype: of the pilot batch when ``shape`` is a tuple.
        **options: further options of ``method`` (a stochastic configuration is refused).
    Returns:
        the grid, a float64 tensor (n_steps + 1,) from T to eps to pass as ``grid=`` with the
        same ``method``, ``nfe`` and options, and a report: ``mse`` (tuned) and ``mse_start``
        (the best start's) per coordinate against the teacher, ``start`` the start (a registered
        grid's name or 'init') the final search began from,
        ``evals`` candidates tried, ``nfe`` the score evaluations spent (teacher included),
        ``n_steps``.
    """
    if not isinstance(sde, sde_lib.SDE):
        raise TypeError(f"sde must be an sde_lib.SDE, got {type(sde).__name__}")
    sampler_cls = SAMPLERS.get(method)
    if not issubclass(sampler_cls, FastSampler):
        fast = sorted(name for name in SAMPLERS if issubclass(SAMPLERS.get(name), FastSampler))
        raise ValueError(f"tune_time_grid tunes the fixed-grid fast samplers; {method!r} is not "
                         f"one (valid: {', '.join(fast)})")
    if "grid" in options:
        raise ValueError("tune_time_grid chooses the grid itself; do not pass grid=")
    check_int("nfe", nfe, 1)
    check_int("teacher_nfe", teacher_nfe, 2)
    check_int("max_evals", max_evals, 1)
    eps = check_float("eps", eps, 0.0, sde.T)
    if isinstance(shape, torch.Tensor):
        x_T = shape
    else:
        x_T = sde.prior_sampling(tuple(shape), generator=generator, device=device, dtype=dtype)

    lam_T, lam_eps = _log_snr_at(sde, sde.T), _log_snr_at(sde, eps)
    spent = 0

    def run(grid: torch.Tensor, seed: int = 0) -> torch.Tensor:
        nonlocal spent
        x, info = sample(sde, score_fn, x_T, method, nfe=nfe, grid=grid,
                         generator=torch.Generator(x_T.device).manual_seed(seed), **options)
        spent += info["nfe"]
        return x

    x_ref, info = sample(sde, score_fn, x_T, teacher, nfe=teacher_nfe, eps=eps)
    spent += info["nfe"]
    if not bool(torch.isfinite(x_ref).all()):
        raise ValueError(f"the teacher ({teacher!r}, {teacher_nfe} NFE) returned non-finite "
                         f"samples: check score_fn on these times and shapes")
    n_steps, used = _steps_taken(sde, score_fn, x_T, method, nfe, dict(options, eps=eps))
    spent += used

    def mse(x: torch.Tensor) -> float:
        return float((x - x_ref).double().pow(2).mean())

    candidates = {name: get_time_grid(name, sde, n_steps, eps) for name in TIME_GRIDS}
    if init is not None:
        candidates["init"] = _resample(sde, check_time_grid(init), n_steps, eps)
    starts = {}
    for name, t in candidates.items():
        x = run(t)
        starts[name] = mse(x)
        # A sampler that draws noise cannot be tuned this way.
        if name == "logsnr" and not torch.equal(x, run(t, seed=1)):
            raise ValueError(f"tune_time_grid needs a deterministic sampler: {method!r} with "
                             f"options {options} draws noise after x_T")

    def grid_of(theta: np.ndarray) -> torch.Tensor:
        w = np.exp(theta - theta.max())
        fraction = np.concatenate([[0.0], np.cumsum(w / w.sum())])  # softmax increments
        return _times(sde, lam_T + (lam_eps - lam_T) * fraction, eps)

    bar = tqdm(total=max_evals, desc="tuning grid", disable=not progress, leave=False)
    best = {"mse": math.inf, "theta": None, "evals": 0, "cap": 0}

    def objective(theta: np.ndarray) -> float:
        if best["evals"] >= best["cap"]:
            raise _BudgetSpent
        best["evals"] += 1
        bar.update(1)
        t = grid_of(theta)
        if not bool((t[1:] < t[:-1]).all()):  # steps below the float64 resolution of t
            return _REJECTED
        err = mse(run(t))
        if not math.isfinite(err):  # a diverging candidate
            return _REJECTED
        if err < best["mse"]:
            best.update(mse=err, theta=theta.copy())
        return math.log(max(err, 1e-300))  # scale-free: the error spans many decades

    # Forward differences of log MSE: the step must stand clear of the pilot dtype's rounding.
    fd_step = max(1e-6, 10.0 * math.sqrt(torch.finfo(x_T.dtype).eps))

    def search(theta: np.ndarray, evals: int) -> tuple[float, np.ndarray, int]:
        """L-BFGS-B from ``theta`` for at most ``evals`` candidates: (error, theta, used)."""
        best.update(mse=math.inf, theta=theta, evals=0, cap=max(evals, 1))
        try:
            minimize(objective, theta, method="L-BFGS-B",
                     options={"maxfun": best["cap"], "eps": fd_step, "ftol": 1e-12,
                              "gtol": 1e-9})
        except _BudgetSpent:
            pass
        return best["mse"], best["theta"], best["evals"]

    # The error is far from convex in the times, and which registered grid is best at the start
    # says little about where a local search ends: a short search from each, then the rest of
    # the budget from the best end point.
    first = max_evals // (2 * len(starts))
    ends, evals = {}, 0
    for name, t0 in candidates.items():
        theta0 = torch.log(torch.diff(sde.log_snr(t0)).clamp_min(1e-12)).numpy()
        err, theta, used = search(theta0, first)
        ends[name] = (err, theta)
        evals += used
    start = min(ends, key=lambda name: ends[name][0])
    err, theta = ends[start]
    if max_evals > evals:
        err, theta, used = search(theta, max_evals - evals)
        evals += used
    bar.close()
    return grid_of(theta), {"mse": err, "mse_start": min(starts.values()), "start": start,
                            "evals": evals, "nfe": spent, "n_steps": n_steps}


__all__ = ["tune_time_grid"]
