"""DDIM with eta (Song, Meng & Ermon 2021, eq. 12), on any SDE with x_t = m(t) x_0 + s(t) z.

With the score's predictions eps_hat = -s_t score and x0_hat = (x_t + s_t^2 score) / m_t, the step
from t to an earlier u is eq. 12 with sqrt(alpha_bar) = m and sqrt(1 - alpha_bar) = s:

    x_u = m_u x0_hat + sqrt(s_u^2 - sigma_u^2) eps_hat + sigma_u z,
    sigma_u = eta s_u sqrt(1 - exp(lambda_t - lambda_u))                    (eq. 16, generalised)

where lambda = log(m^2/s^2): sigma_u^2 is the variance of the forward posterior q(x_u | x_t, x_0)
of any linear SDE, so eta = 1 is ancestral sampling and eta = 0 the deterministic DDIM, which is
the exact-linear-part (exponential) Euler step of the probability-flow ODE in sigma = s/m.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from samplers.base import NoiseSource, check_fresh_score, register_sampler
from samplers.base import progress_bar as _progress_bar
from samplers.fast_base import FastSampler, check_bool, check_float


@register_sampler("ddim")
class DDIM(FastSampler):
    """DDIM / generalised ancestral sampling (Song, Meng & Ermon 2021, eq. 12).

    Options (besides ``nfe``, ``eps``, ``grid``): ``eta`` in [0, 1]: 0 deterministic DDIM, 1 the
    DDPM-like ancestral sampler. One score evaluation per step; ``nfe`` steps.
    ``final_time_zero``: an explicit ``grid`` may end at t = 0 (m = 1, s = 0: the last step
    returns x0_hat, as DDIM's final step to alpha_bar = 1, e.g. diffusers' ``set_alpha_to_one``).
    """

    order = 1
    nfe_per_step = 1
    stochastic = True  # with eta > 0; eta = 0 draws no noise after x_T
    default_grid = "logsnr"

    def __init__(self, *, eta: float = 0.0, final_time_zero: bool = False, **options: Any
                 ) -> None:
        self.final_time_zero = check_bool("final_time_zero", final_time_zero)
        super().__init__(**options)
        self.eta = check_float("eta", eta, 0.0, 1.0, closed_low=True, closed_high=True)

    def coefficients(self, sde, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
        """Times (n + 1,) and per step (A, B, C) of x_u = A x_t + B score + C z (eq. 12)."""
        tab = self.table(sde, self.nfe, x)
        coeffs = []
        for i in range(self.nfe):
            m_t, s_t, m_u, s_u = tab.m[i], tab.s[i], tab.m[i + 1], tab.s[i + 1]
            lam_t, lam_u = 2 * tab.half_lambda[i], 2 * tab.half_lambda[i + 1]
            sigma = self.eta * s_u * math.sqrt(-math.expm1(lam_t - lam_u))
            direction = math.sqrt(max(s_u**2 - sigma**2, 0.0))
            # m_u x0_hat + direction eps_hat, with x0_hat, eps_hat written through the score.
            coeffs.append((m_u / m_t, m_u * s_t**2 / m_t - direction * s_t, sigma))
        return tab.t, coeffs

    def run(self, sde, score_fn, x, *, noise: NoiseSource, progress=False, callback=None):
        """Run eq. 12 from x_T (B, *D) to x_eps; returns (x_eps, {'n_steps': nfe})."""
        t, coeffs = self.coefficients(sde, x)
        times = t[:, None].expand(-1, x.shape[0]).unbind(0)  # n + 1 views (B,) for the score
        # One copy of x_T, then in-place updates: no allocation per step beyond the score's own,
        # into which the noise is drawn once the score is used (a new tensor per call, checked).
        x = x.clone()
        for i, (A, B, C) in enumerate(_progress_bar(coeffs, progress, "DDIM")):
            score = score_fn(x, times[i])
            check_fresh_score(score, x)
            x.mul_(A).add_(score, alpha=B)
            if C > 0:
                x.add_(noise.randn_like(x, out=score), alpha=C)
            if callback is not None:
                callback(i, times[i + 1], x, None)
        return x, {"n_steps": len(coeffs)}


__all__ = ["DDIM"]
