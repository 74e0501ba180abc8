"""The likelihood of a latent score SDE in bits per *data* dimension: the variational bound of
LSGM (Vahdat, Kreis & Kautz 2021, eq. 3) with the probability-flow ODE likelihood of the latent
score model (Song et al. 2021, eq. 39-40) as the prior,

    log P(x) >= E_q(z|x)[ log P(x | z) ] + E_q(z|x)[ log p_ODE(z) ] + H[q(z | x)],

z = z_model the latent in the score model's space (``models.autoencoders.base``). The gap is
KL(q(z | x) || p(z | x)). Per image the two expectations are averaged over K reparameterised
draws z_k ~ q(z | x); the entropy of the diagonal Gaussian q is exact. Dividing by -D log 2,
D = C H W of the *image*, gives an upper bound on the data's bits/dim that compares with the
pixel models' ODE bits/dim (``likelihood.bits_per_dim``): both bound -log2 P(x) / D.

**What is discrete and what continuous.** Only the decoder term is discrete: for quantised data
(L levels, 256 for 8 bits) P(x | z) is the probability of x's bin under the decoder Gaussian
N(decode(z), sigma_c^2) in model space y = a x + c (``[-1, 1]`` for centred data), discretised
as Ho et al. 2020, eq. 13: bins of half-width a / (2 (L - 1)) around the levels, the first and
last open to -inf / +inf (``discrete_diffusion.discretized_gaussian_log_likelihood``, exact
Phi). It is a probability, so no dequantisation, log-determinant or offset enters. The latent
terms log p_ODE(z) and H[q] are continuous densities of z; their sum is invariant to rescaling
z (the scale factor of the latent cancels between them). For continuous data (``levels=None``)
the decoder term is the density N(y; decode(z), sigma_c^2) carried to data space with the
log-determinant D log |a| of y = a x + c, exactly as ``likelihood.nats_per_dim`` does, and the
bound is on -log2 p(x) / D. (The bins here have width a / (L - 1), centred on the levels, so
in the narrow-bin limit P(k) ~ p_y(y) (a / (L - 1))^D: an offset log2 (L - 1). The pixel ODE
bits/dim dequantise with bins of width a / L, offset log2 L (``likelihood.bits_per_dim``). Both
are upper bounds on -log2 P(x) / D; the two bin conventions differ by log2 (L / (L - 1)) bits/dim,
0.0056 at 8 bits and 0.087 for the digits' 17 levels.)

**The decoder model** (:class:`DecoderLikelihood`): the toolkit's own autoencoder learns a
per-channel log sigma_c (``KLAutoencoder.decoder_log_scale``, :meth:`DecoderLikelihood.learned`);
a VAE without a decoder variance (the SD VAEs) gets sigma_c^2 fitted on held-out images by
:func:`fit_decoder_variance`. Either way the values are recorded with the bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

import likelihood
import sde_lib
from models.autoencoders import Autoencoder, gaussian_entropy
from score_sde.discrete_diffusion import discretized_gaussian_log_likelihood
from score_sde.utils import InverseScaler, ScoreFn, sum_except_batch

_LOG2 = math.log(2.0)
_LOG_2PI = math.log(2 * math.pi)


def _log_det(a: float, D: int) -> float:
    """log |det d y / d x| = D log |a| of the data scaling y = a x + c (the change of variables
    from model space to data space of a density)."""
    return D * math.log(abs(a))


@dataclass(frozen=True)
class DecoderLikelihood:
    """The decoder's likelihood p(y | z) = prod_{c,i} N(y_{c,i}; decode(z)_{c,i}, sigma_c^2) in
    model space y, discretised to the data's bins for quantised data (module docstring).

    Attributes:
        log_scale: (C,) log sigma_c per image channel, in model-space units.
        source: ``'learned'`` (the autoencoder's own variance) or ``'fitted'`` (on held-out
            data, :func:`fit_decoder_variance`).
        details: how it was obtained (for a fit: images, draws, estimator), for the record.
    """

    log_scale: torch.Tensor
    source: str
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.log_scale
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or not bool(torch.isfinite(s).all()):
            raise ValueError(f"log_scale must be a finite (C,) tensor, got {s!r}")

    @classmethod
    def learned(cls, autoencoder: Autoencoder) -> DecoderLikelihood:
        """The learned per-channel variance of an autoencoder that has one (``KLAutoencoder``).

        Raises:
            ValueError: the autoencoder has no ``decoder_log_scale`` (fit one instead).
        """
        log_scale = getattr(autoencoder, "decoder_log_scale", None)
        if not isinstance(log_scale, torch.Tensor):
            raise ValueError(f"{type(autoencoder).__name__} has no learned decoder variance "
                             "(decoder_log_scale); fit one on held-out data with "
                             "fit_decoder_variance")
        return cls(log_scale.detach().to("cpu", torch.float64).clone(), "learned",
                   {"parameter": "decoder_log_scale"})

    def log_prob(self, y: torch.Tensor, y_mean: torch.Tensor, *, levels: int | None,
                 scaling: tuple[float, float] = (2.0, -1.0)) -> torch.Tensor:
        """log P(x | z) per image (B,) in nats.

        Args:
            y: (B, C, H, W) data in model space y = a x + c (on the levels' grid when quantised).
            y_mean: (B, C, H, W) the decoder's mean decode(z).
            levels: L levels of quantised data: log of the bin probability (discrete); None:
                the Gaussian log-density of x = (y - c) / a (continuous, with D log |a|).
            scaling: (a, c) of the data scaling (``likelihood.affine_scaler``).
        """
        a, c = scaling
        log_scale = self.log_scale.to(y)[None, :, None, None]  # (1, C, 1, 1)
        if levels is None:
            u = (y - y_mean) * torch.exp(-log_scale)
            log_p = sum_except_batch(-0.5 * u.square() - log_scale - 0.5 * _LOG_2PI)
            return log_p + _log_det(a, y[0].numel())
        # the same bins on [-1, 1]: y' = 2 (y - c) / a - 1 = 2 k / (L - 1) - 1 (a bijection of
        # the bins, so the probabilities are unchanged)
        to_unit = 2.0 / a
        log_p = discretized_gaussian_log_likelihood(
            to_unit * (y - c) - 1.0, to_unit * (y_mean - c) - 1.0,
            (log_scale + math.log(abs(to_unit))).expand_as(y), levels=levels, cdf="exact")
        return sum_except_batch(log_p)

    def describe(self) -> dict:
        """The record of the decoder model: its form, source, sigma_c per channel, details."""
        return {"model": "per-channel Gaussian N(decode(z), sigma_c^2) in model space, "
                         "discretised to the data's bins for quantised data",
                "source": self.source, "sigma": torch.exp(self.log_scale).tolist(),
                "log_sigma": self.log_scale.tolist(), **self.details}


def _check_draws(num_draws) -> int:
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
        raise ValueError(f"num_draws must be an integer >= 1, got {num_draws!r}")
    return num_draws


def _model_space(x: torch.Tensor, inverse_scaler: InverseScaler | None, levels: int | None
                 ) -> tuple[torch.Tensor, tuple[float, float]]:
    """Data x (B, C, H, W) in [0, 1] (quantised: on the grid k / (L - 1)) -> (y, (a, c))."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        what = f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        raise ValueError(f"images must be a floating (B, C, H, W) tensor, got {what}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images have non-finite values")
    if levels is not None:
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be an integer >= 2 (256 for 8-bit data) or None for "
                             f"continuous data, got {levels!r}")
        off = (x * (levels - 1) - torch.round(x * (levels - 1))).abs().amax()
        if float(off) > 1e-3 or float(x.amin()) < 0 or float(x.amax()) > 1:
            raise ValueError(f"quantised images must lie on the grid k / {levels - 1} in [0, 1]")
    a, c = (1.0, 0.0) if inverse_scaler is None else likelihood.affine_scaler(inverse_scaler)
    return a * x + c, (a, c)


def fit_decoder_variance(autoencoder: Autoencoder, batches: Iterable[torch.Tensor],
                         inverse_scaler: InverseScaler | None = None, *,
                         generator: torch.Generator | None = None) -> DecoderLikelihood:
    """Fit the per-channel decoder variance of an autoencoder without one (the SD VAEs) on
    held-out images: the maximum-likelihood sigma_c^2 of the Gaussian decoder under the bound's
    expectation over q, i.e. the mean squared residual of channel c,

        sigma_c^2 = mean_{images, pixels of c} (y - decode(z))^2,   z ~ q(z | y) (one draw each),

    (the second moment about the decoder mean, which the decoder's Gaussian is centred on; the
    continuous ML estimate, used for the discretised decoder too).

    Args:
        autoencoder: the autoencoder.
        batches: (B, C, H, W) held-out images in [0, 1] (not the images the bound is reported on).
        inverse_scaler: maps model space back to [0, 1] (affine); None: images used as they are.
        generator: draws z.
    Returns:
        a :class:`DecoderLikelihood` with ``source='fitted'`` and the fit's size in ``details``.
    """
    total, count, n_images = None, 0, 0
    with torch.no_grad():
        for x in batches:
            y, _ = _model_space(x, inverse_scaler, None)
            residual = y - autoencoder.decode(autoencoder.sample_latent(y, generator=generator))
            sq = residual.double().square().sum(dim=(0, 2, 3))  # (C,)
            total = sq if total is None else total + sq
            count += residual[:, 0].numel()
            n_images += y.shape[0]
    if total is None:
        raise ValueError("fit_decoder_variance needs at least one batch of held-out images")
    log_scale = 0.5 * torch.log(total.cpu() / count)
    return DecoderLikelihood(log_scale, "fitted", {
        "fit": "mean squared residual per channel, one draw z ~ q(z | x) per image",
        "fit_images": n_images})


def latent_bits_per_dim(
    sde: sde_lib.SDE,
    score_fn: ScoreFn,
    autoencoder: Autoencoder,
    x: torch.Tensor,
    decoder: DecoderLikelihood,
    inverse_scaler: InverseScaler | None = None,
    *,
    levels: int | None = 256,
    num_draws: int = 1,
    generator: torch.Generator | None = None,
    **likelihood_kwargs,
) -> tuple[torch.Tensor, dict]:
    """Upper bound on the data's bits/dim of a latent score SDE: -1 / (D log 2) times the LSGM
    bound (Vahdat et al. 2021, eq. 3; the module docstring)

        E_q[ log P(x | z) ] + E_q[ log p_ODE(z) ] + H[q(z | x)],

    the expectations over K = ``num_draws`` draws z_k = mean + std e_k of q (Kingma & Welling
    2014, eq. 10), log p_ODE from :func:`likelihood.log_likelihood` in one ODE solve of all
    K B latents (memory grows with K B: lower the batch for large latents).

    Args:
        sde, score_fn: the latent score model (``score_fn(z (B, c, h, w), t (B,))``).
        autoencoder: maps images in model space to q(z | x) and latents back (z = z_model).
        x: (B, C, H, W) images in [0, 1]: on the grid k / (L - 1) when quantised.
        decoder: the decoder likelihood (:meth:`DecoderLikelihood.learned` or
            :func:`fit_decoder_variance`).
        inverse_scaler: maps model space back to [0, 1] (affine; centred: (y + 1) / 2); None:
            the identity.
        levels: L levels of quantised data (a discretised decoder term), or None (continuous
            data: a decoder density, the bound is on -log2 p(x) / D).
        num_draws: K draws of z per image.
        generator: draws z, then the ODE's probes.
        **likelihood_kwargs: to :func:`likelihood.log_likelihood` (divergence, rtol, atol, ...).
    Returns:
        bpd (B,) (the bound per image, bits per data dimension) and ``info``: ``terms`` (dict of
        (B,) bits/dim summing to bpd: ``decoder`` = -E_q log P(x | z) / (D log 2) (with the
        log-determinant for continuous data), ``latent_prior`` = -E_q log p_ODE(z) / (D log 2),
        ``entropy`` = -H[q] / (D log 2)), ``stderr`` (B,) (the Monte-Carlo standard error of bpd
        over the K draws, NaN for K = 1), ``draws`` (K, B) (bits/dim of each draw's bound),
        ``nfe`` (score evaluations, all draws), ``num_draws``, ``levels``, ``log_det_bpd``,
        ``decoder`` (:meth:`DecoderLikelihood.describe`), ``dtype`` and ``bound``.
    """
    K = _check_draws(num_draws)
    y, scaling = _model_space(x, inverse_scaler, levels)
    B, D = y.shape[0], y[0].numel()
    if decoder.log_scale.numel() != y.shape[1]:
        raise ValueError(f"the decoder has {decoder.log_scale.numel()} channel variances; the "
                         f"images have {y.shape[1]} channels")
    with torch.no_grad():
        mean, log_std = autoencoder.encode(y)  # (B, c, h, w) each, in z_model space
    entropy = gaussian_entropy(log_std)  # (B,) exact
    e = torch.randn((K, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
    z = (mean + torch.exp(log_std) * e).flatten(0, 1)  # (K B, c, h, w), draw-major
    logp_z, info = likelihood.log_likelihood(sde, score_fn, z, generator=generator,
                                             **likelihood_kwargs)
    with torch.no_grad():
        y_k = y.expand(K, *y.shape).flatten(0, 1)  # (K B, C, H, W)
        log_decoder = decoder.log_prob(y_k, autoencoder.decode(z), levels=levels,
                                       scaling=scaling).reshape(K, B)
    log_prior, nfe = logp_z.reshape(K, B), info["nfe"]
    to_bpd = -1.0 / (D * _LOG2)
    draws = to_bpd * (log_decoder + log_prior + entropy)  # (K, B)
    terms = {"decoder": to_bpd * log_decoder.mean(0), "latent_prior": to_bpd * log_prior.mean(0),
             "entropy": to_bpd * entropy}
    bpd = draws.mean(0)
    stderr = (draws.std(0) / math.sqrt(K)) if K > 1 else torch.full_like(bpd, math.nan)
    kind = (f"P(x | z) of {levels} levels (discretised decoder): an upper bound on "
            f"-log2 P(x) / D" if levels is not None
            else "p(x | z) a density (continuous data): an upper bound on -log2 p(x) / D")
    info = {"terms": terms, "stderr": stderr, "draws": draws, "nfe": nfe, "num_draws": K,
            "levels": levels,
            "log_det_bpd": 0.0 if levels is not None else to_bpd * _log_det(scaling[0], D),
            "decoder": decoder.describe(), "dtype": str(y.dtype).removeprefix("torch."),
            "bound": "LSGM bound (Vahdat et al. 2021, eq. 3) E_q log P(x|z) + E_q log p_ODE(z) "
                     f"+ H[q(z|x)], K={K} draws of z per image, in bits per data dimension; "
                     + kind}
    return bpd, info


__all__ = ["DecoderLikelihood", "fit_decoder_variance", "latent_bits_per_dim"]
