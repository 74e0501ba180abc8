"""Probability-flow ODE sampling, encoding and decoding through torchdiffeq (Song et al. 2021,
eq. 13 and Sec. 4.3).

The probability-flow ODE dx/dt = f(x, t) - g(t)^2 score(x, t) / 2 maps data to latents (encode,
t: eps -> T) and latents to data (decode, t: T -> eps) one-to-one, so latents can be interpolated
and edited. Integration runs on the data's device with an adaptive (``dopri5``, rtol = atol =
1e-5 as the reference's RK45) or a fixed-step torchdiffeq solver.
"""

from __future__ import annotations

from typing import Any

import torch
from torchdiffeq import odeint

import sde_lib
from samplers.base import CountingScore, Sampler, check_fresh_score, register_sampler
from utils import ScoreFn, as_batch_time, batch_mul

#: Fixed-step torchdiffeq solvers and their score calls per step.
FIXED_STEP_SOLVERS = {"euler": 1, "midpoint": 2, "rk4": 4}
#: Adaptive torchdiffeq solvers (NFE depends on the tolerances; counted, not predicted).
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")


def check_solver(solver: str, steps: int | None, rtol: float, atol: float) -> None:
    """Raise ``ValueError`` naming the valid choices for an unknown solver or a bad budget."""
    if solver in FIXED_STEP_SOLVERS:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"fixed-step solver {solver!r} needs steps >= 1, got steps={steps!r}")
    elif solver in ADAPTIVE_SOLVERS:
        if steps is not None:
            raise ValueError(f"adaptive solver {solver!r} chooses its own steps; got steps={steps}")
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if not (isinstance(tol, (int, float)) and tol > 0):
                raise ValueError(f"{name} must be a positive number, got {tol!r}")
    else:
        valid = ", ".join(sorted((*FIXED_STEP_SOLVERS, *ADAPTIVE_SOLVERS)))
        raise ValueError(f"Unknown ODE solver {solver!r}; valid: {valid}")


class ProbabilityFlow(torch.nn.Module):
    """The right-hand side f(t) x - g(t)^2 score(x, t) / 2 of eq. 13 as torchdiffeq's
    ``func(t, x)`` with scalar t (every SDE here has a drift f(x, t) = f(t) x linear in x).

    With ``reverse=True`` it is the right-hand side in r = -t, dx/dr = -f~(x, -r): decoding then
    hands torchdiffeq increasing times, and the sign goes into the two coefficients (exact)
    instead of torchdiffeq's wrapper negating every output, a pass over the state per call.
    """

    def __init__(self, sde: sde_lib.SDE, score_fn: ScoreFn, reverse: bool = False) -> None:
        super().__init__()
        self.sde = sde
        self.score_fn = score_fn
        self.reverse = reverse

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = (-t if self.reverse else t).reshape(1).to(x)
        drift, diffusion = self.sde.sde(x.new_ones(1, 1), t)  # f(t) and g(t), shape (1, 1), (1,)
        score = self.score_fn(x, t.expand(x.shape[0]))
        check_fresh_score(score, x)
        sign = -1.0 if self.reverse else 1.0
        # Two passes, in place in the score (a new tensor per call, which torchdiffeq keeps).
        return score.mul_(diffusion.square().mul_(-0.5 * sign)).addcmul_(x, drift, value=sign)


def _worst_sample_rms(v: torch.Tensor) -> torch.Tensor:
    """max over samples of the RMS of v (B, *D): an error norm per sample."""
    return v.reshape(v.shape[0], -1).square().mean(dim=1).max().sqrt()


def ode_flow(
    sde: sde_lib.SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    t_start: float,
    t_end: float,
    *,
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Integrate the probability-flow ODE (Song et al. 2021, eq. 13) from ``t_start`` to
    ``t_end`` (either direction) on x's device and dtype.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t) -> score``.
        x: the state at ``t_start`` (B, *D).
        t_start, t_end: integration interval; t_start > t_end decodes, t_start < t_end encodes.
        solver: a torchdiffeq method: adaptive ``dopri5`` (default), ``bosh3``, ... or fixed-step
            ``euler``, ``midpoint``, ``rk4`` (these need ``steps``).
        rtol, atol: tolerances of adaptive solvers.
        steps: number of uniform steps of a fixed-step solver.
    Returns:
        the state at ``t_end`` (B, *D) and ``{'nfe': score calls}``.
    """
    check_solver(solver, steps, rtol, atol)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not torch.is_floating_point(x):
        raise ValueError("x must be a floating-point tensor of shape (B, *D)")
    counter = score_fn if isinstance(score_fn, CountingScore) else CountingScore(score_fn)
    before = counter.nfe
    # Decoding integrates in r = -t, so that torchdiffeq sees increasing times (the same grid
    # and steps it would take on t; see ProbabilityFlow).
    reverse = float(t_start) > float(t_end)
    sign = -1.0 if reverse else 1.0
    t = torch.tensor([sign * float(t_start), sign * float(t_end)], device=x.device,
                     dtype=x.dtype)
    options: dict[str, Any] = {}
    if solver in ADAPTIVE_SOLVERS:
        # torchdiffeq steps past the end and interpolates, and its initial-step probe can jump
        # far ahead: both leave [0, T] (NaN for VP at t < 0). Start at 1% of the interval and
        # make the end time a step boundary, so every evaluation lies inside the interval.
        options["first_step"] = 0.01 * abs(float(t_end) - float(t_start))
        options["step_t"] = t[1:]
        # Error norm: the worst sample's RMS (torchdiffeq's default is the RMS over the whole
        # batch, which lets a few samples carry errors far above the tolerance).
        options["norm"] = _worst_sample_rms
    else:
        # The uniform grid itself, so that exactly `steps` steps are taken.
        options["grid_constructor"] = lambda func, y0, tt: torch.linspace(
            tt[0], tt[-1], steps + 1, device=tt.device, dtype=tt.dtype
        )
    with torch.no_grad():
        path = odeint(ProbabilityFlow(sde, counter, reverse), x, t, rtol=rtol, atol=atol,
                      method=solver, options=options)
    return path[-1], {"nfe": counter.nfe - before}


def tweedie_denoise(sde: sde_lib.SDE, score_fn: ScoreFn, x: torch.Tensor, t: float):
    """One noise-removal step x0 = (x + s(t)^2 score(x, t)) / m(t) = E[x_0 | x_t] (Tweedie's
    formula; the reference's noise-free last predictor step). One score call."""
    t_vec = as_batch_time(t, x)
    m, s = sde.marginal_coeffs(t_vec)
    return batch_mul(1.0 / m, x + batch_mul(s**2, score_fn(x, t_vec)))


def encode(
    sde: sde_lib.SDE, score_fn: ScoreFn, x: torch.Tensor, *, eps: float = 1e-3, **solver_options
) -> tuple[torch.Tensor, dict]:
    """Latent code z = x_T of data x (at time eps) along the probability-flow ODE (eq. 13).

    ``solver_options`` are those of :func:`ode_flow`. Returns z (B, *D) and ``{'nfe'}``.
    """
    return ode_flow(sde, score_fn, x, eps, sde.T, **solver_options)


def decode(
    sde: sde_lib.SDE,
    score_fn: ScoreFn,
    z: torch.Tensor,
    *,
    eps: float = 1e-3,
    denoise: bool = False,
    **solver_options,
) -> tuple[torch.Tensor, dict]:
    """Data x_eps from latent z = x_T along the probability-flow ODE (eq. 13); with ``denoise``
    one Tweedie step at eps follows (counted in ``nfe``). Inverse of :func:`encode`."""
    x, info = ode_flow(sde, score_fn, z, sde.T, eps, **solver_options)
    if denoise:
        x = tweedie_denoise(sde, score_fn, x, eps)
        info["nfe"] += 1
    return x, info


@register_sampler("ode")
class ODESampler(Sampler):
    """Probability-flow ODE sampler (Song et al. 2021, eq. 13, Sec. 4.3): decode a prior draw.

    Options:
        solver: torchdiffeq method (``'dopri5'`` default; ``'euler'``, ``'midpoint'``, ``'rk4'``
            with ``steps``).
        rtol, atol: adaptive tolerances (1e-5 each, as the reference).
        steps: steps of a fixed-step solver.
        eps: end time (default 1e-3).
        denoise: one Tweedie step at eps after the ODE (the reference's ``noise_removal``).

    ``callback(step, t, x, None)`` is called once, with the state at eps before denoising.
    """

    order = 5
    nfe_per_step = 6
    stochastic = False

    def __init__(
        self,
        solver: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        steps: int | None = None,
        eps: float = 1e-3,
        denoise: bool = False,
        **options,
    ) -> None:
        super().__init__(**options)
        check_solver(solver, steps, rtol, atol)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        self.solver, self.rtol, self.atol, self.steps = solver, rtol, atol, steps
        self.eps, self.denoise = float(eps), bool(denoise)

    def check_sde(self, sde):
        if not self.eps < sde.T:
            raise ValueError(f"eps must lie in (0, T={sde.T}) for {sde!r}, got {self.eps}")

    def run(self, sde, score_fn, x, *, noise, progress=False, callback=None):
        """Decode x_T (B, *D); the report adds the solver's name."""
        x, _ = ode_flow(sde, score_fn, x, sde.T, self.eps, solver=self.solver, rtol=self.rtol,
                        atol=self.atol, steps=self.steps)
        if callback is not None:
            callback(0, torch.full((x.shape[0],), self.eps, device=x.device, dtype=x.dtype), x,
                     None)
        if self.denoise:
            x = tweedie_denoise(sde, score_fn, x, self.eps)
        return x, {"solver": self.solver}


__all__ = [
    "ODESampler",
    "ProbabilityFlow",
    "decode",
    "encode",
    "ode_flow",
    "tweedie_denoise",
    "FIXED_STEP_SOLVERS",
]
