"""The discrete DDPM process on a (respaced) table: timestep respacing, the forward posterior and
the reverse step p(x_{i-1} | x_i) of a network's (eps, v) output (Ho et al. 2020; Nichol &
Dhariwal 2021).

Symbols: a table of N steps with betas beta_n and alpha_bar_n = prod_{m <= n} (1 - beta_m); a
respaced process keeps the steps k_0 < ... < k_{n-1} and has its own betas
beta'_i = 1 - alpha_bar_{k_i} / alpha_bar_{k_{i-1}} (alpha_bar_{k_{-1}} = 1), so its alpha_bar'_i
is alpha_bar_{k_i}: the marginals q(x_{k_i} | x_0) are those of the full table, and the network is
still called at the ORIGINAL step k_i (Nichol & Dhariwal 2021, Sec. 4). Tables are float64 on the
CPU and cast to the input's dtype and device on use (cached per device and dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import sde_lib
from score_sde.utils import append_dims

#: the tables every process holds, (n,) float64 each
TABLES = ("betas", "log_betas", "alphas_cumprod", "alphas_cumprod_prev",
          "sqrt_alphas_cumprod", "sqrt_1m_alphas_cumprod", "log_1m_alphas_cumprod",
          "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
          "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")


def _check_count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
    return value


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """The original steps a respaced process keeps, ascending (Nichol & Dhariwal 2021, Sec. 4).

    ``section_counts`` is ``"ddimK"`` (the steps ``range(0, T, s)`` for the stride s >= 1 giving
    exactly K of them, as DDIM's uniform skip) or counts, one per section (``"100"``,
    ``"10,15,20"``, an int or a sequence of ints): the T steps are split into as many sections,
    of T // len(counts) steps plus one for each of the first T % len(counts), and a section of
    ``size`` steps keeps ``count`` of them at offsets round(j (size - 1) / (count - 1)) for
    j = 0 .. count - 1 (round half to even; stride 1 when count <= 1).

    Args:
        num_timesteps: T, the steps of the original table.
        section_counts: as above.
    Returns:
        the kept steps k_0 < ... < k_{n-1} in [0, T) (n >= 1).
    Raises:
        ValueError: a malformed spec, a count above its section's size, no stride giving K steps,
            or nothing kept; naming the spec and the valid forms.
    """
    T = num_timesteps
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {T!r}")
    forms = "'ddimK', a count '100' or counts per section '10,15,20'"
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                K = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"spacing {section_counts!r} is not 'ddimK' with an integer K; "
                                 f"valid forms: {forms}") from None
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == K:
                    return list(range(0, T, stride))
            raise ValueError(f"spacing {section_counts!r}: no stride s >= 1 gives exactly {K} "
                             f"of the {T} steps in range(0, {T}, s)")
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(f"spacing {section_counts!r} is not understood; valid forms: "
                             f"{forms}") from None
    elif isinstance(section_counts, int) and not isinstance(section_counts, bool):
        counts = [section_counts]
    elif isinstance(section_counts, Sequence):
        counts = list(section_counts)
    else:
        raise TypeError(f"spacing must be a str, an int or a sequence of ints, got "
                        f"{type(section_counts).__name__}")
    counts = [_check_count(c, f"spacing {section_counts!r}: a section count") for c in counts]
    if not counts or len(counts) > T:
        raise ValueError(f"spacing {section_counts!r}: need 1 to {T} sections, got {len(counts)}")
    size_per, extra = divmod(T, len(counts))
    kept, start = [], 0
    for s, count in enumerate(counts):
        size = size_per + (1 if s < extra else 0)
        if count > size:
            raise ValueError(f"spacing {section_counts!r}: section {s} keeps {count} steps of "
                             f"its {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    if not kept:
        raise ValueError(f"spacing {section_counts!r} keeps no step")
    return kept


class RespacedProcess:
    """The DDPM forward process on the kept steps ``timesteps`` of a table, with the forward
    posterior q(x_{i-1} | x_i, x_0) (Ho et al. 2020, eqs. 6-7) and the reverse step of a
    learned-variance network (Nichol & Dhariwal 2021, eqs. 13, 15).

    Index i = 0 .. n-1 is the step of the respaced process; ``timesteps[i]`` = k_i is the
    original step (what the network sees). Every table is (n,) float64 (see ``TABLES``).

    Precision: tables are exact float64 and cast to the input's dtype on use. The official
    improved-DDPM / DiT code instead rounds every table entry it reads to float32 (and takes the
    prior's exp in float32), even when it evaluates in float64, which moves its numbers by ~1e-7
    relative; ``coefficient_dtype=torch.float32`` reproduces that arithmetic exactly (to compare
    with its outputs), None (the default) keeps the input's precision.

    Args:
        alphas_cumprod: alpha_bar_n of the full table (N,), decreasing in (0, 1].
        timesteps: kept steps (n,) of the table, ascending; default all N.
        coefficient_dtype: the dtype table entries are read in (None: the input's).
    """

    def __init__(self, alphas_cumprod: torch.Tensor | Sequence[float],
                 timesteps: Sequence[int] | torch.Tensor | None = None, *,
                 coefficient_dtype: torch.dtype | None = None) -> None:
        if coefficient_dtype is not None and not (isinstance(coefficient_dtype, torch.dtype)
                                                  and coefficient_dtype.is_floating_point):
            raise TypeError(f"coefficient_dtype must be a floating torch.dtype or None, got "
                            f"{coefficient_dtype!r}")
        self.coefficient_dtype = coefficient_dtype
        full = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if full.dim() != 1 or full.numel() < 1 or not bool(((full > 0) & (full <= 1)).all()):
            raise ValueError("alphas_cumprod must be a non-empty 1-D table in (0, 1]")
        self.num_timesteps_original = full.numel()
        k = torch.arange(full.numel()) if timesteps is None else torch.as_tensor(
            timesteps).detach().cpu().long().reshape(-1)
        if k.numel() < 1 or int(k.min()) < 0 or int(k.max()) >= full.numel() or \
                bool((k.diff() <= 0).any()):
            raise ValueError(f"timesteps must be ascending steps in [0, {full.numel()}), got "
                             f"{k.tolist()[:8]}{'...' if k.numel() > 8 else ''}")
        self.timesteps = k  # (n,) int64: k_i
        abar = full[k]  # alpha_bar'_i = alpha_bar_{k_i}
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        betas = 1.0 - abar / abar_prev  # beta'_i
        self.betas = betas
        self.log_betas = torch.log(betas)
        self.alphas_cumprod, self.alphas_cumprod_prev = abar, abar_prev
        self.sqrt_alphas_cumprod = torch.sqrt(abar)
        self.sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - abar)
        self.log_1m_alphas_cumprod = torch.log1p(-abar)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / abar)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / abar - 1.0)
        # beta~_i = beta'_i (1 - alpha_bar'_{i-1}) / (1 - alpha_bar'_i) (Ho et al. 2020, eq. 7);
        # it is 0 at i = 0, so the "clipped" log takes entry 1 there (beta'_0 for a 1-step process).
        var = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_variance = var
        first = var[1:2] if var.numel() > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, var[1:]]))
        self.posterior_mean_coef1 = betas * torch.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * torch.sqrt(1.0 - betas) / (1.0 - abar)
        self._cast: dict = {}

    @classmethod
    def from_sde(cls, sde: sde_lib.SDE, spacing: str | int | Sequence[int] | None = None, *,
                 coefficient_dtype: torch.dtype | None = None) -> RespacedProcess:
        """The process of ``sde``'s DDPM table (``DiscreteVPSDE`` or ``VPSDE``: an SDE with
        ``alphas_cumprod`` and ``index_to_time``) respaced by ``spacing`` (see
        :func:`space_timesteps`; None keeps all N steps).

        Raises:
            ValueError: an SDE without a DDPM table (naming it), or a bad spacing.
        """
        check_ddpm_sde(sde)
        steps = None if spacing is None else space_timesteps(sde.N, spacing)
        return cls(sde.alphas_cumprod, steps, coefficient_dtype=coefficient_dtype)

    @property
    def n(self) -> int:
        """Number of steps n of the respaced process."""
        return self.timesteps.numel()

    def table(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Table ``name`` (n,) on x's device in x's dtype (or ``coefficient_dtype``), cast once
        per (device, dtype)."""
        dtype = self.coefficient_dtype or x.dtype
        key = (name, x.device, dtype)
        if key not in self._cast:
            # cast on the CPU first: the device may not hold float64 (MPS)
            self._cast[key] = getattr(self, name).to(dtype).to(x.device)
        return self._cast[key]

    def at(self, name: str, i: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """Entry i of table ``name`` for data x (B, *D): (B, 1, ..., 1) for steps i (B,), a 0-d
        tensor for an int i; in x's dtype (or ``coefficient_dtype``) on x's device."""
        values = self.table(name, x)
        if isinstance(i, int):
            return values[i]
        return append_dims(values[i.to(x.device).long()], x.dim())

    # -- the forward process ---------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, i: torch.Tensor | int, noise: torch.Tensor
                 ) -> torch.Tensor:
        """x_i = sqrt(alpha_bar'_i) x_0 + sqrt(1 - alpha_bar'_i) noise (Ho et al. 2020, eq. 4)."""
        return self.at("sqrt_alphas_cumprod", i, x0) * x0 + \
            self.at("sqrt_1m_alphas_cumprod", i, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor | int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance beta~_i and clipped log-variance of q(x_{i-1} | x_i, x_0) (Ho et al.
        2020, eqs. 6-7): mean = coef1_i x_0 + coef2_i x_i with coef1 = beta'_i sqrt(alpha_bar'_
        {i-1}) / (1 - alpha_bar'_i), coef2 = (1 - alpha_bar'_{i-1}) sqrt(alpha'_i) /
        (1 - alpha_bar'_i). x0, x_t (B, *D); i (B,) or an int. The variances broadcast
        ((B, 1, ..., 1)); the log-variance at i = 0 is that of i = 1 (clipped)."""
        mean = self.at("posterior_mean_coef1", i, x_t) * x0 + \
            self.at("posterior_mean_coef2", i, x_t) * x_t
        return (mean, self.at("posterior_variance", i, x_t),
                self.at("posterior_log_variance_clipped", i, x_t))

    def predict_x0(self, x_t: torch.Tensor, i: torch.Tensor | int, eps: torch.Tensor
                   ) -> torch.Tensor:
        """x0_hat = sqrt(1 / alpha_bar'_i) x_i - sqrt(1 / alpha_bar'_i - 1) eps (Ho et al. 2020,
        eq. 4 solved for x_0)."""
        return self.at("sqrt_recip_alphas_cumprod", i, x_t) * x_t - \
            self.at("sqrt_recipm1_alphas_cumprod", i, x_t) * eps

    def log_variance(self, v: torch.Tensor | float, i: torch.Tensor | int, x: torch.Tensor
                     ) -> torch.Tensor:
        """log Sigma_i = frac log beta'_i + (1 - frac) log beta~_i (clipped) with frac =
        (v + 1) / 2, v not clamped (Nichol & Dhariwal 2021, eq. 15); v = +1 gives the fixed
        'large' Sigma = beta'_i, v = -1 the 'small' Sigma = beta~_i. Shaped like x (B, *D)."""
        frac = (v + 1.0) / 2.0
        log_var = frac * self.at("log_betas", i, x) + \
            (1.0 - frac) * self.at("posterior_log_variance_clipped", i, x)
        return log_var.expand(x.shape) if log_var.shape != x.shape else log_var

    def p_mean_variance(self, eps: torch.Tensor, v: torch.Tensor | float | None,
                        x_t: torch.Tensor, i: torch.Tensor | int, *,
                        clip_denoised: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reverse step p(x_{i-1} | x_i) = N(mean, exp(log_variance)) of a network's raw
        output at the original step k_i (Nichol & Dhariwal 2021, eqs. 13 and 15).

        x0_hat = sqrt(1 / alpha_bar'_i) x_i - sqrt(1 / alpha_bar'_i - 1) eps (clipped to
        [-1, 1] with ``clip_denoised``); mean = the posterior mean of q(x_{i-1} | x_i, x0_hat)
        (:meth:`q_posterior`); log_variance = :meth:`log_variance` of v.

        Args:
            eps: predicted noise (B, *D) (the first C output channels).
            v: the variance interpolation (B, *D) (the last C channels), or a number: +1 the
                fixed 'large' Sigma = beta', -1 the 'small' Sigma = beta~ (None is refused).
            x_t: the state x_i (B, *D).
            i: the respaced step (B,) int64, or an int.
            clip_denoised: clip x0_hat to [-1, 1] (off, as DiT samples).
        Returns:
            mean (B, *D), log_variance (B, *D), x0_hat (B, *D).
        """
        if v is None:
            raise ValueError("v is None: pass the network's v, or +1 ('large') / -1 ('small')")
        x0_hat = self.predict_x0(x_t, i, eps)
        if clip_denoised:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(x0_hat, x_t, i)
        return mean, self.log_variance(v, i, x_t), x0_hat

    def __repr__(self) -> str:
        return (f"RespacedProcess(n={self.n} of {self.num_timesteps_original} steps, "
                f"k={self.timesteps.tolist()[:3]}...{self.timesteps.tolist()[-1:]})")


def check_ddpm_sde(sde: sde_lib.SDE) -> None:
    """Raise ``ValueError`` unless ``sde`` carries a DDPM table and the index/time map
    (``alphas_cumprod``, ``index_to_time``: ``DiscreteVPSDE``, ``VPSDE``), naming it."""
    if not (hasattr(sde, "alphas_cumprod") and hasattr(sde, "index_to_time")):
        raise ValueError(f"{type(sde).__name__} has no DDPM table (alphas_cumprod and "
                         "index_to_time); the discrete diffusion needs discrete_vpsde or vpsde")
    betas = sde.discrete_betas
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(f"{sde!r}: its DDPM table has betas outside (0, 1) (largest "
                         f"{float(betas.max()):.3g}; a VPSDE's beta_n reaches beta_max / N), so it "
                         "is no discrete diffusion: use more steps N")


def spacing_steps(sde: sde_lib.SDE, spacing: str | int | Sequence[int] | None) -> int:
    """The number of steps ``spacing`` keeps of ``sde``'s table (N for None)."""
    return sde.N if spacing is None else len(space_timesteps(sde.N, spacing))

