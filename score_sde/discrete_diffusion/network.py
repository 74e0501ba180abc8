"""The network's side of a discrete diffusion: its (eps, v) output through a score function, and
the variance of p(x_{i-1} | x_i) it asks for (Nichol & Dhariwal 2021, eq. 15)."""

from __future__ import annotations

import torch

from score_sde.discrete_diffusion.process import RespacedProcess
from score_sde.utils import ScoreFn

#: the variances of p(x_{i-1} | x_i): the network's v, or v fixed to +1 (Sigma = beta') or -1
#: (Sigma = beta~, the posterior variance)
VARIANCES = ("learned", "large", "small")
FIXED_V = {"large": 1.0, "small": -1.0}


def check_variance(variance: str | None) -> str | None:
    """``variance`` if it is one of :data:`VARIANCES` or None, else a ``ValueError`` naming them."""
    if variance is not None and variance not in VARIANCES:
        raise ValueError(f"Unknown variance {variance!r}; valid: {', '.join(VARIANCES)} (or None: "
                         "learned when the model has learn_sigma, else large)")
    return variance


def network_eps_and_v(score_fn: ScoreFn, process: RespacedProcess, x: torch.Tensor,
                      t: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The network's (eps, v) at x (B, *D) and time t (B,) of kept step i, in one call:
    ``score_fn.eps_and_v`` where the score function has it (``models.utils`` adapters, guidance),
    else eps = -sqrt(1 - alpha_bar'_i) score (the noise prediction of any score) and v = None."""
    if hasattr(score_fn, "eps_and_v"):
        return score_fn.eps_and_v(x, t)
    return -process.at("sqrt_1m_alphas_cumprod", i, x) * score_fn(x, t), None


def reverse_v(variance: str | None, v: torch.Tensor | None, score_fn: ScoreFn
              ) -> tuple[str, torch.Tensor | float]:
    """The variance that runs and the v to give ``RespacedProcess.p_mean_variance``: the
    network's v for 'learned', +1 / -1 for 'large' / 'small'; None resolves to 'learned' when
    the network returned v, else 'large' (the official default of a fixed-variance model).

    Raises:
        ValueError: 'learned' without v, naming the model's ``learn_sigma``.
    """
    if variance is None:
        variance = "large" if v is None else "learned"
    if variance != "learned":
        return variance, FIXED_V[variance]
    if v is None:
        found = ("its eps_and_v returns v = None: the model has learn_sigma=False"
                 if hasattr(score_fn, "eps_and_v") else
                 "it has no eps_and_v (not a network adapter)")
        raise ValueError("variance='learned' needs a model with learned variances "
                         "(model.learn_sigma=True, score_fn.eps_and_v returning v); "
                         f"{found}. Use variance='large' or 'small'")
    return variance, v
