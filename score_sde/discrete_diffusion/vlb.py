"""The variational bound of a discrete diffusion in bits per dimension, term by term, and the hybrid
training objective (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, Sec. 3.1 and eq. 16).

    L_vlb = L_T + sum_{i >= 1} L_{i-1} + L_0,
    L_T     = KL(q(x_T | x_0) || N(0, I)),
    L_{i-1} = KL(q(x_{i-1} | x_i, x_0) || p(x_{i-1} | x_i)),
    L_0     = -log p(x_0 | x_1)   (a discretized Gaussian for quantised data),

each averaged over the data dimensions and divided by log 2 (bits per dimension), so the sum is
the bound on -log2 p(x_0) / D (plus the data's log2 of the bin width for a density).
"""

from __future__ import annotations

import math

import torch

from score_sde.discrete_diffusion.process import RespacedProcess

#: the standard normal CDF used by the discretized decoder: the official code's tanh
#: approximation, or the exact one
CDFS = ("tanh", "exact")
_LOG2 = math.log(2.0)


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, *D) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats (broadcasting):
    (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1) / 2."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~ (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2, the approximation of the
    official improved-DDPM / DiT decoder (error below 3e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _check_levels(levels: int) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2 (256 for 8-bit data), got {levels!r}")
    return levels


def _log_sub_exp_ndtr(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for lower < upper, without cancellation: in the upper tail
    (lower > 0) it is taken as log(Phi(-lower) - Phi(-upper))."""
    flip = lower > 0
    a = torch.where(flip, -lower, upper)  # the larger CDF argument after the flip
    b = torch.where(flip, -upper, lower)
    log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return log_a + torch.log(-torch.expm1(log_b - log_a))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                                        log_scale: torch.Tensor, *, levels: int = 256,
                                        cdf: str = "tanh") -> torch.Tensor:
    """log P(x) per element of data x in [-1, 1] on a grid of ``levels`` values under the
    Gaussian N(mean, e^(2 log_scale)) discretized to bins of half-width 1 / (levels - 1)
    (Ho et al. 2020, eq. 13); the first and last bins extend to -inf and +inf.

    ``cdf='tanh'`` is the official code's decoder (what its bits/dim are computed with): the
    tanh approximation of Phi (:func:`approx_standard_normal_cdf`), the edge bins chosen by
    x < -0.999 and x > 0.999 and each probability clamped at 1e-12 before the log (exact for
    8-bit data, whose next levels are +-0.992). ``cdf='exact'`` uses Phi itself, computed in log
    space (``torch.special.log_ndtr``), with the edge bins chosen at the midpoints between the
    first and last two levels (any number of levels, e.g. the 17 of the 8x8 digits).

    Args:
        x: data (B, *D) in [-1, 1] on the levels' grid.
        mean, log_scale: the decoder's mean and log standard deviation, broadcasting with x.
        levels: number of data levels L (bin half-width 1 / (L - 1)).
        cdf: 'tanh' or 'exact'.
    Returns:
        log-probabilities (B, *D) in nats.
    """
    half = 1.0 / (_check_levels(levels) - 1)
    if cdf not in CDFS:
        raise ValueError(f"Unknown cdf {cdf!r}; valid: {', '.join(CDFS)}")
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper, lower = inv_std * (centered + half), inv_std * (centered - half)
    if cdf == "tanh":
        cdf_upper, cdf_lower = approx_standard_normal_cdf(upper), approx_standard_normal_cdf(lower)
        log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
        log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
        log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
        low_edge, high_edge = x < -0.999, x > 0.999
    else:
        log_cdf_upper = torch.special.log_ndtr(upper)
        log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
        log_bin = _log_sub_exp_ndtr(lower, upper)
        low_edge, high_edge = x < -1.0 + half, x > 1.0 - half
    return torch.where(low_edge, log_cdf_upper,
                       torch.where(high_edge, log_one_minus_cdf_lower, log_bin))


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
                            ) -> torch.Tensor:
    """log N(x; mean, e^(2 log_scale)) per element, in nats: the decoder density of continuous
    data (its bound is on -log p(x_0), a density)."""
    return -0.5 * (math.log(2 * math.pi) + 2.0 * log_scale
                   + (x - mean) ** 2 * torch.exp(-2.0 * log_scale))


def vb_terms_bpd(process: RespacedProcess, eps: torch.Tensor, v: torch.Tensor | float,
                 x0: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor | int, *,
                 clip_denoised: bool = False, levels: int | None = 256,
                 cdf: str = "tanh", data_affine: tuple[float, float] | None = None
                 ) -> torch.Tensor:
    """The VLB term of step i in bits per dimension (Ho et al. 2020, eq. 5; Nichol & Dhariwal
    2021, Sec. 3.1): KL(q(x_{i-1} | x_i, x_0) || p(x_{i-1} | x_i)) for i >= 1 and the decoder's
    -log p(x_0 | x_1) for i = 0, each averaged over dimensions and divided by log 2.

    The posterior's log-variance is the clipped one (:meth:`RespacedProcess.q_posterior`); the
    decoder is the discretized Gaussian of ``levels`` data levels
    (:func:`discretized_gaussian_log_likelihood`) with mean and variance of p(x_{-1} | x_0), or
    a Gaussian density for continuous data (``levels=None``).

    Args:
        process: the (respaced) process.
        eps, v: the network's raw output at x_t and the original step k_i (v a tensor, or +1 /
            -1 for the fixed 'large' / 'small' variances).
        x0: data (B, *D) (in [-1, 1] on the levels' grid for quantised data).
        x_t: x_i ~ q(x_i | x_0) (B, *D).
        i: respaced steps (B,) int64, or an int.
        clip_denoised, levels, cdf: as :meth:`RespacedProcess.p_mean_variance` and
            :func:`discretized_gaussian_log_likelihood`.
        data_affine: (a, c) when the model space is y = a u + c of data u in [0, 1] rather
            than [-1, 1] itself: the discretized decoder is then evaluated in 2 u - 1 (a bin's
            probability is the same in both coordinates). None: x0 is in [-1, 1].
    Returns:
        the terms (B,) in bits per dimension.
    """
    mean_p, log_var_p, _ = process.p_mean_variance(eps, v, x_t, i, clip_denoised=clip_denoised)
    if isinstance(i, int) and i == 0:
        kl = None  # one step for the whole batch: only the term it needs
    else:
        mean_q, _, log_var_q = process.q_posterior(x0, x_t, i)
        kl = _mean_flat(normal_kl(mean_q, log_var_q, mean_p, log_var_p)) / _LOG2
        if isinstance(i, int):
            return kl
    log_scale = 0.5 * log_var_p
    if levels is None:
        log_p0 = gaussian_log_likelihood(x0, mean_p, log_scale)
    else:
        if data_affine is not None:  # y = a u + c -> 2 u - 1 = 2 (y - c) / a - 1
            a, c = data_affine
            x0, mean_p = 2.0 * (x0 - c) / a - 1.0, 2.0 * (mean_p - c) / a - 1.0
            log_scale = log_scale + math.log(2.0 / abs(a))
        log_p0 = discretized_gaussian_log_likelihood(x0, mean_p, log_scale, levels=levels,
                                                     cdf=cdf)
    decoder_nll = -_mean_flat(log_p0) / _LOG2
    if kl is None:
        return decoder_nll
    return torch.where(i.to(x0.device) == 0, decoder_nll, kl)


def prior_bpd(process: RespacedProcess, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension (B,), with q(x_T | x_0) =
    N(sqrt(alpha_bar'_T) x_0, (1 - alpha_bar'_T) I) at the last step (Ho et al. 2020, eq. 5)."""
    last = process.n - 1
    mean = process.at("sqrt_alphas_cumprod", last, x0) * x0
    # expanded, so that the exp runs in the coefficients' dtype (the official float32 arithmetic
    # with coefficient_dtype=float32; the input's dtype otherwise)
    log_var = process.at("log_1m_alphas_cumprod", last, x0).expand(x0.shape)
    zero = x0.new_zeros(())
    return _mean_flat(normal_kl(mean, log_var, zero, zero)) / _LOG2


def hybrid_loss_terms(process: RespacedProcess, eps: torch.Tensor, v: torch.Tensor,
                      x0: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor,
                      noise: torch.Tensor, *, rescale: bool = False,
                      levels: int = 256) -> dict[str, torch.Tensor]:
    """L_hybrid = L_simple + L_vlb per sample (Nichol & Dhariwal 2021, eq. 16, with lambda = 1
    as DiT trains it): ``mse`` = mean over dimensions of (noise - eps)^2 (Ho et al. 2020,
    eq. 14) and ``vb`` = :func:`vb_terms_bpd` at step i with the mean's input eps detached
    (stop-gradient: L_vlb trains only Sigma through v, Sec. 3.1); ``rescale`` multiplies vb by
    n / 1000 (the official RESCALED_MSE, for processes of other than 1000 steps).

    Args:
        eps, v: the network's raw output (B, *D) each at x_t and the original step k_i.
        x0: data (B, *D) in [-1, 1]; x_t = :meth:`RespacedProcess.q_sample` (x0, i, noise).
        i: steps (B,) int64 of ``process``; noise: the draws (B, *D) of x_t.
        levels: data levels of the decoder term at i = 0 (the official 256).
    Returns:
        ``{'mse', 'vb', 'loss'}``, each (B,).
    """
    mse = _mean_flat((noise - eps) ** 2)
    vb = vb_terms_bpd(process, eps.detach(), v, x0, x_t, i, levels=levels)
    if rescale:
        vb = vb * (process.n / 1000.0)
    return {"mse": mse, "vb": vb, "loss": mse + vb}
