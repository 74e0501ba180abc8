"""EDM's Heun sampler on the rho grid with optional stochastic churn (Karras et al. 2022, Alg. 1-2).

EDM integrates dx_hat/dsigma = (x_hat - D(x_hat; sigma)) / sigma (eq. 4 with s(t) = 1, sigma = t)
in the scaled variable x_hat = x/m and the noise level sigma = s/m. For any SDE here
x_t = m x_0 + s z means x_t / m = x_0 + sigma z, so this is the same ODE with denoiser
D = x0_hat = (x + s^2 score)/m, and (x_hat - D)/sigma = eps_hat = -s score. The grid in sigma maps
back to t through lambda = -2 log sigma; the state is kept in x, each step multiplying by m.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from samplers.base import NoiseSource, check_fresh_score, register_sampler
from samplers.base import progress_bar as _progress_bar
from samplers.fast_base import FastSampler, check_float


@register_sampler("edm_heun")
class EDMHeun(FastSampler):
    """Heun's 2nd-order method on the rho grid, with Alg. 2's churn (Karras et al. 2022).

    Options (besides ``nfe``, ``eps``, ``grid='karras'``; Alg. 2's names):
        churn (S_churn): total churn; 0 gives the deterministic Alg. 1.
        s_tmin, s_tmax: churn only where s_tmin <= sigma_i <= s_tmax.
        s_noise: scale of the added noise (1 keeps the marginals exact).
    ``nfe // 2`` Heun steps, plus one Euler step when ``nfe`` is odd. The churned level
    sigma_hat = sigma_i (1 + gamma_i) is capped at sigma(T), where the SDE ends.
    """

    order = 2
    nfe_per_step = 2
    stochastic = True  # with churn > 0
    default_grid = "karras"

    def __init__(self, *, churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                 s_noise: float = 1.0, **options: Any) -> None:
        super().__init__(**options)
        self.churn = check_float("churn", churn, 0.0, closed_low=True)
        self.s_tmin = check_float("s_tmin", s_tmin, 0.0, closed_low=True)
        self.s_tmax = float(s_tmax) if s_tmax == math.inf else check_float("s_tmax", s_tmax, 0.0)
        self.s_noise = check_float("s_noise", s_noise, 0.0, closed_low=True)

    def coefficients(self, sde, x: torch.Tensor) -> list[tuple]:
        """Per step: churn (t_hat (B,), noise_a, noise_c), Euler/Heun (t_next (B,), a, b1, b2).

        x_hat = noise_a x + noise_c z;  x_next = a x_hat + b1 score(x_hat) + b2 score(x_euler),
        with b2 = 0 for an Euler step (Alg. 2, lines 5-11, in x = m x_hat).
        """
        n_steps = (self.nfe + 1) // 2
        tab = self.table(sde, n_steps, x)
        sigma_T = tab.sigma[0]
        B = x.shape[0]
        gammas = [0.0] * n_steps
        if self.churn > 0:
            for i, sigma_i in enumerate(tab.sigma[:-1]):
                if self.s_tmin <= sigma_i <= self.s_tmax:
                    gammas[i] = min(self.churn / n_steps, math.sqrt(2.0) - 1.0,
                                    sigma_T / sigma_i - 1.0)
        # The churned levels sigma_hat = sigma_i (1 + gamma_i) and their times, for all steps in
        # one call (float64, on the host): the generic log_snr_inverse is a 60-step bisection.
        churned = [i for i, gamma in enumerate(gammas) if gamma > 0]
        hat = {}
        if churned:
            sigma_hat = torch.tensor([tab.sigma[i] * (1 + gammas[i]) for i in churned],
                                     dtype=torch.float64)
            t_hat = sde.log_snr_inverse(-2.0 * sigma_hat.log())
            m_hat, s_hat = sde.marginal_coeffs(t_hat)
            hat = dict(zip(churned, zip(t_hat.tolist(), m_hat.tolist(), s_hat.tolist())))
        # The evaluation times (B,) as views of one device tensor: the grid's, churned ones raised.
        t_eval = tab.t[:-1].clone()
        if churned:
            t_eval[churned] = torch.tensor([hat[i][0] for i in churned], dtype=torch.float64).to(
                t_eval)
        t_eval = t_eval[:, None].expand(-1, B).unbind(0)
        t_next = tab.t[1:, None].expand(-1, B).unbind(0)
        steps = []
        for i in range(n_steps):
            sigma_i, sigma_next = tab.sigma[i], tab.sigma[i + 1]
            if i in hat:
                _, m_hat, s_hat = hat[i]
                sigma_hat = s_hat / m_hat
                noise_a = m_hat / tab.m[i]
                noise_c = m_hat * math.sqrt(max(sigma_hat**2 - sigma_i**2, 0.0)) * self.s_noise
            else:
                sigma_hat, m_hat, s_hat = sigma_i, tab.m[i], tab.s[i]
                noise_a, noise_c = 1.0, 0.0
            m_next, s_next = tab.m[i + 1], tab.s[i + 1]
            heun = 2 * (i + 1) <= self.nfe
            a = m_next / m_hat
            # d = eps_hat = -s score; x_next = m_next (x_hat/m_hat + (sigma_next - sigma_hat) d).
            b1 = -m_next * (sigma_next - sigma_hat) * s_hat
            b2 = -m_next * (sigma_next - sigma_hat) * s_next
            if heun:
                b1, b2 = b1 / 2, b2 / 2
            else:
                b2 = 0.0
            steps.append((t_eval[i], noise_a, noise_c, t_next[i], a, b1, b2))
        return steps

    def run(self, sde, score_fn, x, *, noise: NoiseSource, progress=False, callback=None):
        """Alg. 2 from x_T (B, *D) to x_eps; returns (x_eps, {'n_steps': ...})."""
        steps = self.coefficients(sde, x)
        # One copy of x_T and a buffer for the noise; in-place steps. A Heun step is
        # a x + b1 score + b2 score_euler: its first half, a x + b1 score, is formed once and the
        # Euler point a x + 2 b1 score from it (four kernels, not five), in place in the score
        # (still in cache; score_fn returns a new tensor per call, checked).
        x = x.clone()
        z = torch.empty_like(x) if self.churn > 0 else None
        for i, (t_hat, na, nc, t_next, a, b1, b2) in enumerate(
            _progress_bar(steps, progress, "EDM")
        ):
            if nc > 0:  # churn: raise the noise level to sigma_hat (Alg. 2, lines 5-6)
                x.mul_(na).add_(noise.randn_like(x, out=z), alpha=nc)
            score = score_fn(x, t_hat)
            check_fresh_score(score, x)
            x.mul_(a).add_(score, alpha=b1)
            if b2:  # Heun correction (Alg. 2, lines 9-11): the Euler point is x + b1 score
                score_euler = score_fn(torch.add(x, score, alpha=b1, out=score), t_next)
                x.add_(score_euler, alpha=b2)
            if callback is not None:
                callback(i, t_next, x, None)
        return x, {"n_steps": len(steps)}


__all__ = ["EDMHeun"]
