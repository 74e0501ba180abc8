"""Log-likelihood and bits/dim via the probability-flow ODE (Song et al. 2021, Sec. 4.3, App. D).

The probability-flow ODE ``dx/dt = f~(x, t) = f(x, t) - g(t)^2 score(x, t) / 2`` (eq. 13) carries
p_eps to p_T; with the instantaneous change of variables (eq. 39-40; Chen et al. 2018)

    log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt,

so integrating the state (x, Delta log p) jointly from eps to T and evaluating the prior at
z = x(T) gives log p_eps(x) in nats. As in the reference, p_T is taken to be the prior pi: the
value is the log-density of the model whose time-T marginal is pi, which differs from the true
log p_eps by log pi(z) - log p_T(z) (the SDE's truncation; e.g. ~1e-3 nats/dim for VE with
sigma_max = 50 on data of spread 4). The solve runs in torchdiffeq on the data's device; the ODE
function does no host synchronisation. Divergences come from the estimators in ``divergence``.

Error control is per sample: torchdiffeq's default RMS norm over the whole batched state would
dilute one sample's error by sqrt(B), so the solver here uses, for each sample, the larger of the
RMS error of its x and the error of its Delta log p, and the worst sample sets the step. ``rtol``
and ``atol`` therefore bound every sample's local error, whatever the batch size.

Likelihood functions receive a ``score_fn(x, t)``, never a model (layer rule): build it with
``models.utils.get_score_fn(sde, model, train=False, continuous=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchdiffeq import odeint

import sde_lib
from score_sde.discrete_diffusion import (
    CDFS,
    RespacedProcess,
    check_variance,
    network_eps_and_v,
    prior_bpd,
    reverse_v,
    vb_terms_bpd,
)
from score_sde.divergence import DIVERGENCES, batched_vjp, get_divergence
from score_sde.utils import InverseScaler, ScoreFn, bounded_odeint_options

#: Adaptive torchdiffeq solvers, and the scipy names the reference uses for them.
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
SCIPY_METHODS = {"RK45": "dopri5", "RK23": "bosh3", "DOP853": "dopri8"}


def _solver_name(method: str) -> str:
    name = SCIPY_METHODS.get(method, method)
    if name not in ADAPTIVE_METHODS:
        valid = ", ".join([*ADAPTIVE_METHODS, *SCIPY_METHODS])
        raise ValueError(f"Unknown ODE method {method!r}; valid: {valid}")
    return name


def _per_sample_norm(D: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Norm of the scaled error (B, D + K): max over samples of max(RMS_x, max_k |dlogp_k|)."""

    def norm(err: torch.Tensor) -> torch.Tensor:
        x_err = err[:, :D].pow(2).mean(dim=1).sqrt()
        logp_err = err[:, D:].abs().amax(dim=1)
        return torch.maximum(x_err, logp_err).amax()

    return norm


def _check_data(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B, *D) with B >= 1, got {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has non-finite values")


def _check_score_fn(score_fn) -> None:
    if isinstance(score_fn, torch.nn.Module):
        raise TypeError(
            "pass a score_fn(x, t), not a model: build it with "
            "models.utils.get_score_fn(sde, model, train=False, continuous=...)"
        )
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")


def _check_solver(sde, rtol, atol, eps) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and 0 < value < 1):
            raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    if not (isinstance(eps, (int, float)) and 0 < eps < sde.T):
        raise ValueError(f"eps must be in (0, T={sde.T}), got {eps!r}")


def log_likelihood(
    sde: sde_lib.SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    divergence: str = "rademacher",
    num_probes: int = 1,
    antithetic: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Per-sample log p_eps(x) in nats via the probability-flow ODE (Song et al. 2021, eq. 13, 40).

    Args:
        sde: the forward SDE; its ``reverse(score_fn, probability_flow=True)`` gives the drift.
        score_fn: ``score_fn(x (B, *D), t (B,)) -> (B, *D)``; samples must not interact.
        x: data at time eps, (B, *D), on any device.
        divergence: a name in ``divergence.DIVERGENCES`` ('exact', 'rademacher', 'gaussian',
            'hutchpp').
        num_probes: probes K per sample, all in one batched backward pass.
        antithetic: draw probes in sign-split pairs (see ``divergence._antithetic``).
        rtol, atol: per-sample tolerances of the adaptive solver (see the module docstring).
        method: an adaptive torchdiffeq method or a scipy name ('RK45' -> 'dopri5').
        eps: start time of the integration (the likelihood is that of p_eps).
        generator: draws the probes (on x's device).

    The score is called only at t in [eps, T], the range a network is trained on: T is a step
    boundary of the solver and its first step is fixed (``utils.bounded_odeint_options``), so
    torchdiffeq neither steps past T and interpolates back nor probes beyond T for its first
    step. The ODE itself is unchanged (no clamping of t), so z = x(T) is the exact flow's.

    Returns:
        logp (B,) and ``info`` with ``nfe`` (score evaluations, each one forward pass), ``stderr``
        (B,) (the spread over the K per-probe estimates / sqrt(K); 0 for 'exact', NaN when one
        probe gives no spread), ``z`` (B, *D), ``prior_logp`` (B,), ``delta_logp`` (B,).
    """
    _check_score_fn(score_fn)
    _check_data(x)
    _check_solver(sde, rtol, atol, eps)
    solver = _solver_name(method)
    estimator = get_divergence(divergence, num_probes, antithetic)
    B, D = x.shape[0], x[0].numel()
    probes = estimator.probes(x, generator)  # (K, B, *D)
    K_out = estimator.num_outputs
    nfe = 0

    def counted_score_fn(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return score_fn(xt, t)

    drift_fn = sde.reverse(counted_score_fn, probability_flow=True).sde

    def ode_func(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        vec_t = t.expand(B)
        with torch.enable_grad():
            xt = state[:, :D].reshape(x.shape).detach().requires_grad_(True)
            drift = drift_fn(xt, vec_t)[0]
        div = estimator(batched_vjp(drift, xt), probes)  # (B, K_out)
        return torch.cat([drift.detach().reshape(B, D), div], dim=1)  # (B, D + K_out)

    state = torch.cat([x.reshape(B, D), x.new_zeros(B, K_out)], dim=1)
    time_grid = torch.tensor([eps, sde.T], dtype=x.dtype, device=x.device)
    # T is a step boundary and the first step is set, so the score is never called outside
    # [eps, T] (the network's trained range); see utils.bounded_odeint_options.
    options = {**bounded_odeint_options(time_grid), "norm": _per_sample_norm(D)}
    with torch.no_grad():
        state = odeint(ode_func, state, time_grid, rtol=rtol, atol=atol, method=solver,
                       options=options)[-1]
    z = state[:, :D].reshape(x.shape)
    delta = state[:, D:]  # (B, K_out): one integrated estimate per probe
    prior_logp = sde.prior_logp(z)
    delta_logp = delta.mean(dim=1)
    if estimator.exact:
        stderr = torch.zeros_like(delta_logp)
    elif K_out == 1:
        stderr = torch.full_like(delta_logp, math.nan)
    else:
        stderr = delta.std(dim=1) / math.sqrt(K_out)
    info = {"nfe": nfe, "stderr": stderr, "z": z, "prior_logp": prior_logp,
            "delta_logp": delta_logp}
    return prior_logp + delta_logp, info


# -- data scaling, dequantization and bits/dim -------------------------------------------------


def affine_scaler(inverse_scaler: InverseScaler) -> tuple[float, float]:
    """(a, c) of the scaler y = a x + c that ``inverse_scaler`` undoes (checked to be affine).

    Centred data (inverse y -> (y + 1)/2) gives (2, -1); uncentred (identity) gives (1, 0).
    """
    probe = torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64)
    v = inverse_scaler(probe)
    slope = float(v[1] - v[0])
    affine = abs(float(v[2]) - float(v[0]) - 0.25 * slope) <= 1e-9
    if not math.isfinite(slope) or slope == 0 or not affine:
        raise ValueError(f"inverse_scaler must be affine and invertible; maps 0, 1, 0.25 to "
                         f"{v.tolist()}")
    a = 1.0 / slope
    return a, -a * float(v[0])


def dequantize(
    data: torch.Tensor,
    n_bits: int = 8,
    *,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform dequantization (Ho et al. 2019; Song et al. 2021, App. D): (k + u) / 2^b in [0, 1).

    Args:
        data: (B, *D) integer levels k in {0, ..., 2^b - 1}, or floats on the grid k / (2^b - 1)
            in [0, 1] (the ``ToTensor`` convention).
        n_bits: bit depth b.
        num_samples: S independent draws of u ~ U[0, 1)^D per datum.
        generator: draws u (on data's device).
    Returns:
        (S, B, *D) dequantized data in [0, 1).
    """
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 1 <= n_bits <= 16:
        raise ValueError(f"n_bits must be an integer in [1, 16], got {n_bits!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    top = 2**n_bits - 1
    if torch.is_floating_point(data):
        k = torch.round(data * top)
        if (data * top - k).abs().max() > 1e-3:
            raise ValueError(f"float data must lie on the {n_bits}-bit grid k / {top}")
        dtype = data.dtype
    else:
        k, dtype = data, torch.get_default_dtype()
    if k.min() < 0 or k.max() > top:
        raise ValueError(f"levels must lie in [0, {top}] for n_bits={n_bits}")
    u = torch.rand((num_samples, *data.shape), generator=generator, device=data.device,
                   dtype=dtype)
    return (k.to(dtype) + u) / 2**n_bits


def bits_per_dim(
    sde: sde_lib.SDE,
    score_fn: ScoreFn,
    data: torch.Tensor,
    inverse_scaler: InverseScaler,
    *,
    n_bits: int = 8,
    num_dequant: int = 1,
    generator: torch.Generator | None = None,
    **likelihood_kwargs,
) -> tuple[torch.Tensor, dict]:
    """Bits/dim of discrete data: an upper bound from the importance-weighted dequantization bound.

    With v = k + u in [0, 2^b)^D and the model's density p_y on the scaled data y = a v / 2^b + c,
    log p_v(v) = log p_y(y) + D log(a / 2^b). For S draws u_s ~ U[0, 1)^D (Ho et al. 2019; Burda
    et al. 2016)

        log P(k) >= log (1/S) sum_s p_v(k + u_s)      (S = 1: the usual dequantization bound),

    tighter as S grows; the returned bits/dim is ``-bound / (D log 2)``, so it is an upper bound
    on the model's discrete bits/dim (with Hutchinson divergences it is noisy, and exp of the
    noise biases the S > 1 bound slightly; prefer 'exact' or many probes with S > 1).

    Args:
        sde, score_fn: as in :func:`log_likelihood`.
        data: (B, *D) discrete data (integer levels or floats on the grid k / (2^b - 1)).
        inverse_scaler: maps model space back to [0, 1] (centred: (y + 1) / 2); must be affine.
        n_bits: bit depth b of the data.
        num_dequant: S dequantization draws per datum, solved as one batch of S·B.
        generator: draws the dequantization noise, then the probes.
        **likelihood_kwargs: passed to :func:`log_likelihood` (divergence, num_probes, rtol, ...).
    Returns:
        bpd (B,) and ``info`` with ``nfe``, ``log_prob_bound`` (B,) (the bound on log P(k) in nats),
        ``log_probs`` (S, B) (log p_v per draw), ``stderr`` (S, B) (nats, per draw), ``z``
        (S, B, *D) and ``bound`` (a description).
    """
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] < 1:
        raise ValueError(f"data must be a (B, *D) tensor, got {getattr(data, 'shape', data)!r}")
    a, c = affine_scaler(inverse_scaler)
    S, B, D = num_dequant, data.shape[0], data[0].numel()
    y = a * dequantize(data, n_bits, num_samples=S, generator=generator) + c  # (S, B, *D)
    logp, info = log_likelihood(sde, score_fn, y.flatten(0, 1), generator=generator,
                                **likelihood_kwargs)
    log_probs = logp.reshape(S, B) + D * (math.log(abs(a)) - n_bits * math.log(2))
    bound = torch.logsumexp(log_probs, dim=0) - math.log(S)
    out = {
        "nfe": info["nfe"],
        "log_prob_bound": bound,
        "log_probs": log_probs,
        "stderr": info["stderr"].reshape(S, B),
        "z": info["z"].reshape(S, *data.shape),
        "bound": f"importance-weighted uniform dequantization bound, S={S} "
                 f"(bits/dim is an upper bound on -log2 P(x) / D)",
    }
    return -bound / (D * math.log(2)), out


def nats_per_dim(
    sde: sde_lib.SDE,
    score_fn: ScoreFn,
    data: torch.Tensor,
    inverse_scaler: InverseScaler | None = None,
    **likelihood_kwargs,
) -> tuple[torch.Tensor, dict]:
    """Negative log-density per dimension, in nats, of continuous data (no dequantization).

    ``data`` (B, *D) is in data space; the model sees y = a x + c from ``inverse_scaler`` (None:
    the identity), so -(log p_y(y) + D log |a|) / D is returned with the ``log_likelihood`` info.
    """
    _check_data(data, "data")
    a, c = (1.0, 0.0) if inverse_scaler is None else affine_scaler(inverse_scaler)
    D = data[0].numel()
    logp, info = log_likelihood(sde, score_fn, a * data + c, **likelihood_kwargs)
    return -(logp + D * math.log(abs(a))) / D, info


def _discrete_data(data: torch.Tensor, levels: int) -> torch.Tensor:
    """Quantised data as floats u in [0, 1] on the grid k / (L - 1): from integer levels k, or
    floats already on that grid (checked)."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2 (256 for 8-bit data) or None for "
                         f"continuous data, got {levels!r}")
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] < 1:
        raise ValueError(f"data must be a (B, *D) tensor, got {getattr(data, 'shape', data)!r}")
    top = levels - 1
    if torch.is_floating_point(data):
        k = torch.round(data * top)
        if not bool(torch.isfinite(data).all()) or (data * top - k).abs().max() > 1e-3:
            raise ValueError(f"float data must lie on the grid k / {top} of {levels} levels in "
                             "[0, 1]")
        u = data
    else:
        k, u = data, data.to(torch.get_default_dtype()) / top
    if k.min() < 0 or k.max() > top:
        raise ValueError(f"levels must lie in [0, {top}] for levels={levels}")
    return u


def vlb_bits_per_dim(
    sde: sde_lib.SDE,
    score_fn: ScoreFn,
    data: torch.Tensor,
    inverse_scaler: InverseScaler | None = None,
    *,
    levels: int | None = 256,
    spacing: str | int | None = None,
    variance: str | None = None,
    clip_denoised: bool = False,
    cdf: str = "tanh",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Bits/dim from the variational bound of the discrete diffusion (Ho et al. 2020, eq. 5;
    Nichol & Dhariwal 2021, Sec. 3.1 and Table 2), on any respacing of the SDE's DDPM table.

    Per image, L_T + sum_{i >= 1} L_{i-1} + L_0 with every x_i drawn from q(x_{k_i} | x_0)
    independently, one batched network call per kept step (as the official ``calc_bpd_loop``):
    an upper bound on -log2 P(x) / D of quantised data (the decoder L_0 is the discretized
    Gaussian of ``levels`` levels), or on -log2 p(x) / D of continuous data (``levels=None``:
    a Gaussian decoder density). Noisy by the draws of x_i; its mean over images is the bound.

    Args:
        sde: an SDE with a DDPM table (``discrete_vpsde``, ``vpsde``; discrete models).
        score_fn: the model's ``score_fn``; a learned-variance model's ``eps_and_v`` gives v.
        data: (B, *D): quantised data as integer levels or floats on the grid k / (L - 1) in
            [0, 1] (as :func:`bits_per_dim`); continuous data (``levels=None``) in data space.
        inverse_scaler: maps model space back to data space (affine; None: the identity), as
            :func:`bits_per_dim`. Centred data (model space [-1, 1]) is the official setting.
        levels: number of data levels L (256 for 8-bit images, 17 for the 8x8 digits), or None.
        spacing: the kept steps (:func:`score_sde.discrete_diffusion.space_timesteps`), e.g.
            '100' or 'ddim50'; None: every step of the table.
        variance: 'learned' (the model's v), 'large' (Sigma = beta'), 'small' (Sigma = beta~),
            or None: learned when the model returns v, else large (as the ``ddpm`` sampler).
        clip_denoised: clip x0_hat to [-1, 1] (the official bits/dim use True for centred
            images; default False, which any model space allows).
        cdf: the decoder's normal CDF, 'tanh' (the official approximation) or 'exact'.
        generator: draws the x_i (on data's device).
    Returns:
        bpd (B,) and ``info`` with ``nfe`` (network evaluations: one per kept step),
        ``terms`` (B, n) (the bits/dim of L_{i-1} at kept step i; i = 0 is the decoder),
        ``prior_bpd`` (B,), ``spacing``, ``timesteps`` (the kept steps), ``variance`` (as run),
        ``levels``, ``cdf`` and ``bound`` (a description).
    """
    _check_score_fn(score_fn)
    check_variance(variance)
    if cdf not in CDFS:
        raise ValueError(f"Unknown cdf {cdf!r}; valid: {', '.join(CDFS)}")
    if not isinstance(clip_denoised, bool):
        raise TypeError(f"clip_denoised must be a bool, got {clip_denoised!r}")
    a, c = (1.0, 0.0) if inverse_scaler is None else affine_scaler(inverse_scaler)
    if levels is None:
        _check_data(data, "data")
        u = data
    else:
        u = _discrete_data(data, levels)
    y = a * u + c  # (B, *D) in model space
    process = RespacedProcess.from_sde(sde, spacing)
    times = sde.index_to_time(process.timesteps.to(torch.float64)).to(y)  # (n,)
    affine = None if (a, c) == (2.0, -1.0) else (a, c)
    B = y.shape[0]
    terms = y.new_zeros(B, process.n)
    ran = variance
    with torch.no_grad():
        for i in range(process.n):
            noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
            x_t = process.q_sample(y, i, noise)
            eps, v = network_eps_and_v(score_fn, process, x_t, times[i].expand(B), i)
            ran, v = reverse_v(ran, v, score_fn)
            terms[:, i] = vb_terms_bpd(process, eps, v, y, x_t, i, clip_denoised=clip_denoised,
                                       levels=levels, cdf=cdf, data_affine=affine)
        prior = prior_bpd(process, y)
    bpd = terms.sum(dim=1) + prior
    if levels is None:  # the density of x = (y - c) / a: -log2 p_x = -log2 p_y - D log2 |a|
        bpd = bpd - math.log2(abs(a))
    what = (f"discretized decoder, {levels} levels, {cdf} CDF: an upper bound on -log2 P(x) / D"
            if levels is not None else "Gaussian decoder: an upper bound on -log2 p(x) / D")
    info = {
        "nfe": process.n * getattr(score_fn, "nfe_per_call", 1),
        "terms": terms,
        "prior_bpd": prior,
        "spacing": str(sde.N) if spacing is None else str(spacing),
        "timesteps": process.timesteps.tolist(),
        "variance": ran,
        "levels": levels,
        "cdf": cdf,
        "bound": f"variational bound (Ho et al. 2020, eq. 5) on {process.n} of {sde.N} steps, "
                 + what,
    }
    return bpd, info


def get_likelihood_fn(
    sde: sde_lib.SDE,
    inverse_scaler: InverseScaler,
    hutchinson_type: str = "Rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    eps: float = 1e-5,
    *,
    n_bits: int = 8,
    num_probes: int = 1,
) -> Callable[[ScoreFn, torch.Tensor], tuple[torch.Tensor, torch.Tensor, int]]:
    """The reference's likelihood function: ``likelihood_fn(score_fn, data) -> (bpd, z, nfe)``.

    ``data`` is already dequantized and scaled to model space (as the reference's evaluation
    pipeline feeds it), so bpd = -(log p_y(data) + D log a) / (D log 2) + n_bits, which is the
    reference's offset ``7 - inverse_scaler(-1)`` for 8 bits (7 centred, 8 uncentred).

    Args:
        sde, inverse_scaler: the SDE and the data scaler's inverse (affine).
        hutchinson_type: 'Rademacher' or 'Gaussian' as in the reference, or any registered
            divergence name (case-insensitive), e.g. 'exact' or 'hutchpp'.
        rtol, atol, eps: as in :func:`log_likelihood`.
        method: 'RK45' (the reference's, run as torchdiffeq 'dopri5') or an adaptive method.
        n_bits: bit depth of the data; num_probes: Hutchinson probes per sample.
    Returns:
        ``likelihood_fn(score_fn, data, generator=None)`` returning bpd (B,), z (B, *D), nfe.
        Pass a ``score_fn``; wrap a network with ``models.utils.get_score_fn`` first.
    """
    divergence = hutchinson_type.lower() if isinstance(hutchinson_type, str) else hutchinson_type
    if divergence not in DIVERGENCES:
        raise ValueError(f"Unknown hutchinson_type {hutchinson_type!r}; valid: Rademacher, "
                         f"Gaussian, {', '.join(DIVERGENCES.names())}")
    _check_solver(sde, rtol, atol, eps)
    _solver_name(method)
    a, _ = affine_scaler(inverse_scaler)

    def likelihood_fn(score_fn: ScoreFn, data: torch.Tensor,
                      generator: torch.Generator | None = None):
        logp, info = log_likelihood(sde, score_fn, data, divergence=divergence,
                                    num_probes=num_probes, rtol=rtol, atol=atol, method=method,
                                    eps=eps, generator=generator)
        D = data[0].numel()
        bpd = -(logp + D * math.log(abs(a))) / (D * math.log(2)) + n_bits
        return bpd, info["z"], info["nfe"]

    return likelihood_fn
