"""Forward SDEs, their marginals, priors, discretisations, reverse SDE and probability-flow ODE.

Every SDE here is linear in x with a Gaussian transition from data (Song et al. 2021, eq. 5 and
App. B): ``x_t = m(t) x_0 + s(t) z`` with ``z ~ N(0, I)``. The marginal coefficients m(t), s(t),
the log-SNR ``lambda(t) = log(m(t)^2 / s(t)^2)`` and its inverse are explicit accessors, so fast
samplers can work on every SDE through them. Public names and constructor arguments are those of the
reference implementation (yang-song/score_sde_pytorch).
"""

from __future__ import annotations

import abc
import math
import numbers

import torch

from score_sde.utils import Registry, ScoreFn, as_batch_time, batch_mul

SDES = Registry("SDE")
register_sde = SDES.register


def get_sde(name: str, **kwargs) -> SDE:
    """Build a registered SDE by its config name (``vpsde``, ``subvpsde``, ``vesde``, ...)."""
    return SDES.get(name)(**kwargs)


def _check_n(N: int) -> int:
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"N must be an integer >= 1, got {N!r}")
    return N


def _check_positive(name: str, value: float) -> float:
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class SDE(abc.ABC):
    """Abstract forward SDE ``dx = f(x, t) dt + g(t) dw`` on t in [0, T] (Song et al. 2021, eq. 5).

    Subclasses give the drift and diffusion, the marginal coefficients ``m(t)``, ``s(t)`` and the
    prior; everything else (log-SNR, reverse SDE, probability flow, Euler-Maruyama discretisation)
    is derived here.

    Attributes:
        N: number of discretisation steps (the reference's ``N``).
        model_conventions: names of the score adapters in ``models.utils`` that turn a network
            into ``score_fn(x, t)`` for continuous and discrete training (data, not code).
    """

    model_conventions: dict[str, str] = {}

    def __init__(self, N: int) -> None:
        self.N = _check_n(N)

    @property
    def T(self) -> float:
        """End time of the SDE."""
        return 1.0

    @abc.abstractmethod
    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift f(x, t) (B, *D) and diffusion g(t) (B,) of the forward SDE."""

    @abc.abstractmethod
    def marginal_coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Marginal coefficients ``(m(t), s(t))``, each shaped like ``t``: x_t = m x_0 + s z."""

    @abc.abstractmethod
    def prior_sampling(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Draw from the prior p_T of shape ``shape``."""

    @abc.abstractmethod
    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior at z (B, *D) -> (B,), in nats."""

    # -- derived quantities ------------------------------------------------------------------

    def marginal_prob(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean m(t) x (B, *D) and std s(t) (B,) of the perturbation kernel p_0t(x_t | x_0)."""
        m, s = self.marginal_coeffs(as_batch_time(t, x))
        return batch_mul(m, x), s

    def marginal_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """m(t), the scale of x_0 in x_t."""
        return self.marginal_coeffs(t)[0]

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        """s(t), the standard deviation of the noise in x_t."""
        return self.marginal_coeffs(t)[1]

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """Log signal-to-noise ratio lambda(t) = log m(t)^2 - log s(t)^2 (decreasing in t)."""
        m, s = self.marginal_coeffs(t)
        return 2.0 * (torch.log(m) - torch.log(s))

    def log_snr_inverse(self, lam: torch.Tensor) -> torch.Tensor:
        """The time t with lambda(t) = lam; generic bisection in float64 (exact to ~1e-12).

        Subclasses with a closed form override this. The loop has a fixed iteration count and
        no host synchronisation.
        """
        lam64 = lam.to(torch.float64)
        lo = torch.zeros_like(lam64)
        hi = torch.full_like(lam64, self.T)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            # lambda decreases in t: too large a lambda at mid means the root lies later.
            later = self.log_snr(mid) > lam64
            lo = torch.where(later, mid, lo)
            hi = torch.where(later, hi, mid)
        return (0.5 * (lo + hi)).to(lam.dtype)

    def discrete_table(self, name: str, device: torch.device | str,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
        """The discrete table ``name`` (e.g. ``sqrt_1m_alphas_cumprod``) on ``device`` in ``dtype``
        (None: the table's own, float64).

        Tables are built in float64 on the CPU and cast on use: a float32 step reads the table
        rounded once from float64, a float64 step reads it exactly, and a device without float64
        (MPS) receives the cast copy. The copy is made once per (device, dtype) and cached (until
        the table is replaced), so a step loop indexes a table on its own device without a
        host-to-device copy per call.
        """
        table = getattr(self, name)
        device = torch.device(device)
        dtype = table.dtype if dtype is None else dtype
        if table.device == device and table.dtype == dtype:
            return table
        cache = self.__dict__.setdefault("_device_tables", {})
        hit = cache.get((name, device, dtype))
        if hit is None or hit[0] is not table:
            # Cast on the table's device first: the target device may not hold float64.
            hit = cache[(name, device, dtype)] = (table, table.to(dtype).to(device))
        return hit[1]

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Euler-Maruyama step ``x_{i+1} = x_i + f_i + G_i z_i`` with dt = T/N (eq. 5 discretised).

        Returns:
            f (B, *D) and G (B,).
        """
        dt = self.T / self.N
        drift, diffusion = self.sde(x, as_batch_time(t, x))
        return drift * dt, diffusion * math.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (eq. 6) or, with ``probability_flow``, the probability-flow ODE
        (eq. 13) of this SDE for the given ``score_fn(x, t)``."""
        return ReverseSDE(self, score_fn, probability_flow=probability_flow)

    def probability_flow(self, score_fn: ScoreFn) -> ReverseSDE:
        """The probability-flow ODE dx = [f - g^2/2 score] dt (Song et al. 2021, eq. 13)."""
        return ReverseSDE(self, score_fn, probability_flow=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(N={self.N})"


class ReverseSDE:
    """Reverse-time SDE ``dx = [f - g^2 score] dt + g dw_bar`` (Song et al. 2021, eq. 6) or its
    probability-flow ODE ``dx = [f - g^2 score / 2] dt`` (eq. 13), integrated from T down to 0.

    Args:
        forward: the forward SDE.
        score_fn: ``score_fn(x, t) -> score``.
        probability_flow: build the ODE (diffusion zero) instead of the SDE.
    """

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False) -> None:
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = bool(probability_flow)
        self.N = forward.N
        self.T = forward.T

    @property
    def _score_factor(self) -> float:
        return 0.5 if self.probability_flow else 1.0

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift (B, *D) and diffusion (B,) of the reverse SDE or probability flow (eqs. 6, 13)."""
        t = as_batch_time(t, x)
        drift, diffusion = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        drift = drift - batch_mul(diffusion**2, score) * self._score_factor
        if self.probability_flow:
            diffusion = torch.zeros_like(diffusion)
        return drift, diffusion

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse step ``x_{i-1} = x_i - f_i + G_i^2 score + G_i z`` built from the forward
        discretisation (Song et al. 2021, eq. 46/47 and App. E): returns (rev_f, rev_G)."""
        t = as_batch_time(t, x)
        f, G = self.forward.discretize(x, t)
        score = self.score_fn(x, t)
        rev_f = f - batch_mul(G**2, score) * self._score_factor
        rev_G = torch.zeros_like(G) if self.probability_flow else G
        return rev_f, rev_G

    def __repr__(self) -> str:
        kind = "probability-flow ODE" if self.probability_flow else "reverse SDE"
        return f"ReverseSDE({self.forward!r}, {kind})"


def _standard_normal_logp(z: torch.Tensor, scale: float) -> torch.Tensor:
    """log N(z; 0, scale^2 I) summed per sample: (B, *D) -> (B,)."""
    D = z[0].numel()
    sq = z.reshape(z.shape[0], -1).pow(2).sum(dim=1)
    return -0.5 * D * math.log(2 * math.pi * scale**2) - sq / (2 * scale**2)


class _VarianceBounded(SDE):
    """Shared parts of VP-type SDEs, given beta(t) and log m(t): drift -beta(t) x / 2, standard
    normal prior, and the variance-preserving diffusion and marginals (sub-VP overrides those)."""

    def _beta(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log m(t) = -1/2 int_0^t beta(s) ds."""
        raise NotImplementedError

    def sde(self, x, t):
        """f = -beta(t) x / 2, g = sqrt(beta(t)) (Song et al. 2021, eq. 11)."""
        t = as_batch_time(t, x)
        beta_t = self._beta(t)
        return -0.5 * batch_mul(beta_t, x), torch.sqrt(beta_t)

    def marginal_coeffs(self, t):
        """m = exp(log m(t)), s = sqrt(1 - m^2) (eq. 29), via expm1 for small t."""
        log_m = self._log_mean_coeff(t)
        return torch.exp(log_m), torch.sqrt(-torch.expm1(2.0 * log_m))

    def log_snr(self, t):
        """lambda(t) = -log(exp(-2 log m) - 1), computed stably for small and large t."""
        return -torch.log(torch.expm1(-2.0 * self._log_mean_coeff(t)))

    def prior_sampling(self, shape, *, generator=None, device=None, dtype=None):
        """Draw from N(0, I) (Song et al. 2021, App. B)."""
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z):
        """log N(z; 0, I) per sample."""
        return _standard_normal_logp(z, 1.0)


class _LinearBeta(_VarianceBounded):
    """VP-type SDE with the linear schedule beta(t) = beta_min + t (beta_max - beta_min)
    (Song et al. 2021, eqs. 11-12): log m(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2."""

    def __init__(self, beta_min: float, beta_max: float, N: int) -> None:
        super().__init__(N)
        self.beta_0 = _check_positive("beta_min", beta_min)
        self.beta_1 = _check_positive("beta_max", beta_max)
        if self.beta_0 >= self.beta_1:
            raise ValueError(f"beta_min must be < beta_max, got beta_min={beta_min!r}, "
                             f"beta_max={beta_max!r}")

    def _beta(self, t):
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def _log_mean_coeff(self, t):
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def __repr__(self):
        return f"{type(self).__name__}(beta_min={self.beta_0}, beta_max={self.beta_1}, N={self.N})"


@register_sde("vpsde")
class VPSDE(_LinearBeta):
    """Variance-preserving SDE ``dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw`` with
    beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, eq. 11; the continuous DDPM).

    Its ``discretize`` is the DDPM forward step (Ho et al. 2020) with the reference's tables.
    """

    model_conventions = {"continuous": "vp_continuous", "discrete": "vp_discrete"}

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000) -> None:
        super().__init__(beta_min, beta_max, N)
        self._build_tables(torch.linspace(self.beta_0 / N, self.beta_1 / N, N,
                                          dtype=torch.float64))

    def _build_tables(self, discrete_betas: torch.Tensor) -> None:
        """The DDPM tables of the reference (index n = 0 .. N-1), kept in float64 (the reference's
        are float32; steps cast them to the input's dtype on use)."""
        self.discrete_betas = discrete_betas.to(torch.float64)
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)

    def index_to_time(self, n: torch.Tensor | float) -> torch.Tensor:
        """The time t = n T / (N - 1) of DDPM table index n in the reference's discrete
        convention (its network sees the label n = t (N - 1); the DDPM tables, not the continuous
        marginals, hold the discrete model's alpha_bar)."""
        return torch.as_tensor(n) * self.T / (self.N - 1)

    def time_to_index(self, t: torch.Tensor) -> torch.Tensor:
        """The reference's discrete label n = t (N - 1) / T (fractional between steps)."""
        return t * (self.N - 1) / self.T

    def log_snr_inverse(self, lam):
        """Closed form: solve (beta_1 - beta_0) t^2 / 2 + beta_0 t = softplus(-lam) for t."""
        delta = self.beta_1 - self.beta_0
        c = torch.nn.functional.softplus(-lam)
        return 2.0 * c / (self.beta_0 + torch.sqrt(self.beta_0**2 + 2.0 * delta * c))

    def discretize(self, x, t):
        """DDPM forward step x_{n+1} = sqrt(1 - beta_n) x_n + sqrt(beta_n) z (Ho et al. 2020, eq. 2)
        with n = floor(t (N - 1) / T), as the reference: f = (sqrt(1 - beta_n) - 1) x, G =
        sqrt(beta_n), in x's dtype.

        sqrt(1 - beta) - 1 is taken as -beta / (1 + sqrt(1 - beta)) (the same number): the
        difference cancels all but ~beta/2 of 1 (1e-3 relative error at n = 0 in float32).
        """
        t = as_batch_time(t, x)
        n = (t * (self.N - 1) / self.T).long()
        beta = self.discrete_table("discrete_betas", x.device, x.dtype)[n]  # (B,)
        f = batch_mul(-beta / (1.0 + torch.sqrt(1.0 - beta)), x)
        return f, torch.sqrt(beta)


@register_sde("cosine_vpsde")
class CosineVPSDE(VPSDE):
    """VP SDE with the cosine schedule of improved DDPM (Nichol & Dhariwal 2021, eq. 17).

    alpha_bar(t) = f(t) / f(0) with f(t) = cos^2(pi/2 (t + s) / (1 + s)), i.e.
    beta(t) = pi / (1 + s) tan(pi/2 (t + s)/(1 + s)). As in the paper, beta is clipped: the
    continuous beta(t) at ``beta_clip`` (by default the rate equal to the paper's discrete clip
    beta_n <= 0.999 at this N), after which log m(t) falls linearly, so the marginals stay exact
    and finite at t = T. The discrete DDPM table is the paper's, clipped at 0.999.
    """

    def __init__(self, N: int = 1000, s: float = 0.008, beta_clip: float | None = None) -> None:
        _check_n(N)
        self.s = _check_positive("s", s)
        if beta_clip is None:
            beta_clip = -N * math.log1p(-0.999)
        self.beta_clip = _check_positive("beta_clip", beta_clip)
        # Clip point t* where beta(t*) = beta_clip (beta grows monotonically to infinity at T).
        angle = math.atan(self.beta_clip * (1 + self.s) / math.pi)
        self._t_clip = min(angle * 2 / math.pi * (1 + self.s) - self.s, 1.0)
        self._log_f0 = self._log_f(0.0)
        SDE.__init__(self, N)
        self.beta_0, self.beta_1 = float(self._beta(torch.tensor(0.0))), self.beta_clip
        grid = torch.linspace(0, 1, N + 1, dtype=torch.float64)
        # The paper's table: min(1 - alpha_bar(t_{n+1}) / alpha_bar(t_n), 0.999) from the unclipped
        # alpha_bar = f(t) / f(0) (its last step has alpha_bar(1) = 0, so beta = 1 -> 0.999).
        alphas_bar = torch.cos(self._angle(grid)) ** 2
        betas = (1 - alphas_bar[1:] / alphas_bar[:-1]).clamp(max=0.999)
        self._build_tables(betas)

    def _angle(self, t):
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    def _log_f(self, t) -> float:
        return 2 * math.log(math.cos((t + self.s) / (1 + self.s) * math.pi / 2))

    def _beta(self, t):
        t_c = torch.clamp(t, max=self._t_clip)
        beta = math.pi / (1 + self.s) * torch.tan(self._angle(t_c))
        return torch.where(t > self._t_clip, torch.full_like(beta, self.beta_clip), beta)

    def _log_mean_coeff(self, t):
        # log m = log(alpha_bar)/2 = log cos(angle(t)) - log f(0)/2, continued linearly past t*.
        t_c = torch.clamp(t, max=self._t_clip)
        log_m = torch.log(torch.cos(self._angle(t_c))) - 0.5 * self._log_f0
        return log_m - 0.5 * self.beta_clip * torch.clamp(t - self._t_clip, min=0.0)

    def log_snr_inverse(self, lam):
        """Generic bisection (the clipped schedule has no single closed form)."""
        return SDE.log_snr_inverse(self, lam)

    def __repr__(self):
        return f"CosineVPSDE(N={self.N}, s={self.s}, beta_clip={self.beta_clip})"


BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2")


def beta_table(schedule: str, N: int, beta_start: float = 1e-4, beta_end: float = 0.02
               ) -> torch.Tensor:
    """A discrete DDPM beta table (N,) in float64, by the schedule's common name.

    * ``linear``: beta_n evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020, Sec. 4;
      DiT and ADM use 1e-4 ... 0.02 over 1000 steps);
    * ``scaled_linear``: sqrt(beta_n) evenly spaced (the latent-diffusion / Stable Diffusion table);
    * ``cosine`` (alias ``squaredcos_cap_v2``, the diffusers name): beta_n =
      min(1 - alpha_bar((n + 1)/N) / alpha_bar(n/N), 0.999) with alpha_bar(u) =
      cos^2(pi/2 (u + 0.008) / 1.008) (Nichol & Dhariwal 2021, eq. 17).
    """
    N = _check_n(N)
    if schedule in ("linear", "scaled_linear"):
        beta_start = _check_positive("beta_start", beta_start)
        beta_end = _check_positive("beta_end", beta_end)
        if not beta_start <= beta_end < 1:
            raise ValueError(f"need beta_start <= beta_end < 1, got beta_start={beta_start!r}, "
                             f"beta_end={beta_end!r}")
        if schedule == "linear":
            return torch.linspace(beta_start, beta_end, N, dtype=torch.float64)
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), N,
                              dtype=torch.float64) ** 2
    if schedule in ("cosine", "squaredcos_cap_v2"):
        u = torch.linspace(0, 1, N + 1, dtype=torch.float64)
        alpha_bar = torch.cos((u + 0.008) / 1.008 * (math.pi / 2)) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"Unknown beta schedule {schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")


@register_sde("discrete_vpsde")
class DiscreteVPSDE(_VarianceBounded):
    """A discrete DDPM beta table as a continuous-time VP SDE (the SDE view of DDPM, DiT, ADM and
    Stable Diffusion checkpoints; Song et al. 2021, App. B; Lu et al. 2022, DPM-Solver, App. D).

    Step n = 0 .. N-1 of the table sits at time t_n = (n + 1) / N and the network's time input is
    the (possibly fractional) original index n = t N - 1; t = 0 is the data (alpha_bar = 1).
    Between the knots t_k = k / N (log alpha_bar = 0 at k = 0, the table's cumulative sums after)
    log alpha_bar(t) is the monotone cubic Hermite interpolant (Fritsch & Carlson 1980; slopes the
    harmonic means of the neighbouring secants, Fritsch & Butland 1984), so

        log m(t) = log alpha_bar(t) / 2,      beta(t) = -d log alpha_bar / dt,

    alpha_bar(t_n) is the table's cumulative product exactly, and m(t), s(t), the log-SNR and
    beta(t) are continuous and monotone. A piecewise-linear log alpha_bar (as DPM-Solver's
    discrete schedule) agrees at every t_n but makes beta jump at each of them, and adaptive ODE
    solvers do not control their error across N jumps: the probability-flow bits/dim of a Gaussian
    came out 1.2e-3 nats/dim off at rtol = 1e-6 (4e-7 when stepping onto every jump, at N-fold
    cost); with the C^1 interpolant they meet their tolerance. Tables are kept in float64.

    Args:
        betas: the table (N,) in (0, 1); else built by :func:`beta_table` from the rest.
        schedule: ``linear`` | ``scaled_linear`` | ``cosine`` (= ``squaredcos_cap_v2``).
        beta_start, beta_end: ends of the (scaled) linear table.
        N: number of steps (ignored when ``betas`` is given: its length).
    """

    model_conventions = {"continuous": "vp_index", "discrete": "vp_index"}

    def __init__(self, betas: torch.Tensor | None = None, *, schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02, N: int = 1000) -> None:
        if betas is None:
            betas = beta_table(schedule, N, beta_start, beta_end)
            self.schedule = schedule
        else:
            betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
            if betas.dim() != 1 or betas.numel() < 1:
                raise ValueError(f"betas must be a non-empty 1-D table, got shape "
                                 f"{tuple(betas.shape)}")
            if not bool(torch.all((betas > 0) & (betas < 1))):
                raise ValueError("betas must lie in (0, 1) (and be finite)")
            self.schedule = "given"
        super().__init__(betas.numel())
        self.discrete_betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        # log alpha_bar at the knots t_k = k / N (N + 1,), and its slopes there (N + 1,).
        y = torch.cat([betas.new_zeros(1), torch.cumsum(torch.log1p(-betas), dim=0)])
        secant = self.N * torch.diff(y)  # (N,), all < 0
        inner = 2.0 / (1.0 / secant[:-1] + 1.0 / secant[1:])  # harmonic means
        self.log_alpha_bar_knots = y
        self.log_alpha_bar_slopes = torch.cat([secant[:1], inner, secant[-1:]])
        self.beta_0, self.beta_1 = float(-secant[0]), float(-secant[-1])

    # -- the map between table index and time -------------------------------------------------

    def index_to_time(self, n: torch.Tensor | float) -> torch.Tensor:
        """t_n = (n + 1) / N of table index n (fractional indices allowed)."""
        return (torch.as_tensor(n) + 1.0) / self.N

    def time_to_index(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input: the original, possibly fractional, index n = t N - 1."""
        return t * self.N - 1.0

    # -- schedule ------------------------------------------------------------------------------

    def _hermite(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log alpha_bar(t) and its derivative, from the cubic Hermite piece k = floor(t N)."""
        dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        y = self.discrete_table("log_alpha_bar_knots", t.device, dtype)
        d = self.discrete_table("log_alpha_bar_slopes", t.device, dtype)
        v = torch.clamp(t * self.N, 0.0, float(self.N))
        k = torch.clamp(torch.floor(v), max=self.N - 1)
        u, k = v - k, k.long()  # position in the piece, in [0, 1]
        h = 1.0 / self.N
        y0, y1, d0, d1 = y[k], y[k + 1], d[k] * h, d[k + 1] * h
        u2, u3 = u * u, u * u * u
        value = ((2 * u3 - 3 * u2 + 1) * y0 + (u3 - 2 * u2 + u) * d0
                 + (3 * u2 - 2 * u3) * y1 + (u3 - u2) * d1)
        slope = ((6 * u2 - 6 * u) * (y0 - y1) + (3 * u2 - 4 * u + 1) * d0
                 + (3 * u2 - 2 * u) * d1) * self.N
        return value, slope

    def _log_mean_coeff(self, t):
        """log m(t) = log alpha_bar(t) / 2."""
        return 0.5 * self._hermite(t)[0]

    def _beta(self, t):
        """beta(t) = -d log alpha_bar(t) / dt (continuous, piecewise quadratic)."""
        return -self._hermite(t)[1]

    def log_snr_inverse(self, lam):
        """The time of log-SNR lam: its piece by search among the knots, then bisection in it
        (float64, exact to ~1e-15 in t; fixed iteration count, no host synchronisation)."""
        target = -torch.nn.functional.softplus(-lam.to(torch.float64))  # log alpha_bar
        knots = self.discrete_table("log_alpha_bar_knots", lam.device, torch.float64)
        # knots decrease from 0: piece k has knots[k] >= target > knots[k + 1].
        k = torch.searchsorted(-knots, -target).clamp(1, self.N) - 1
        k = k.to(torch.float64)
        lo, hi = k / self.N, (k + 1) / self.N
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            later = self._hermite(mid)[0] > target  # still above the target: the root is later
            lo, hi = torch.where(later, mid, lo), torch.where(later, hi, mid)
        return (0.5 * (lo + hi)).to(lam.dtype)

    def discretize(self, x, t):
        """DDPM forward step x_{n+1} = sqrt(1 - beta_n) x_n + sqrt(beta_n) z (Ho et al. 2020,
        eq. 2) with n = round(t N - 1), the step whose time t_n is nearest: f = (sqrt(1 - beta_n)
        - 1) x (as -beta / (1 + sqrt(1 - beta)), without cancellation), G = sqrt(beta_n)."""
        t = as_batch_time(t, x)
        n = torch.round(self.time_to_index(t)).long().clamp(0, self.N - 1)
        beta = self.discrete_table("discrete_betas", x.device, x.dtype)[n]  # (B,)
        f = batch_mul(-beta / (1.0 + torch.sqrt(1.0 - beta)), x)
        return f, torch.sqrt(beta)

    def __repr__(self):
        return f"DiscreteVPSDE(schedule={self.schedule!r}, N={self.N})"


@register_sde("subvpsde")
class subVPSDE(_LinearBeta):
    """Sub-VP SDE ``dx = -beta(t) x / 2 dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw``
    (Song et al. 2021, eq. 12). Its marginal std is s(t) = 1 - m(t)^2 (eq. 29)."""

    model_conventions = {"continuous": "vp_continuous"}

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000) -> None:
        super().__init__(beta_min, beta_max, N)

    def sde(self, x, t):
        """f = -beta x / 2, g = sqrt(beta (1 - exp(-2 int beta))) (eq. 12)."""
        t = as_batch_time(t, x)
        beta_t = self._beta(t)
        discount = -torch.expm1(4.0 * self._log_mean_coeff(t))
        return -0.5 * batch_mul(beta_t, x), torch.sqrt(beta_t * discount)

    def marginal_coeffs(self, t):
        """m = exp(-1/2 int beta), s = 1 - m^2 (eq. 29)."""
        log_m = self._log_mean_coeff(t)
        return torch.exp(log_m), -torch.expm1(2.0 * log_m)

    def log_snr(self, t):
        """lambda = 2 log m - 2 log(1 - m^2)."""
        log_m = self._log_mean_coeff(t)
        return 2.0 * log_m - 2.0 * torch.log(-torch.expm1(2.0 * log_m))


@register_sde("vesde")
class VESDE(SDE):
    """Variance-exploding SDE ``dx = sqrt(d sigma^2(t)/dt) dw`` with the geometric
    sigma(t) = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021, eq. 9; continuous SMLD).

    Its ``discretize`` is the SMLD/NCSN step with the reference's ``discrete_sigmas`` table.
    """

    model_conventions = {"continuous": "ve_continuous", "discrete": "ve_discrete"}

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000) -> None:
        super().__init__(N)
        self.sigma_min = _check_positive("sigma_min", sigma_min)
        self.sigma_max = _check_positive("sigma_max", sigma_max)
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min!r}, "
                             f"sigma_max={sigma_max!r}")
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        # The reference's table, kept in float64 (steps cast it to the input's dtype on use).
        self.discrete_sigmas = torch.exp(
            torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), N,
                           dtype=torch.float64)
        )

    def _sigma(self, t):
        # sigma_min (sigma_max/sigma_min)^t through exp in float64, rounded once to t's dtype:
        # CPU pow rounds the last bit differently in batched and single-element kernels (which
        # tied adaptive samplers to the batch size), and float32 exp is 1 ulp off the reference's
        # labels; this matches them (NCSN++ VE fixture: labels and score bitwise).
        t = torch.as_tensor(t)
        wide = t.to(torch.float64) if t.dtype != torch.float64 else t
        return (self.sigma_min * torch.exp(wide * self._log_ratio)).to(t.dtype)

    def sde(self, x, t):
        """f = 0, g = sigma(t) sqrt(2 log(sigma_max / sigma_min)) (eq. 9)."""
        t = as_batch_time(t, x)
        sigma = self._sigma(t)
        return torch.zeros_like(x), sigma * math.sqrt(2 * self._log_ratio)

    def marginal_coeffs(self, t):
        """m = 1, s = sigma(t) (the reference's kernel; eq. 29 with sigma(0)^2 neglected)."""
        return torch.ones_like(t), self._sigma(t)

    def log_snr(self, t):
        """lambda = -2 log sigma(t)."""
        return -2.0 * (math.log(self.sigma_min) + t * self._log_ratio)

    def log_snr_inverse(self, lam):
        """Closed form t = (-lam / 2 - log sigma_min) / log(sigma_max / sigma_min)."""
        return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio

    def prior_sampling(self, shape, *, generator=None, device=None, dtype=None):
        """Draw from N(0, sigma_max^2 I)."""
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype) * self.sigma_max

    def prior_logp(self, z):
        """log N(z; 0, sigma_max^2 I) per sample."""
        return _standard_normal_logp(z, self.sigma_max)

    def discretize(self, x, t):
        """SMLD step x_{n+1} = x_n + sqrt(sigma_{n+1}^2 - sigma_n^2) z (Song et al. 2021, eq. 8)
        with n = floor(t (N - 1) / T) and sigma_{-1} = 0, as the reference; in x's dtype.

        The table is cast to x's dtype first, and the difference of squares is taken as
        (sigma_n - sigma_{n-1}) (sigma_n + sigma_{n-1}), whose first factor is exact for
        neighbouring entries: what remains is the entries' own rounding, amplified by
        (sigma_n + sigma_{n-1}) / (sigma_n - sigma_{n-1}) ~ 2 (N - 1) / log(sigma_max / sigma_min)
        (~230 at the defaults; halved by the square root): ~1e-14 in float64, ~1e-5 in float32.
        """
        t = as_batch_time(t, x)
        n = (t * (self.N - 1) / self.T).long()
        sigmas = self.discrete_table("discrete_sigmas", x.device, x.dtype)
        sigma = sigmas[n]  # (B,)
        adjacent = torch.where(n == 0, torch.zeros_like(sigma), sigmas[(n - 1).clamp(min=0)])
        return torch.zeros_like(x), torch.sqrt((sigma - adjacent) * (sigma + adjacent))

    def __repr__(self):
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, N={self.N})"


__all__ = [
    "SDE",
    "SDES",
    "ReverseSDE",
    "VPSDE",
    "CosineVPSDE",
    "DiscreteVPSDE",
    "BETA_SCHEDULES",
    "beta_table",
    "subVPSDE",
    "VESDE",
    "get_sde",
    "register_sde",
]
