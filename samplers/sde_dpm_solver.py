"""Stochastic multistep DPM-Solver++: the reverse SDE solved exactly in its linear part.

The reverse-time SDE dx = [f(t) x - g(t)^2 score] dt + g(t) dw_bar (Song et al. 2021, eq. 6),
written with the data prediction x0_hat = (x + s^2 score) / m and the half log-SNR
lambda = log(m/s), is linear in x apart from x0_hat. Variation of constants from s to t
(h = lambda_t - lambda_s > 0) gives

    x_t = (s_t / s_s) e^(-h) x_s
          + 2 m_t int_(lambda_s)^(lambda_t) e^(-2 (lambda_t - lambda)) x0_hat dlambda
          + s_t sqrt(1 - e^(-2h)) z,      z ~ N(0, I),

the SDE counterpart of Lu et al. 2022b, eq. 8 (the noise term is the exact transition noise of
the linear SDE, as in DDIM with eta = 1: Song, Meng & Ermon 2021, eq. 16). With x0_hat frozen at
x_s this is ancestral sampling (``ddim`` with ``eta=1``); here x0_hat is expanded in a Taylor
series in lambda through the predictions of the previous steps (the multistep idea of Lu et al.
2022b, Alg. 2) and integrated exactly:

    2 m_t int_0^h e^(-2u) (h - u)^k / k! du = 2 m_t h^(k+1) phi_(k+1)(-2h)

with the phi functions of :mod:`samplers.dpm_solver`. So the step is
x_t = a x_s + sum_j b_j x0_hat_j + c z with weights computed once per grid. The higher-order
drift removes most of the first-order bias of ancestral sampling at a given NFE (measured in
``benchmarks/sampler_quality.py``); the noise (additive, integrated exactly) limits the strong
order to 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from samplers.base import NoiseSource, check_fresh_score, register_sampler
from samplers.base import progress_bar as _progress_bar
from samplers.dpm_solver import _FACTORIAL, _solve_vandermonde, phi
from samplers.fast_base import FastSampler, check_bool


def sde_weights(lam_s: float, lam_t: float, m_t: float, s_s: float, s_t: float,
                taus: list[float]) -> tuple[float, list[float], float]:
    """(a, b, c) of x_t = a x_s + sum_j b_j x0_hat(lambda_s + taus[j]) + c z (module docstring).

    The Taylor coefficients of x0_hat at lambda_s solve V d = f with V[j, k] = taus[j]^k / k!,
    so b = V^-T w with w_k = 2 m_t h^(k+1) phi_(k+1)(-2h): sum_j taus[j]^k b_j = k! w_k.
    """
    h = lam_t - lam_s
    a = s_t / s_s * math.exp(-h)
    c = s_t * math.sqrt(-math.expm1(-2.0 * h))
    rhs = [_FACTORIAL[k] * 2.0 * m_t * h ** (k + 1) * phi(k + 1, -2.0 * h)
           for k in range(len(taus))]
    return a, _solve_vandermonde(taus, rhs), c


class SDEDPMSolverPP(FastSampler):
    """Multistep stochastic DPM-Solver++ of order 2 or 3 in the drift (module docstring).

    One score evaluation and one Gaussian draw per step; the first steps use the order their
    history allows. Options: ``nfe``, ``eps``, ``grid`` of :class:`FastSampler` and
    ``lower_order_final`` (see :meth:`orders`). Samples are
    draws of p_eps (the last step adds the noise of level s(eps)).
    """

    nfe_per_step = 1
    stochastic = True
    default_grid = "logsnr"

    def __init__(self, *, lower_order_final: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.lower_order_final = check_bool("lower_order_final", lower_order_final)

    def orders(self, n_steps: int) -> list[int]:
        """Order of each step: what the history allows, and below 15 steps (with
        ``lower_order_final``) no more than the steps left, as multistep DPM-Solver++. Off by
        default: on the benchmark's problems it helps at 8 NFE and hurts at 10-12."""
        orders = [min(self.order, i + 1) for i in range(n_steps)]
        if self.lower_order_final and n_steps < 15:
            orders = [min(q, n_steps - i) for i, q in enumerate(orders)]
        return orders

    def plan(self, sde, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
        """Times (n + 1,) and per step (1/m_s, s_s^2, a, b, c), all Python floats."""
        tab = self.table(sde, self.nfe, x)
        steps = []
        for i, q in enumerate(self.orders(self.nfe)):
            taus = [tab.half_lambda[i - j] - tab.half_lambda[i] for j in range(q)]
            a, b, c = sde_weights(tab.half_lambda[i], tab.half_lambda[i + 1], tab.m[i + 1],
                                  tab.s[i], tab.s[i + 1], taus)
            steps.append((1.0 / tab.m[i], tab.s[i] ** 2, a, b, c))
        return tab.t, steps

    def run(self, sde, score_fn, x, *, noise: NoiseSource, progress=False, callback=None):
        """Integrate the reverse SDE from x_T (B, *D) to x_eps; returns (x_eps, {'n_steps'})."""
        t, steps = self.plan(sde, x)
        times = t[:, None].expand(-1, x.shape[0]).unbind(0)  # n + 1 views (B,) for the score
        x = x.clone()
        # Predictions stored as g = x + s^2 score (x0_hat = g / m), one fused pass in place in
        # the score while it is still in cache (score_fn returns a new tensor per call, checked).
        z = torch.empty_like(x)
        history: list[tuple[torch.Tensor, float]] = []  # (g, 1/m), newest first
        for i, (inv_m, s2, a, b, c) in enumerate(_progress_bar(steps, progress, "SDE-DPM++")):
            score = score_fn(x, times[i])
            check_fresh_score(score, x, *(g for g, _ in history))
            g = torch.add(x, score, alpha=s2, out=score)
            history = [(g, inv_m)] + history[: self.order - 1]
            x.mul_(a)
            for b_j, (g_j, inv_m_j) in zip(b, history):
                x.add_(g_j, alpha=b_j * inv_m_j)
            x.add_(noise.randn_like(x, out=z), alpha=c)
            if callback is not None:
                callback(i, times[i + 1], x, g * inv_m)
        return x, {"n_steps": len(steps)}


@register_sampler("dpm_solver++_2m_sde")
class SDEDPMSolverPP2M(SDEDPMSolverPP):
    """Stochastic DPM-Solver++(2M): second-order multistep drift, exact linear part and noise."""

    order = 2


@register_sampler("dpm_solver++_3m_sde")
class SDEDPMSolverPP3M(SDEDPMSolverPP):
    """Stochastic DPM-Solver++(3M): third-order multistep drift, exact linear part and noise."""

    order = 3


__all__ = ["SDEDPMSolverPP", "SDEDPMSolverPP2M", "SDEDPMSolverPP3M", "sde_weights"]
