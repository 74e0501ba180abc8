"""Predictor-corrector sampling (Song et al. 2021, Alg. 1-3 and App. G).

A predictor moves x from t_i to t_{i+1} along a discretised reverse SDE (eq. 6) or, with
``probability_flow``, the probability-flow ODE (eq. 13); a corrector then runs score-based MCMC at
a fixed time. Every predictor here is data: a table of per-step coefficients (a_i, b_i, c_i) with

    x_{i+1} = a_i x_i + b_i score(x_i, t_i) + c_i z_i,    z_i ~ N(0, I),

computed once from the SDE's marginal coefficients m(t), s(t) (x_t = m x_0 + s z) and run by the
one loop of :class:`PCSampler`. Nothing here branches on the SDE's class, so VP, sub-VP, VE and any
SDE with linear drift and an affine Gaussian kernel get every predictor and corrector.
"""

from __future__ import annotations

import math

import torch

import sde_lib
from samplers.base import NoiseSource, Sampler, progress_bar, register_sampler
from score_sde.utils import Registry, ScoreFn

PREDICTORS = Registry("predictor")
CORRECTORS = Registry("corrector")
register_predictor = PREDICTORS.register
register_corrector = CORRECTORS.register

Table = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def pc_time_grid(sde: sde_lib.SDE, N: int, eps: float) -> torch.Tensor:
    """The reference's grid ``linspace(T, eps, N)`` followed by the end time 0: (N + 1,) float64.

    Step i of the sampler goes from ``grid[i]`` to ``grid[i + 1]``; the last step, from eps to 0,
    is the denoising step (noise-free when ``denoise``), so N steps cost N predictor calls.
    """
    t = torch.linspace(sde.T, eps, N, dtype=torch.float64)
    return torch.cat([t, t.new_zeros(1)])


def _kernel(sde: sde_lib.SDE, t: torch.Tensor, t_next: torch.Tensor):
    """Forward kernel x_t = r x_s + sigma z between s = t_next < t, plus the marginals.

    Returns (r, var, m_t, s_t, m_s, s_s) with r = m_t / m_s and var = s_t^2 - r^2 s_s^2, all
    shaped like ``t`` (float64).
    """
    m_t, s_t = sde.marginal_coeffs(t)
    m_s, s_s = sde.marginal_coeffs(t_next)
    r = m_t / m_s
    var = s_t**2 - r**2 * s_s**2
    return r, var.clamp(min=0.0), m_t, s_t, m_s, s_s


def _drift_and_diffusion(sde: sde_lib.SDE, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drift coefficient f(t) with f(x, t) = f(t) x, and g(t), on a grid t (n,).

    Every SDE with an affine Gaussian kernel has a drift linear in x, so one call of ``sde.sde`` on
    ones gives the coefficient.
    """
    drift, diffusion = sde.sde(t.new_ones(t.shape[0], 1), t)
    return drift[:, 0], diffusion


# -- predictors ----------------------------------------------------------------------------------


class Predictor:
    """Base predictor: one step x_{i+1} = a_i x_i + b_i score(x_i, t_i) + c_i z_i.

    Subclasses implement :meth:`coefficients` for both the reverse SDE and its probability flow.

    Class attributes:
        order: strong order of the step as a discretisation of the reverse SDE/ODE.
        nfe_per_step: score calls per step.
        stochastic: whether the reverse-SDE variant draws noise (the probability-flow variant
            never does).
        supports_probability_flow: whether a probability-flow variant exists.

    Args:
        sde: the forward SDE.
        probability_flow: discretise the probability-flow ODE (eq. 13) instead of eq. 6.
    """

    order: int = 1
    nfe_per_step: int = 1
    stochastic: bool = True
    supports_probability_flow: bool = True

    def __init__(self, sde: sde_lib.SDE, probability_flow: bool = False) -> None:
        self.sde = sde
        self.probability_flow = probability_flow

    def coefficients(self, t: torch.Tensor, t_next: torch.Tensor) -> Table:
        """(a, b, c), each (n,) float64, for steps t[i] -> t_next[i]."""
        raise NotImplementedError


@register_predictor("euler_maruyama")
class EulerMaruyamaPredictor(Predictor):
    """Euler-Maruyama on the reverse SDE (eq. 6) with dt = t_i - t_{i+1} > 0:

        x_{i+1} = x_i - f(x_i, t_i) dt + g_i^2 score dt + g_i sqrt(dt) z,

    or Euler on the probability flow (eq. 13): score weight g_i^2 dt / 2 and no noise.
    """

    def coefficients(self, t, t_next):
        dt = t - t_next
        f, g = _drift_and_diffusion(self.sde, t)
        if self.probability_flow:
            return 1.0 - f * dt, 0.5 * g**2 * dt, torch.zeros_like(t)
        return 1.0 - f * dt, g**2 * dt, g * torch.sqrt(dt)


@register_predictor("reverse_diffusion")
class ReverseDiffusionPredictor(Predictor):
    """Reverse diffusion (Song et al. 2021, eqs. 46-47): x_i = x_{i+1} - f_{i+1} + G^2 score + G z
    with the forward discretisation f_{i+1} = (r - 1) x, G^2 = s_t^2 - r^2 s_s^2 taken from the
    exact kernel between consecutive grid times (the DDPM / SMLD tables on their own grids).
    The probability-flow variant is x_i = x_{i+1} - f_{i+1} + G^2 score / 2.
    """

    def coefficients(self, t, t_next):
        r, var, *_ = _kernel(self.sde, t, t_next)
        if self.probability_flow:
            return 2.0 - r, 0.5 * var, torch.zeros_like(t)
        return 2.0 - r, var, torch.sqrt(var)


@register_predictor("ancestral_sampling")
class AncestralSamplingPredictor(Predictor):
    """Ancestral sampling from the Gaussian posterior q(x_s | x_t, x_0) of any affine Gaussian
    kernel (Ho et al. 2020 eq. 7 for VP, Song et al. 2021 eq. 47 / App. F for VE), with x_0
    predicted by Tweedie's formula x0_hat = (x_t + s_t^2 score) / m_t:

        mean = r s_s^2 / s_t^2 x_t + m_s var / s_t^2 x0_hat,   std^2 = var s_s^2 / s_t^2,

    where r = m_t / m_s and var = s_t^2 - r^2 s_s^2. Its probability-flow variant is the
    deterministic DDIM step x_s = m_s x0_hat - s_s s_t score (Song, Meng & Ermon 2021, eq. 12).
    """

    def coefficients(self, t, t_next):
        r, var, m_t, s_t, m_s, s_s = _kernel(self.sde, t, t_next)
        if self.probability_flow:
            return 1.0 / r, s_t**2 / r - s_s * s_t, torch.zeros_like(t)
        a = r * s_s**2 / s_t**2 + var / (r * s_t**2)
        return a, var / r, torch.sqrt(var * s_s**2 / s_t**2)


@register_predictor("none")
class NonePredictor(Predictor):
    """No predictor: corrector-only sampling (annealed Langevin dynamics, Song & Ermon 2019)."""

    nfe_per_step = 0
    stochastic = False

    def coefficients(self, t, t_next):
        return torch.ones_like(t), torch.zeros_like(t), torch.zeros_like(t)


# -- correctors ----------------------------------------------------------------------------------


class Corrector:
    """Base corrector: ``n_steps`` Langevin MCMC updates x <- x + eps score + sqrt(2 eps) z
    targeting p_t at the grid time t_i (Song et al. 2021, Alg. 4-5). Subclasses give the step
    size as data: a table eps_i over the grid (:meth:`step_sizes`), which :meth:`step_size` may
    adapt per sample to the current score.

    The step size is scaled by alpha_i = (m(t_i) / m(t_{i+1}))^2, the per-step alpha of the
    reference's DDPM table generalised to every SDE (1 for VE, r_i^2 for VP and sub-VP; the
    reference reads the VP table for sub-VP and crashes).

    Class attributes:
        nfe_per_step: score calls per corrector step (so n_steps * nfe_per_step per grid time).
        stochastic: whether it draws noise.

    Args:
        sde: the forward SDE.
        snr: the target signal-to-noise ratio r of the step size.
        n_steps: corrector steps per grid time.
    """

    nfe_per_step: int = 1
    stochastic: bool = True

    def __init__(self, sde: sde_lib.SDE, snr: float, n_steps: int) -> None:
        self.sde = sde
        self.snr = snr
        self.n_steps = n_steps

    def step_sizes(self, t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Langevin step sizes eps_i (n,) at grid times t (n,) with per-step alpha (n,)."""
        raise NotImplementedError

    def prepare(self, grid: torch.Tensor) -> None:
        """Precompute the step table for the grid (N + 1,): one corrector per grid time."""
        r, *_ = _kernel(self.sde, grid[:-1], grid[1:])
        self._alpha = (r**2).tolist()
        self._step = self.step_sizes(grid[:-1], r**2).tolist()

    def step_size(self, score: torch.Tensor, i: int) -> torch.Tensor | float:
        """Step size at the i-th grid time for the current score (B, *D): the table's eps_i, one
        float for every sample, unless a subclass adapts it per sample, as a tensor (B,) whose
        row k depends on row k of ``score`` alone (tensor ops only, no host sync)."""
        return self._step[i]

    def correct(
        self,
        score_fn: ScoreFn,
        x: torch.Tensor,
        t: torch.Tensor,
        i: int,
        noise: NoiseSource,
        buffer: torch.Tensor,
    ) -> torch.Tensor:
        """Apply ``n_steps`` updates at the i-th grid time t (B,) to x (B, *D) in place
        (``buffer`` shaped like x receives the noise)."""
        per_sample = (-1,) + (1,) * (x.dim() - 1)  # (B,) -> (B, 1, ..., 1)
        small = math.prod(x.shape[1:]) <= SMALL_D  # a (B, 1) broadcast over D <= 8 costs 4x a copy
        for _ in range(self.n_steps):
            score = _detached(score_fn(x, t), x)
            step = self.step_size(score, i)
            z = noise.randn_like(x, out=buffer)
            if isinstance(step, torch.Tensor):  # per sample: broadcast over (B, 1, ..., 1)
                step = step.view(per_sample)
                if small:
                    step = step.expand_as(x).contiguous()
                x.addcmul_(score, step).addcmul_(z, step.mul_(2.0).sqrt_())
            else:  # one step for the batch: scalar passes (a broadcast costs 7x in 2-D)
                x.add_(score, alpha=step).add_(z, alpha=math.sqrt(2.0 * step))
        return x


#: Up to this many entries per sample, per-sample reductions and scalings avoid torch's kernels
#: over a tiny inner dimension, which in 2-D cost 3-4x a column-by-column pass or a copy.
SMALL_D = 8


def _row_sq_norms(flat: torch.Tensor) -> torch.Tensor:
    """Squared norms (B,) of the rows of ``flat`` (B, D); row k from row k alone."""
    if flat.shape[1] > SMALL_D:
        # Fused (square-then-sum allocates a copy of the score: 2.7x slower for 32x32x3 images).
        return torch.linalg.vector_norm(flat, dim=1).square_()
    columns = flat.unbind(1)
    sq_norm = columns[0].square()
    for column in columns[1:]:
        sq_norm.addcmul_(column, column)
    return sq_norm


@register_corrector("langevin")
class LangevinCorrector(Corrector):
    """Langevin corrector (Song et al. 2021, Alg. 4) with the step adapted per sample:

        eps_k = 2 alpha r^2 clamp(D / ||score_k||^2, s^2, m^2 + s^2).

    The reference's eps = 2 alpha (r ||z|| / ||score||)^2 takes both norms as batch averages,
    which ties sample k to the rest of the batch. Here ||score_k|| is the sample's own score norm
    and ||z|| its expectation sqrt(D) (the drawn noise's ||z|| adds chi-square noise to the step
    in low D), so sample k depends on its seed alone; in high D, where norms concentrate, this is
    the reference's step. It follows the score's magnitude: for sharp data (images; mixtures
    with component std 0.01-0.03) ||score||^2 ~ D / s(t)^2 near t = 0, and a step that ignores
    it (the former t-only 2 alpha r^2 (m^2 + s^2)) diverges to NaN at r = 0.16.

    The clamp keeps the step between two t-only rules: below m^2 + s^2 (D / E||score||^2 for
    unit-variance data), so it stays finite where the score vanishes; above s^2, the step of
    ``ald``, stable for any data since -grad^2 log p_t <= I / s^2, so samples far out (large
    ||score||) keep moving (without it, corrector-only sampling of the 2-D ring leaves
    stragglers: -1e4 nats/dim under VE, as with the reference's batch rule).

    Bias: an x-dependent step eps(x) makes the Langevin chain target p_t / eps(x), here
    p_t ||score||^2 where the clamp is inactive (the Ito term grad eps is missing); for any
    Gaussian this lowers the mean log-density by exactly 1 nat at full mixing, in every D.
    Measured with ``benchmarks/langevin_step.py`` (exact mixture scores, reverse diffusion, one
    corrector step; mean log p_0 of the samples minus that of exact draws for VP / sub-VP / VE,
    in nats; two standard errors are 0.05 in 2-D, 0.5-1.0 from 64-D up):

    - sharp 64-D and 192-D data (std 0.01-0.03), r = 0.16, N = 500 and 1000: finite everywhere,
      within 0.1-1.1 nats of the reference's batch-mean rule (the t-only rule diverges);
    - the 100-D mixture of the tests: -1.1 / -1.1 / -0.7 at r = 0.03 (reference -0.8 / -0.5 /
      0.0), -2.5 / -2.4 / -2.1 at r = 0.16 (reference -1.6 / -1.5 / -1.1; t-only -16);
    - the 2-D ring: -0.3 / -0.5 / -0.7 at r = 0.05, -1.0 / -1.2 / -1.2 at r = 0.16 (reference
      and ``ald`` within 0.05; t-only -0.04 and -0.38);
    - corrector-only sampling of the ring (``benchmarks/corrector_only.py``, r = 0.05): -3 to -11
      nats/dim under VP and sub-VP, -7 to -900 under VE, where the t-only rule was within 0.1
      and the reference's batch rule is as far off (-3 to -9000).

    In low D prefer ``ald``.
    """

    def step_sizes(self, t, alpha):
        m, s = self.sde.marginal_coeffs(t)
        return 2.0 * alpha * self.snr**2 * (m**2 + s**2)

    def prepare(self, grid):
        super().prepare(grid)
        r, _, _, s, _, _ = _kernel(self.sde, grid[:-1], grid[1:])
        self._floor = (2.0 * r**2 * (self.snr * s) ** 2).tolist()  # the ald step

    def step_size(self, score, i):
        sq_norm = _row_sq_norms(score.reshape(score.shape[0], -1))  # (B,)
        D = score[0].numel()
        step = sq_norm.reciprocal_().mul_(2.0 * self._alpha[i] * self.snr**2 * D)  # inf at 0
        return step.clamp_(min=self._floor[i], max=self._step[i])


@register_corrector("ald")
class AnnealedLangevinCorrector(Corrector):
    """Annealed Langevin dynamics of NCSN (Song & Ermon 2019, Alg. 1; the reference's ``ald``):
    eps = 2 alpha (r s(t))^2, the same for every sample."""

    def step_sizes(self, t, alpha):
        _, s = self.sde.marginal_coeffs(t)
        return 2.0 * alpha * (self.snr * s) ** 2


@register_corrector("none")
class NoneCorrector(Corrector):
    """No corrector: predictor-only sampling."""

    nfe_per_step = 0
    stochastic = False

    def prepare(self, grid):
        pass

    def correct(self, score_fn, x, t, i, noise, buffer):
        return x


# -- the sampler ---------------------------------------------------------------------------------


def _detached(score: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``score``, copied if it shares memory with ``x`` (which the loop updates in place)."""
    return score.clone() if score.data_ptr() == x.data_ptr() else score


def _lookup(registry: Registry, value, base: type) -> type:
    """A registered name, or a subclass of ``base`` (the reference passes classes)."""
    if isinstance(value, type) and issubclass(value, base):
        return value
    return registry.get(value)


def _check_number(name: str, value, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value <= low:
        raise ValueError(f"{name} must be > {low}, got {value!r}")
    return float(value)


@register_sampler("pc")
class PCSampler(Sampler):
    """Predictor-corrector sampler (Song et al. 2021, Alg. 1-3): at each grid time t_i, the
    corrector's ``n_steps`` MCMC updates, then one predictor step to t_{i+1}.

    Options:
        predictor: a name in ``PREDICTORS`` (default ``'reverse_diffusion'``).
        corrector: a name in ``CORRECTORS`` (default ``'langevin'``).
        snr: corrector signal-to-noise ratio (default 0.16).
        n_steps: corrector steps per grid time (default 1).
        N: number of grid times (default ``sde.N``); grid ``linspace(T, eps, N)`` then 0.
        probability_flow: predictors discretise the probability-flow ODE (eq. 13).
        denoise: the last predictor step (eps -> 0) adds no noise, as the reference's
            ``noise_removal``; with predictor ``'none'``, one Tweedie step
            x0 = (x + s^2 score) / m at eps instead (one more score call, counted).
        eps: the last grid time before 0 (default 1e-3).

    NFE = N (nfe_per_step of the predictor + n_steps x nfe_per_step of the corrector), plus one
    for the Tweedie step of predictor ``'none'`` with ``denoise``; ``sample`` counts it exactly.
    """

    order = 1
    nfe_per_step = 1
    stochastic = True

    def __init__(
        self,
        predictor: str | type[Predictor] = "reverse_diffusion",
        corrector: str | type[Corrector] = "langevin",
        snr: float = 0.16,
        n_steps: int = 1,
        N: int | None = None,
        probability_flow: bool = False,
        denoise: bool = True,
        eps: float = 1e-3,
        **options,
    ) -> None:
        super().__init__(**options)
        self.predictor_cls = _lookup(PREDICTORS, predictor, Predictor)
        self.corrector_cls = _lookup(CORRECTORS, corrector, Corrector)
        self.snr = _check_number("snr", snr)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
        if N is not None and (isinstance(N, bool) or not isinstance(N, int) or N < 1):
            raise ValueError(f"N must be None (use sde.N) or an integer >= 1, got {N!r}")
        self.n_steps, self.N = n_steps, N
        self.probability_flow, self.denoise = bool(probability_flow), bool(denoise)
        self.eps = _check_number("eps", eps)
        pred, corr = self.predictor_cls, self.corrector_cls
        if pred.nfe_per_step == 0 and corr.nfe_per_step == 0:
            raise ValueError(
                f"predictor {predictor!r} with corrector {corrector!r} never calls the score: "
                "nothing would move x_T; choose a predictor or a corrector"
            )
        if self.probability_flow and not pred.supports_probability_flow:
            raise ValueError(
                f"predictor {predictor!r} has no probability-flow variant; use "
                "probability_flow=False or another predictor"
            )

    def check_sde(self, sde):
        if not 0.0 < self.eps < sde.T:
            raise ValueError(f"eps must lie in (0, T={sde.T}) for {sde!r}, got {self.eps}")

    def run(self, sde, score_fn, x, *, noise, progress=False, callback=None):
        """Alg. 1-3 of Song et al. 2021 with the coefficient tables of the predictor."""
        N = self.N or sde.N
        grid = pc_time_grid(sde, N, self.eps)  # (N + 1,) float64 on the CPU
        predictor = self.predictor_cls(sde, self.probability_flow)
        corrector = self.corrector_cls(sde, self.snr, self.n_steps)
        corrector.prepare(grid)
        a, b, c = (v.tolist() for v in predictor.coefficients(grid[:-1], grid[1:]))
        if self.denoise:
            c[-1] = 0.0  # noise_removal: the last step returns its noise-free mean
        predicts = predictor.nfe_per_step > 0
        times = grid.to(device=x.device, dtype=x.dtype)  # one copy, no sync inside the loop
        B = x.shape[0]
        batch_times = times[:, None].expand(-1, B).unbind(0)  # N + 1 views (B,), in one call
        x = x.clone()  # the loop updates its own copy in place; x_T stays untouched
        buffer = torch.empty_like(x)  # the correctors' noise, drawn in place
        for i in progress_bar(range(N), progress, "PC sampling"):
            t = batch_times[i]
            x = corrector.correct(score_fn, x, t, i, noise, buffer)
            if predicts:
                score = _detached(score_fn(x, t), x)
                if a[i] != 1.0:
                    x.mul_(a[i])
                x.add_(score, alpha=b[i])
                if c[i] != 0.0:  # the noise is drawn into the score, no longer needed
                    x.add_(noise.randn_like(x, out=score), alpha=c[i])
            if callback is not None:
                callback(i, times[i + 1] if predicts else t, x.clone(), None)
        if self.denoise and not predicts:
            t = times[N - 1].expand(B)
            m, s = sde.marginal_coeffs(times[N - 1])
            x = (x + s**2 * score_fn(x, t)) / m  # Tweedie: E[x_0 | x_eps]
        return x, {
            "N": N,
            "predictor": predictor_name(self.predictor_cls),
            "corrector": corrector_name(self.corrector_cls),
        }


def predictor_name(cls: type[Predictor]) -> str:
    """The registered name of a predictor class (its class name if unregistered)."""
    return next((n for n in PREDICTORS if PREDICTORS.get(n) is cls), cls.__name__)


def corrector_name(cls: type[Corrector]) -> str:
    """The registered name of a corrector class (its class name if unregistered)."""
    return next((n for n in CORRECTORS if CORRECTORS.get(n) is cls), cls.__name__)


__all__ = [
    "PREDICTORS",
    "CORRECTORS",
    "Predictor",
    "Corrector",
    "PCSampler",
    "pc_time_grid",
    "register_predictor",
    "register_corrector",
]
