"""DPM-Solver and DPM-Solver++ of orders 1-3, single-step and multistep (Lu et al. 2022, 2022b).

Both solve the probability-flow ODE exactly in its linear part, in the half log-SNR
lambda = log(m/s) (Lu et al. 2022, eq. 3.4, with alpha_t = m(t), sigma_t = s(t)):

    noise prediction (DPM-Solver):   x_t = m_t/m_s x_s - m_t int e^(-lambda) eps_hat dlambda
    data prediction (DPM-Solver++):  x_t = s_t/s_s x_s + s_t int e^(lambda) x0_hat dlambda

(Lu et al. 2022b, Sec. 4), with eps_hat = -s score and x0_hat = (x + s^2 score) / m from any
score_fn, so every SDE works through m(t), s(t) and lambda(t) alone. The prediction is expanded in
a Taylor series around lambda_s and integrated exactly with the phi functions
phi_k(z) = int_0^1 e^((1-u) z) u^(k-1)/(k-1)! du (Lu et al. 2022, Sec. 3.2):

    x_t = a x_s + c sum_k h^(k+1) phi_(k+1)(+-h) f^(k)(lambda_s),   h = lambda_t - lambda_s,

where (a, c, +-h) = (m_t/m_s, -s_t, +h) for eps and (s_t/s_s, m_t, -h) for x0. The derivatives
f^(k) come from the predictions at earlier points: intermediate stages (single-step, Lu et al.
2022, Alg. 1 DPM-Solver-2 with r1 = 1/2 and Alg. 2 DPM-Solver-3 with r1 = 1/3, r2 = 2/3) or
previous steps (multistep, Lu et al. 2022b, Alg. 2 and its third-order extension), through the
Taylor-polynomial fit of those points. So each step is ``x_t = a x_s + sum_j b_j f_j`` with the
weights b_j precomputed once per grid (``_weights``); the solvers differ only in their tableau.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from samplers.base import NoiseSource, check_fresh_score, register_sampler
from samplers.base import progress_bar as _progress_bar
from samplers.fast_base import FastSampler, check_bool

# Single-step tableaux: stages (c, sources): the stage point lambda_s + c h is reached from x_s
# with the Taylor polynomial through the predictions at the listed earlier stages (0 = x_s
# itself); the last stage (c = 1) is the step's result.
_SINGLESTEP_TABLEAU = {
    1: ((1.0, (0,)),),
    2: ((0.5, (0,)), (1.0, (0, 1))),  # DPM-Solver-2, Lu et al. 2022, Alg. 1 (r1 = 1/2)
    3: ((1 / 3, (0,)), (2 / 3, (0, 1)), (1.0, (0, 2))),  # DPM-Solver-3, Alg. 2
}


#: n! as floats (exact up to 22!), so that planning a grid does not recompute them.
_FACTORIAL = tuple(float(math.factorial(n)) for n in range(23))
#: Horner coefficients 1/(k+9)!, ..., 1/k! of the series of phi_k near 0: ten terms, since at
#: |z| < 0.1 the next one, z^10/(k+10)!, is below 3e-18 phi_k(z) (under float64 rounding).
_PHI_SERIES = tuple(tuple(1.0 / _FACTORIAL[j + k] for j in reversed(range(10)))
                    for k in range(13))


def phi(k: int, z: float) -> float:
    """phi_k(z) = (e^z - sum_{j<k} z^j/j!) / z^k (Lu et al. 2022, Sec. 3.2), by series near 0."""
    if abs(z) < 0.1:
        total = 0.0
        for coefficient in _PHI_SERIES[k]:
            total = total * z + coefficient
        return total
    tail = math.expm1(z) - sum([z**j / _FACTORIAL[j] for j in range(1, k)])
    return tail / z**k


def _solve_vandermonde(nodes: list[float], rhs: list[float]) -> list[float]:
    """Solve sum_j nodes[j]^k x_j = rhs[k], k < q = len(nodes), for distinct nodes: the
    Bjorck-Pereyra algorithm (Golub & Van Loan, Matrix Computations, Alg. 4.6.2), O(q^2) in
    Python floats, so that planning a grid stays free of tensor overhead."""
    x, n = list(rhs), len(nodes) - 1
    for k in range(n):
        for i in range(n, k, -1):
            x[i] -= nodes[k] * x[i - 1]
    for k in range(n - 1, -1, -1):
        for i in range(k + 1, n + 1):
            x[i] /= nodes[i] - nodes[i - k - 1]
        for i in range(k, n):
            x[i] -= x[i + 1]
    return x


def _weights(prediction: str, lam_s: float, lam_t: float, m_s: float, s_s: float, m_t: float,
             s_t: float, taus: list[float]) -> tuple[float, list[float]]:
    """(a, b) of the step x_t = a x_s + sum_j b_j f(lambda_s + taus[j]) (Lu et al. 2022, Sec. 3.2).

    The Taylor coefficients f^(k)(lambda_s) of the polynomial through the q = len(taus) points
    solve V d = f with V[j, k] = taus[j]^k / k!, so b = V^-T w with w_k = c h^(k+1) phi_(k+1):
    sum_j taus[j]^k b_j = k! w_k, a Vandermonde system.
    """
    h = lam_t - lam_s
    if prediction == "eps":
        a, c, z = m_t / m_s, -s_t, h
    else:
        a, c, z = s_t / s_s, m_t, -h
    rhs = [_FACTORIAL[k] * c * h ** (k + 1) * phi(k + 1, z) for k in range(len(taus))]
    return a, _solve_vandermonde(taus, rhs)


class _Point(NamedTuple):
    """A score evaluation point: time (B,) and the prediction f = alpha x + beta score."""

    t: torch.Tensor
    alpha: float
    beta: float


class _Stage(NamedTuple):
    """Score the current stage point u (x_s at the first stage) at time t (B,) and store its
    prediction in the form g (f = scale g: g = u + c score for x0, one fused pass; g = score
    itself for eps, no pass); then form the next stage point (the step's result at the last
    stage) in place of u as a u + sum_l b[l] g_l + sum_j h[j] G_j over this step's g (oldest
    first) and the stored multistep predictions G (newest first), the scales folded into b and
    h."""

    t: torch.Tensor
    c: float
    a: float
    b: tuple[float, ...]
    h: tuple[float, ...]


class _Step(NamedTuple):
    """One step: its stages, the time (B,) of its result, the scale of the prediction at its
    start point (f_0 = scale g_0, for the callback) and whether g_0 is stored for later steps
    (multistep)."""

    stages: tuple[_Stage, ...]
    t_end: torch.Tensor
    scale: float
    keep: bool


class DPMSolver(FastSampler):
    """DPM-Solver / DPM-Solver++ on the probability-flow ODE (Lu et al. 2022, 2022b).

    Subclasses fix ``order``, ``multistep`` and ``prediction`` ('eps': DPM-Solver, 'x0':
    DPM-Solver++). Options (besides ``nfe``, ``eps``, ``grid`` of :class:`FastSampler`):
        lower_order_final: multistep only; below 15 steps, the last steps drop to the order they
            can support from the remaining steps (Lu et al. 2022b, Sec. 5: stabler at few steps).
    Single-step solvers spend the budget on nfe // order steps of full order plus one step of
    order nfe % order; multistep solvers take one single-step warm-up step of order - 1, then
    one NFE per step with the order the history allows.
    """

    multistep = False
    prediction = "eps"
    default_grid = "logsnr"

    def __init__(self, *, lower_order_final: bool = True, **options: Any) -> None:
        super().__init__(**options)
        self.lower_order_final = check_bool("lower_order_final", lower_order_final)

    def _points(self, sde, t: torch.Tensor, like: torch.Tensor) -> list[tuple]:
        """(point, m, s, lambda/2) at each of the float64 times ``t`` (n,), in one pass."""
        m, s = sde.marginal_coeffs(t)
        half_lambda = (0.5 * sde.log_snr(t)).tolist()
        times = t.to(device=like.device, dtype=like.dtype)[:, None].expand(-1, like.shape[0])
        times = times.unbind(0)  # (B,) views, in one call
        out = []
        for i, (m_i, s_i) in enumerate(zip(m.tolist(), s.tolist())):
            if self.prediction == "eps":
                alpha, beta = 0.0, -s_i  # eps_hat = -s score
            else:
                alpha, beta = 1.0 / m_i, s_i * s_i / m_i  # x0_hat = (x + s^2 score) / m
            out.append((_Point(times[i], alpha, beta), m_i, s_i, half_lambda[i]))
        return out

    def _stored(self, p: _Point) -> tuple[float, float]:
        """(c, scale) of the stored form g of the prediction f = scale g at point ``p``:
        g = x + c score (x0, c = beta/alpha, one fused pass) or g = score (eps, no pass)."""
        return (p.beta / p.alpha, p.alpha) if self.prediction == "x0" else (0.0, p.beta)

    def plan(self, sde, x: torch.Tensor) -> list[_Step]:
        """Per step: its stages, with the weights on this step's and the stored predictions.

        All coefficients are computed here, once, in float64; the loop only does arithmetic.
        """
        if self.multistep:
            # Warm-up: the first step has no history; a single-step step of order - 1 keeps its
            # local error O(h^order), so it costs the global order nothing (order - 1 NFE).
            warm = max(self.order - 1, 1)
            n_steps = self.nfe - warm + 1
            orders = [warm] + [min(self.order, i + 1) for i in range(1, n_steps)]
            if self.lower_order_final and n_steps < 15:
                orders = [orders[0]] + [min(q, n_steps - i) for i, q in enumerate(orders) if i]
        else:
            orders = [self.order] * (self.nfe // self.order)
            orders += [self.nfe % self.order] if self.nfe % self.order else []
            n_steps = len(orders)
        t = self.table(sde, n_steps, x).t.to(torch.float64)
        nodes = self._points(sde, t, x)
        # Single-step stage points lambda_s + c h, for all steps at once.
        stage_lams = [nodes[i][3] + c * (nodes[i + 1][3] - nodes[i][3])
                      for i, q in enumerate(orders) if not (self.multistep and i > 0)
                      for c, _ in _SINGLESTEP_TABLEAU[q][:-1]]
        stage_t = sde.log_snr_inverse(2.0 * torch.tensor(stage_lams, dtype=torch.float64))
        stage_nodes = iter(self._points(sde, stage_t, x))
        steps = []
        for i, q in enumerate(orders):
            (p_s, m_s, s_s, lam_s), (p_t, m_t, s_t, lam_t) = nodes[i], nodes[i + 1]
            c_s, scale_s = self._stored(p_s)
            if self.multistep and i > 0:
                # Predictions at x_i, x_(i-1), ... (the loop keeps them newest first).
                taus = [nodes[i - j][3] - lam_s for j in range(q)]
                a, b = _weights(self.prediction, lam_s, lam_t, m_s, s_s, m_t, s_t, taus)
                h = tuple(b_j * self._stored(nodes[i - j][0])[1] for j, b_j in enumerate(b))
                steps.append(_Step((_Stage(p_s.t, c_s, a, (), h),), p_t.t, scale_s, True))
                continue
            # Each stage point is formed in place of the previous one: from the current point
            # u = a_u x_s + sum_l b_u[l] g_l, the next one, a x_s + sum_l b[l] g_l, is
            # (a / a_u) u + sum_l (b[l] - (a / a_u) b_u[l]) g_l.
            points, stages, lams = [p_s], [], [lam_s]
            a_u, b_u = 1.0, []
            for c, sources in _SINGLESTEP_TABLEAU[q]:
                if c < 1.0:
                    p_c, m_c, s_c, lam_c = next(stage_nodes)
                else:
                    p_c, m_c, s_c, lam_c = None, m_t, s_t, lam_t
                taus = [lams[j] - lam_s for j in sources]
                a, b = _weights(self.prediction, lam_s, lam_c, m_s, s_s, m_c, s_c, taus)
                weights = [0.0] * len(points)
                for b_j, j in zip(b, sources):
                    weights[j] = b_j * self._stored(points[j])[1]
                ratio = a / a_u
                relative = tuple(w - ratio * w_u for w, w_u in zip(weights, [*b_u, 0.0]))
                p = points[len(stages)]
                stages.append(_Stage(p.t, self._stored(p)[0], ratio, relative, ()))
                a_u, b_u = a, weights
                if p_c is not None:
                    points.append(p_c)
                    lams.append(lam_c)
            steps.append(_Step(tuple(stages), p_t.t, scale_s, self.multistep))
        return steps

    def run(self, sde, score_fn, x, *, noise: NoiseSource, progress=False, callback=None):
        """Integrate the probability-flow ODE from x_T (B, *D) to x_eps; returns (x_eps, {})."""
        steps = self.plan(sde, x)
        # In-place arithmetic on one copy of x_T, which holds each stage point in turn. Past
        # predictions stay in the score tensors, which score_fn returns new per call (checked):
        # eps keeps the scores as they are, x0 turns each into its g = u + c score in place,
        # while it is still in cache (a separate buffer would be written from memory). A step
        # allocates nothing but its scores; each stage is one scaling pass and one add per
        # nonzero weight.
        x = x.clone()
        x0 = self.prediction == "x0"
        history: list[torch.Tensor] = []  # multistep: g at x_i, x_(i-1), ..., newest first
        for i, step in enumerate(_progress_bar(steps, progress, type(self).__name__)):
            gs: list[torch.Tensor] = []
            for k, st in enumerate(step.stages):
                score = score_fn(x, st.t)
                check_fresh_score(score, x, *gs, *history)
                g = torch.add(x, score, alpha=st.c, out=score) if x0 else score
                gs.append(g)
                if k == 0 and step.keep:
                    history = [g, *history[:self.order - 1]]
                x.mul_(st.a)
                for w, g in zip(st.b, gs):
                    if w:
                        x.add_(g, alpha=w)
                for w, g in zip(st.h, history):
                    x.add_(g, alpha=w)
            if callback is not None:
                callback(i, step.t_end, x, gs[0] * step.scale if x0 else None)
        return x, {"n_steps": len(steps)}


def _solver(cls_name: str, name: str, order: int, multistep: bool, prediction: str, doc: str):
    """Register a DPMSolver subclass with its declared properties (data, not code)."""
    cls = type(cls_name, (DPMSolver,), {
        "order": order,
        "nfe_per_step": 1 if multistep else order,
        "multistep": multistep,
        "prediction": prediction,
        "__doc__": doc,
        "__module__": __name__,
    })
    return register_sampler(name)(cls)


DPMSolver1 = _solver("DPMSolver1", "dpm_solver_1", 1, False, "eps",
                     "DPM-Solver-1 = DDIM (Lu et al. 2022, Sec. 3.3).")
DPMSolver2 = _solver("DPMSolver2", "dpm_solver_2", 2, False, "eps",
                     "DPM-Solver-2 (Lu et al. 2022, Alg. 1).")
DPMSolver3 = _solver("DPMSolver3", "dpm_solver_3", 3, False, "eps",
                     "DPM-Solver-3 (Lu et al. 2022, Alg. 2).")
DPMSolver2M = _solver("DPMSolver2M", "dpm_solver_2m", 2, True, "eps",
                      "Multistep DPM-Solver-2 (Lu et al. 2022b, App. B, noise prediction).")
DPMSolver3M = _solver("DPMSolver3M", "dpm_solver_3m", 3, True, "eps",
                      "Multistep DPM-Solver-3 (Lu et al. 2022b, App. B, noise prediction).")
DPMSolverPP1 = _solver("DPMSolverPP1", "dpm_solver++_1", 1, False, "x0",
                       "DPM-Solver++(1) = DDIM in data prediction (Lu et al. 2022b, Sec. 4).")
DPMSolverPP2S = _solver("DPMSolverPP2S", "dpm_solver++_2s", 2, False, "x0",
                        "DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1).")
DPMSolverPP3S = _solver("DPMSolverPP3S", "dpm_solver++_3s", 3, False, "x0",
                        "Single-step third-order DPM-Solver++ (Lu et al. 2022b, Alg. 1 with "
                        "the stages of DPM-Solver-3).")
DPMSolverPP2M = _solver("DPMSolverPP2M", "dpm_solver++_2m", 2, True, "x0",
                        "DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2).")
DPMSolverPP3M = _solver("DPMSolverPP3M", "dpm_solver++_3m", 3, True, "x0",
                        "DPM-Solver++(3M) (Lu et al. 2022b, App. B).")

__all__ = ["DPMSolver", "phi", "DPMSolver1", "DPMSolver2", "DPMSolver3", "DPMSolver2M",
           "DPMSolver3M", "DPMSolverPP1", "DPMSolverPP2S", "DPMSolverPP3S", "DPMSolverPP2M",
           "DPMSolverPP3M"]
