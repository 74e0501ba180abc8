"""Ancestral sampling of a discrete DDPM on a respaced grid, with learned or fixed variances
(Ho et al. 2020, Alg. 2; Nichol & Dhariwal 2021, Secs. 3.1 and 4).

From x_T ~ N(0, I) at the last kept step, each step i = n-1 .. 0 calls the network once at the
original step k_i and draws

    x_{i-1} = mean + exp(log Sigma / 2) z   (no noise at i = 0),

with the mean and log Sigma of ``RespacedProcess.p_mean_variance`` (x0_hat from eps, the posterior
mean of q(x_{i-1} | x_i, x0_hat), log Sigma interpolated by v between log beta'_i and
log beta~_i, eq. 15). The step is the official improved-DDPM / DiT ``p_sample`` step for step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import sde_lib
from samplers.base import NoiseSource, Sampler, progress_bar, register_sampler
from samplers.fast_base import check_bool, check_int
from score_sde.discrete_diffusion import (
    RespacedProcess,
    check_ddpm_sde,
    check_variance,
    network_eps_and_v,
    reverse_v,
    space_timesteps,
)


@register_sampler("ddpm")
class DDPMAncestral(Sampler):
    """DDPM ancestral sampling on a respaced grid (Ho et al. 2020, Alg. 2; Nichol & Dhariwal
    2021, Sec. 4), one network call per step: NFE = the number of kept steps.

    Needs an SDE with a DDPM table and its index/time map (``discrete_vpsde``, ``vpsde``); the
    network sees the original step k_i through t = ``sde.index_to_time(k_i)``.

    Options:
        spacing: the kept steps, as :func:`score_sde.discrete_diffusion.space_timesteps`
            (``'ddim50'``, ``'50'``, ``'10,15,20'``); default ``str(nfe)``, or every step of the
            table when ``nfe`` is None too.
        nfe: the number of steps (must equal the spacing's count when both are given).
        variance: ``'learned'``: Sigma from the network's v (a model with ``learn_sigma``:
            ``score_fn.eps_and_v`` returning v); ``'large'``: Sigma = beta'_i (v = +1);
            ``'small'``: Sigma = beta~_i, the posterior variance (v = -1). 'large' and 'small'
            work with any score_fn (eps = -sqrt(1 - alpha_bar) score when it has no
            ``eps_and_v``). Default None: 'learned' when the score function returns v, else
            'large' (the official default of a fixed-variance model); the report names it.
        clip_denoised: clip x0_hat to [-1, 1] before the posterior mean (off, as DiT samples).

    The report holds ``n_steps``, ``spacing``, ``timesteps`` (the kept steps) and ``variance``;
    ``callback(step, t, x, x0_hat)`` receives each step's new state (at the time of k_{i-1}, 0
    after the last step) and the x0_hat it used.
    """

    order = 1
    nfe_per_step = 1
    stochastic = True

    def __init__(self, *, spacing: str | int | Sequence[int] | None = None,
                 nfe: int | None = None, variance: str | None = None,
                 clip_denoised: bool = False) -> None:
        super().__init__()
        self.nfe = None if nfe is None else check_int("nfe", nfe, 1)
        if isinstance(spacing, bool) or not isinstance(spacing, (str, int, Sequence, type(None))):
            raise TypeError(f"spacing must be a str such as 'ddim50' or '100', got {spacing!r}")
        self.spacing = str(self.nfe) if spacing is None and self.nfe is not None else spacing
        self.variance = check_variance(variance)
        self.clip_denoised = check_bool("clip_denoised", clip_denoised)

    def check_sde(self, sde: sde_lib.SDE) -> None:
        """A DDPM table, a valid spacing of its N steps and an ``nfe`` equal to its count."""
        check_ddpm_sde(sde)
        if self.spacing is not None:
            kept = len(space_timesteps(sde.N, self.spacing))
            if self.nfe is not None and kept != self.nfe:
                raise ValueError(f"spacing {self.spacing!r} keeps {kept} steps of {sde.N}, but "
                                 f"nfe={self.nfe}; give one of them, or both consistent")

    def run(self, sde, score_fn, x, *, noise: NoiseSource, progress=False, callback=None):
        """Ancestral steps i = n-1 .. 0 from x_T (B, *D); returns (x_0, report)."""
        process = RespacedProcess.from_sde(sde, self.spacing)
        times = sde.index_to_time(process.timesteps.to(torch.float64)).to(x)  # (n,)
        zero = times.new_zeros(())
        variance = self.variance
        for step, i in enumerate(progress_bar(range(process.n - 1, -1, -1), progress, "DDPM")):
            eps, v = network_eps_and_v(score_fn, process, x, times[i].expand(x.shape[0]), i)
            variance, v = reverse_v(variance, v, score_fn)  # None resolves at the first step
            mean, log_var, x0_hat = process.p_mean_variance(eps, v, x, i,
                                                            clip_denoised=self.clip_denoised)
            x = mean if i == 0 else mean + torch.exp(0.5 * log_var) * noise.randn_like(x)
            if callback is not None:
                callback(step, times[i - 1] if i > 0 else zero, x, x0_hat)
        return x, {"n_steps": process.n, "spacing": self.spacing or str(sde.N),
                   "timesteps": process.timesteps.tolist(), "variance": variance}


__all__ = ["DDPMAncestral"]
