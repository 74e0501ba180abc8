"""Analytic oracle: Gaussian-mixture data whose marginals under every SDE here are known exactly.

For data ``x_0 ~ sum_k w_k N(mu_k, diag(sigma_k^2))`` and a linear SDE with kernel
``x_t = m(t) x_0 + s(t) z`` (Song et al. 2021, eq. 29), the time-t marginal is again a mixture,
``p_t = sum_k w_k N(m mu_k, diag(m^2 sigma_k^2 + s^2))``, so ``log p_t(x)``, the score
``grad_x log p_t(x)`` and the class posterior ``p_t(k | x)`` have closed forms at every t. The
toolkit's tests use it as ground truth for samplers, likelihoods and losses; users get it as a toy
dataset with an exact ``score_fn``.
"""

from __future__ import annotations

import math

import torch

import sde_lib
from score_sde.utils import ScoreFn, as_batch_time


class GaussianMixture:
    """A mixture of K diagonal Gaussians in D dimensions with exact time-t marginals.

    Args:
        weights: (K,) positive mixture weights (normalised here).
        means: (K, D) component means mu_k.
        stds: (K, D), (K,) or a float: component standard deviations sigma_k (> 0).

    Data passed to the methods may have any event shape whose size is D, e.g. (B, D) or
    (B, C, H, W) with C·H·W = D; scores come back in the input's shape.
    """

    def __init__(self, weights, means, stds) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(means.shape)}")
        K, D = means.shape
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or not torch.all(weights > 0) or not torch.isfinite(weights).all():
            raise ValueError(f"weights must be {K} positive finite numbers, got {weights.tolist()}")
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.dim() == 0:
            stds = stds.expand(K, D)
        elif stds.dim() == 1:
            stds = stds[:, None].expand(K, D)
        if stds.shape != (K, D) or not torch.all(stds > 0):
            raise ValueError(
                f"stds must be positive with shape (K, D)=({K}, {D}), (K,) or scalar; got shape "
                f"{tuple(stds.shape)}, min {stds.min().item() if stds.numel() else None}"
            )
        if not torch.isfinite(means).all() or not torch.isfinite(stds).all():
            raise ValueError("means and stds must be finite")
        self.weights = weights / weights.sum()
        self.means = means
        self.stds = stds.contiguous()
        self._cast: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def _params_like(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(means (K, D), variances (K, D), log weights (K,)) on x's device and dtype, cast once
        per device and dtype (the score is called in every sampler step)."""
        key = (x.device, x.dtype)
        if key not in self._cast:
            variances = self.stds**2
            self._cast[key] = (self.means.to(x), variances.to(x), torch.log(self.weights).to(x))
        return self._cast[key]

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def ring(cls, n_modes: int = 8, radius: float = 4.0, std: float = 0.3) -> GaussianMixture:
        """``n_modes`` equal-weight isotropic modes evenly spaced on a circle in 2-D."""
        angles = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
        means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        return cls(torch.ones(n_modes), means, std)

    @classmethod
    def random(
        cls,
        dim: int,
        n_modes: int = 4,
        *,
        spread: float = 1.0,
        std_range: tuple[float, float] = (0.2, 0.6),
        seed: int = 0,
    ) -> GaussianMixture:
        """A seeded random mixture in ``dim`` dimensions: means N(0, spread^2 I), per-coordinate
        stds uniform in ``std_range``, weights uniform in [0.5, 1.5] (normalised)."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(n_modes, dim, generator=g, dtype=torch.float64)
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(n_modes, dim, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(n_modes, generator=g, dtype=torch.float64)
        return cls(weights, means, stds)

    @property
    def dim(self) -> int:
        """Data dimension D."""
        return self.means.shape[1]

    @property
    def n_modes(self) -> int:
        """Number of components K."""
        return self.means.shape[0]

    def component(self, k: int) -> GaussianMixture:
        """Component k alone, as a one-mode mixture (the class-conditional data of class k)."""
        return GaussianMixture(torch.ones(1), self.means[k : k + 1], self.stds[k : k + 1])

    # -- sampling ---------------------------------------------------------------------------

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        return_labels: bool = False,
    ):
        """Draw ``n`` data points x_0 (n, D) (and their component labels (n,) if asked)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + self.stds[labels] * z
        x = x.to(device=device, dtype=dtype)
        return (x, labels.to(device)) if return_labels else x

    def sample_marginal(
        self,
        n: int,
        sde: sde_lib.SDE,
        t: float,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Exact draws from p_t: x_t = m(t) x_0 + s(t) z (n, D)."""
        x0 = self.sample(n, generator=generator, dtype=torch.float64)
        m, s = sde.marginal_coeffs(torch.tensor(float(t), dtype=torch.float64))
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (m * x0 + s * z).to(device=device, dtype=dtype)

    # -- exact densities --------------------------------------------------------------------

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() != self.dim:
            raise ValueError(
                f"data of shape {tuple(x.shape)} has {x[0].numel()} dims per sample; "
                f"the mixture has D={self.dim}"
            )
        return x.reshape(x.shape[0], self.dim)

    def _marginal(self, x, t, sde):
        """Time-t means (B, K, D) and variances (B, K, D) on x's device and dtype."""
        means, var0, _ = self._params_like(x)
        if sde is None:
            if t is not None:
                raise ValueError("a time t needs the sde to define p_t")
            return means[None], var0[None]
        m, s = sde.marginal_coeffs(as_batch_time(t, x))
        m, s = m[:, None, None], s[:, None, None]
        return m * means[None], m**2 * var0[None] + s**2

    def component_log_prob(
        self, x: torch.Tensor, t: torch.Tensor | float | None = None, sde=None
    ) -> torch.Tensor:
        """log w_k + log N(x; m mu_k, m^2 sigma_k^2 + s^2) for every component: (B, K)."""
        xf = self._flat(x)
        means, var = self._marginal(xf, t, sde)
        diff = xf[:, None, :] - means
        log_norm = -0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(dim=-1)
        return log_norm + self._params_like(xf)[2][None]

    def log_prob(self, x: torch.Tensor, t: torch.Tensor | float | None = None, sde=None):
        """Exact log p_t(x) (B,) in nats; p_0 (the data) when ``t`` and ``sde`` are None."""
        return torch.logsumexp(self.component_log_prob(x, t, sde), dim=1)

    def class_log_posterior(self, x: torch.Tensor, t=None, sde=None) -> torch.Tensor:
        """Exact log p_t(k | x) (B, K): the time-dependent classifier for guidance."""
        logits = self.component_log_prob(x, t, sde)
        return logits - torch.logsumexp(logits, dim=1, keepdim=True)

    def score(self, x: torch.Tensor, t=None, sde=None, *, label: torch.Tensor | None = None):
        """Exact score grad_x log p_t(x), or grad_x log p_t(x | k) for per-sample ``label``.

        score = sum_k p_t(k|x) · (-(x - m mu_k) / (m^2 sigma_k^2 + s^2)).
        """
        xf = self._flat(x)
        means, var = self._marginal(xf, t, sde)
        per_component = -(xf[:, None, :] - means) / var  # (B, K, D)
        if label is None:
            resp = torch.softmax(self.component_log_prob(x, t, sde), dim=1)
        else:
            resp = torch.nn.functional.one_hot(label.to(xf.device).long(), self.n_modes).to(xf)
        return (resp[:, :, None] * per_component).sum(dim=1).reshape(x.shape)

    def score_fn(self, sde: sde_lib.SDE, label: int | torch.Tensor | None = None) -> ScoreFn:
        """``score_fn(x, t)`` of the exact marginal score under ``sde`` (optionally of class
        ``label``, an int or a per-sample (B,) tensor)."""

        def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            lab = label
            if lab is not None:
                lab = torch.as_tensor(lab, device=x.device).expand(x.shape[0])
            return self.score(x, t, sde, label=lab)

        return score_fn

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_modes}, D={self.dim})"
