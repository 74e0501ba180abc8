"""Probability-flow ODE sampling, encoding and decoding (Song et al. 2021, eq. 13 and Sec. 4.3).

The probability-flow ODE dx/dt = f(x, t) - g(t)^2 score(x, t) / 2 maps data to latents (encode,
t: eps -> T) and latents to data (decode, t: T -> eps) one-to-one, so latents can be interpolated
and edited. Integration runs on the data's device with an adaptive torchdiffeq solver
(``dopri5``, rtol = atol = 1e-5 as the reference's RK45) or a fixed-step explicit Runge-Kutta
method given by its Butcher tableau (``euler``, ``midpoint``, ``rk4``: the methods torchdiffeq
has under those names, same steps and nodes).

The fixed-step methods run in a loop of their own rather than torchdiffeq's general one: every
SDE here has a drift linear in x, f(x, t) = f(t) x, so the right-hand side is
F(x, t) = f(t) x + c(t) score(x, t) with c = -g^2 / 2, and all f, c at the stage times are known
before the loop (float64, on the host). A step then costs its scores and one pass over the state
per tableau entry and slope, where torchdiffeq's wrappers and the per-call SDE arithmetic cost
several times that (``benchmarks/sampler_cost.py``, ``ode euler``: 4x).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchdiffeq import odeint

import sde_lib
from samplers.base import CountingScore, Sampler, check_fresh_score, progress_bar, register_sampler
from score_sde.utils import ScoreFn, as_batch_time, batch_mul, bounded_odeint_options


class Tableau(NamedTuple):
    """Butcher tableau of an explicit Runge-Kutta method: stage j is evaluated at t + c[j] dt on
    x + dt sum_l a[j][l] k_l, and the step is x + dt sum_j b[j] k_j (Butcher 2016, Sec. 23)."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int


#: The fixed-step methods, as torchdiffeq's of the same names: forward Euler, the explicit
#: midpoint rule, and Kutta's 3/8 rule (torchdiffeq's "rk4"; Kutta 1901, Butcher 2016, Sec. 23).
TABLEAUS = {
    "euler": Tableau(c=(0.0,), a=((),), b=(1.0,), order=1),
    "midpoint": Tableau(c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), order=2),
    "rk4": Tableau(c=(0.0, 1 / 3, 2 / 3, 1.0), a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
                   b=(1 / 8, 3 / 8, 3 / 8, 1 / 8), order=4),
}
#: Fixed-step solvers and their score calls per step.
FIXED_STEP_SOLVERS = {name: len(tableau.b) for name, tableau in TABLEAUS.items()}
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


class _Plan(NamedTuple):
    """Coefficients of a fixed-step run: the float64 stage times (flat) and, per step n and
    stage j, the factor r = f / c of the stage slope k~ = score + r x_j (None where g = 0 and
    the slope is k~ = x_j, F = f x_j), the weights of earlier slopes k~ in the stage's state,
    and the weights of the step."""

    times: torch.Tensor
    ratio: list[list[float | None]]
    stage_weights: list[list[list[float]]]
    step_weights: list[list[float]]


def _plan(sde: sde_lib.SDE, tableau: Tableau, t_start: float, t_end: float, steps: int) -> _Plan:
    """All coefficients of ``steps`` uniform steps from t_start to t_end, in float64 on the host,
    once: F(x, t) = f(t) x + c(t) score with c = -g(t)^2 / 2 (eq. 13 with a linear drift). The
    slope of stage j is kept as k~_j = k_j / c_j, so c_j goes into the weights; where g = 0
    (sub-VP at t = 0), as k~_j = x_j with f_j in the weights."""
    n_stages = len(tableau.b)
    grid = torch.linspace(float(t_start), float(t_end), steps + 1, dtype=torch.float64)
    dt = (grid[1:] - grid[:-1]).tolist()
    nodes = torch.tensor(tableau.c, dtype=torch.float64)
    times = (grid[:-1, None] + nodes * (grid[1:] - grid[:-1])[:, None]).reshape(-1)
    drift, diffusion = sde.sde(torch.ones(times.shape[0], 1, dtype=torch.float64), times)
    f = drift[:, 0].reshape(steps, n_stages).tolist()  # f(t) at every stage time
    c = -0.5 * diffusion.square()
    bad = ~(torch.isfinite(c) & torch.isfinite(drift[:, 0]))
    if bool(bad.any()):
        raise ValueError(f"the SDE's drift and diffusion must be finite on the integration path, "
                         f"got f = {drift[bad, 0][0].item()!r}, g = {diffusion[bad][0].item()!r} "
                         f"at t = {times[bad][0].item()!r}")
    c = c.reshape(steps, n_stages).tolist()
    ratio, stage_weights, step_weights = [], [], []
    for n in range(steps):
        ratio.append([f_j / c_j if c_j != 0.0 else None for f_j, c_j in zip(f[n], c[n])])
        scale = [c_j if c_j != 0.0 else f_j for f_j, c_j in zip(f[n], c[n])]  # k = scale k~
        stage_weights.append([[dt[n] * a_jl * scale[l] for l, a_jl in enumerate(row)]
                              for row in tableau.a])
        step_weights.append([dt[n] * b_j * scale[j] for j, b_j in enumerate(tableau.b)])
    return _Plan(times, ratio, stage_weights, step_weights)


def _fixed_step_flow(sde: sde_lib.SDE, score_fn: ScoreFn, x: torch.Tensor, t_start: float,
                     t_end: float, tableau: Tableau, steps: int,
                     progress: bool = False) -> torch.Tensor:
    """x at t_end from x (B, *D) at t_start by ``steps`` uniform steps of the explicit
    Runge-Kutta method ``tableau`` on the probability-flow ODE (eq. 13).

    Preallocated buffers: one copy of x, one stage state and the slopes k~ of all stages but the
    last, each written once per stage from the score (whose tensor is then free); the last
    stage's score and state go into the step directly. No host synchronisation in the
    loop: every coefficient is a Python float planned before it. (Keeping the score tensors as
    the slopes would save nothing, and freeing four of them at a step's end lets glibc return
    the memory to the system, so that the next step pays page faults: 3x the step's cost in
    192-D. Fusing a combination of slopes into one ``addmv`` was slower here, on 1 and 2
    threads.)
    """
    plan = _plan(sde, tableau, t_start, t_end, steps)
    n_stages = len(tableau.b)
    B = x.shape[0]
    times = plan.times.to(device=x.device, dtype=x.dtype)[:, None].expand(-1, B).unbind(0)
    y = x.clone()
    work = torch.empty_like(y)
    slopes = [torch.empty_like(y) for _ in range(n_stages - 1)]
    last = n_stages - 1
    for n in progress_bar(range(steps), progress, "ODE"):
        for j in range(n_stages):
            x_j = y
            for w, slope in zip(plan.stage_weights[n][j], slopes):
                if w != 0.0:
                    x_j = torch.add(x_j, slope, alpha=w, out=work)
            score = score_fn(x_j, times[n * n_stages + j])
            check_fresh_score(score, y)  # y is updated in place below while score is read
            r = plan.ratio[n][j]
            if j == last:
                break
            if r is None:  # g = 0: the slope is f x_j alone
                slopes[j].copy_(x_j)
            elif r == 0.0:  # f = 0 (VE)
                slopes[j].copy_(score)
            else:
                torch.add(score, x_j, alpha=r, out=slopes[j])
        # y += sum_l w_l k~_l; the last slope, w (score + r x_last), is added in its two parts.
        w = plan.step_weights[n][last]
        w_score, w_x = (0.0, w) if r is None else (w, w * r)
        if x_j is y and w_x != 0.0:  # one-stage method: y <- (1 + w r) y + w score
            y.mul_(1.0 + w_x)
        for w_l, slope in zip(plan.step_weights[n], slopes):
            if w_l != 0.0:
                y.add_(slope, alpha=w_l)
        if w_score != 0.0:
            y.add_(score, alpha=w_score)
        if x_j is not y and w_x != 0.0:
            y.add_(x_j, alpha=w_x)
    return y


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
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Integrate the probability-flow ODE (Song et al. 2021, eq. 13) from ``t_start`` to
    ``t_end`` (either direction) on x's device and dtype.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t) -> score``.
        x: the state at ``t_start`` (B, *D).
        t_start, t_end: integration interval; t_start > t_end decodes, t_start < t_end encodes.
        solver: an adaptive torchdiffeq method, ``dopri5`` (default), ``bosh3``, ..., or a
            fixed-step method of ``TABLEAUS``, ``euler``, ``midpoint``, ``rk4`` (these need
            ``steps``).
        rtol, atol: tolerances of adaptive solvers.
        steps: number of uniform steps of a fixed-step solver.
        progress: a progress bar over the steps of a fixed-step solver.
    Returns:
        the state at ``t_end`` (B, *D) and ``{'nfe': score calls}``.
    """
    check_solver(solver, steps, rtol, atol)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not torch.is_floating_point(x):
        raise ValueError("x must be a floating-point tensor of shape (B, *D)")
    counter = score_fn if isinstance(score_fn, CountingScore) else CountingScore(score_fn)
    before = counter.nfe
    if solver in TABLEAUS:
        with torch.no_grad():
            x = _fixed_step_flow(sde, counter, x, t_start, t_end, TABLEAUS[solver], steps,
                                 progress)
        return x, {"nfe": counter.nfe - before}
    # Decoding integrates in r = -t, so that torchdiffeq sees increasing times (the same grid
    # and steps it would take on t; see ProbabilityFlow).
    reverse = float(t_start) > float(t_end)
    sign = -1.0 if reverse else 1.0
    t = torch.tensor([sign * float(t_start), sign * float(t_end)], device=x.device,
                     dtype=x.dtype)
    # Every evaluation inside the interval (torchdiffeq's overshoot and initial-step probe would
    # leave [0, T]: NaN for VP at t < 0); see utils.bounded_odeint_options. Error norm: the
    # worst sample's RMS (torchdiffeq's default is the RMS over the whole batch, which lets a
    # few samples carry errors far above the tolerance).
    options = {**bounded_odeint_options(t), "norm": _worst_sample_rms}
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
        solver: an adaptive torchdiffeq method (``'dopri5'`` default) or a fixed-step tableau
            (``'euler'``, ``'midpoint'``, ``'rk4'``, with ``steps``).
        rtol, atol: adaptive tolerances (1e-5 each, as the reference).
        steps: steps of a fixed-step solver.
        eps: end time (default 1e-3).
        denoise: one Tweedie step at eps after the ODE (the reference's ``noise_removal``).

    ``callback(step, t, x, None)`` is called once, with the state at eps before denoising.
    """

    order = 5
    nfe_per_step = 6
    stochastic = False
    stops_at_eps = True

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
                        atol=self.atol, steps=self.steps, progress=progress)
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
    "TABLEAUS",
    "Tableau",
]
