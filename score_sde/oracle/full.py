"""Gaussian mixtures with full, possibly singular, covariances: exact marginals and posteriors.

For data ``x_0 ~ sum_k w_k N(mu_k, Sigma_k)`` and a linear SDE with kernel x_t = m(t) x_0 + s(t) z
(Song et al. 2021, eq. 29), the time-t marginal is ``sum_k w_k N(m mu_k, m^2 Sigma_k + s^2 I)``.
With Sigma_k = U_k diag(lambda_k) U_k^T (one eigendecomposition, float64) every marginal
covariance is U_k diag(m^2 lambda_k + s^2) U_k^T, so log-densities and scores at any t cost a
rotation, without a factorisation per call.

A linear observation y = A x + n, n ~ N(0, R) (R = 0 allowed) gives the posterior x | y, again a
mixture (Bishop 2006, eqs. 2.113-2.117 per component, in the gain form of a Kalman update, which
needs no inverse of R; the weights by Bayes' rule):

    S_k = A Sigma_k A^T + R,   G_k = Sigma_k A^T S_k^+,
    mu_k|y = mu_k + G_k (y - A mu_k),   Sigma_k|y = Sigma_k - G_k A Sigma_k,
    w_k|y  propto  w_k N(y; A mu_k, S_k).

S_k^+ is the pseudo-inverse (eigenvalues below ``RANK_RTOL`` times the largest are zero), so
A need not have full row rank and R = 0 needs no jitter. With R = 0, Sigma_k|y is singular: its
null space is range(A^T) and every component lives on the affine subspace {x: A x = y}; the
data log-density (t = None) is then the density on that subspace (pseudo-determinant and
pseudo-inverse, Rao 1973, Sec. 8a.4), while at t > 0 every marginal has a density in R^D. Noise
conditioning augmentation at level s, y_s = m(s) A x + sigma(s) eps, is the observation
A' = m(s) A, R = sigma(s)^2 I (:meth:`FullGaussianMixture.condition_augmented`).

A mixture may carry a leading batch of N rows (one posterior per observed y): means (N, K, D) and
weights (N, K) with shared covariances; data x (N, D) is then evaluated row by row, and N = 1
broadcasts to any batch.
"""

from __future__ import annotations

import math

import torch

import sde_lib
from score_sde.oracle.diagonal import GaussianMixture
from score_sde.utils import ScoreFn, as_batch_time

#: Eigenvalues below this fraction of a matrix's largest are treated as exactly zero.
RANK_RTOL = 1e-10


def _eigh_psd(cov: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues (..., D) >= 0 with the numerically zero ones exactly 0, eigenvectors
    (..., D, D)) of symmetric PSD matrices; ``ValueError`` for clearly indefinite ones."""
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    lam, U = torch.linalg.eigh(cov)
    top = lam.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(lam.dtype).tiny)
    if bool((lam < -1e-8 * top).any()):
        raise ValueError(f"{name} must be positive semi-definite; smallest eigenvalue "
                         f"{float(lam.min()):.3g}")
    lam = torch.where(lam > RANK_RTOL * top, lam, torch.zeros_like(lam))
    return lam, U


def area_downsampling_matrix(channels: int, height: int, width: int, factor: int) -> torch.Tensor:
    """The matrix A (C h w, C H W) of area averaging by ``factor`` (``avg_pool2d`` with kernel and
    stride ``factor``) on row-major flattened (C, H, W) images: y = A x, float64."""
    if height % factor or width % factor or factor < 1:
        raise ValueError(f"factor {factor} must divide height {height} and width {width}")
    h, w = height // factor, width // factor
    A = torch.zeros(channels, h, w, channels, height, width, dtype=torch.float64)
    for c in range(channels):
        for i in range(h):
            for j in range(w):
                A[c, i, j, c, i * factor:(i + 1) * factor, j * factor:(j + 1) * factor] = \
                    1.0 / factor**2
    return A.reshape(channels * h * w, channels * height * width)


class FullGaussianMixture:
    """A mixture of K Gaussians N(mu_k, Sigma_k) in D dimensions with full, possibly singular
    covariances, exact time-t marginals and exact posteriors under linear observations.

    Args:
        weights: (K,) positive weights (normalised here), or (N, K) for a batch of N mixtures.
        means: (K, D) means mu_k, or (N, K, D).
        covs: (K, D, D) symmetric positive semi-definite covariances Sigma_k (shared by the rows).

    Data may have any event shape of size D, e.g. (B, D) or (B, C, H, W); scores come back in the
    input's shape. With N > 1 rows, x must have B = N (row b is evaluated under mixture b).
    """

    def __init__(self, weights, means, covs) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if means.dim() not in (2, 3):
            raise ValueError(f"means must have shape (K, D) or (N, K, D), got {tuple(means.shape)}")
        K, D = means.shape[-2:]
        if weights.shape != means.shape[:-1] or not bool((weights > 0).all()) \
                or not bool(torch.isfinite(weights).all()):
            raise ValueError(f"weights must be positive finite with shape {tuple(means.shape[:-1])}"
                             f", got shape {tuple(weights.shape)}")
        if covs.shape != (K, D, D):
            raise ValueError(f"covs must have shape (K, D, D)=({K}, {D}, {D}), got "
                             f"{tuple(covs.shape)}")
        if not bool(torch.isfinite(means).all()) or not bool(torch.isfinite(covs).all()):
            raise ValueError("means and covs must be finite")
        log_w = torch.log(weights)
        self._set(log_w - torch.logsumexp(log_w, -1, keepdim=True), means,
                  *_eigh_psd(covs, "covs"))

    def _set(self, log_weights, means, eigvals, eigvecs) -> None:
        # Stored with a leading batch dimension N (1 for a single mixture).
        self.batched = means.dim() == 3
        self.log_weights = log_weights if self.batched else log_weights[None]  # (N, K)
        self.means = means if self.batched else means[None]  # (N, K, D)
        self.eigvals, self.eigvecs = eigvals, eigvecs  # (K, D), (K, D, D): Sigma_k = U L U^T
        self._cast: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    @classmethod
    def _from_parts(cls, log_weights, means, eigvals, eigvecs) -> FullGaussianMixture:
        self = cls.__new__(cls)
        self._set(log_weights - torch.logsumexp(log_weights, -1, keepdim=True), means, eigvals,
                  eigvecs)
        return self

    @classmethod
    def from_diagonal(cls, gm: GaussianMixture) -> FullGaussianMixture:
        """A diagonal :class:`GaussianMixture` as a full one: Sigma_k = diag(sigma_k^2)."""
        return cls(gm.weights, gm.means, torch.diag_embed(gm.stds**2))

    # -- properties ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Data dimension D."""
        return self.means.shape[-1]

    @property
    def n_modes(self) -> int:
        """Number of components K."""
        return self.means.shape[-2]

    @property
    def batch_size(self) -> int:
        """Number of mixtures N (1 for a single one)."""
        return self.means.shape[0]

    @property
    def covs(self) -> torch.Tensor:
        """Sigma_k (K, D, D), float64."""
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(-1, -2)

    @property
    def weights(self) -> torch.Tensor:
        """w_k (K,), or (N, K) for a batch."""
        w = self.log_weights.exp()
        return w if self.batched else w[0]

    def _rows(self, B: int, device) -> torch.Tensor:
        """Index (B,) of each data row's mixture: all 0 for N = 1, else 0..N-1 (B must be N)."""
        N = self.batch_size
        if N == 1:
            return torch.zeros(B, dtype=torch.long, device=device)
        if B != N:
            raise ValueError(f"a batch of {N} mixtures evaluates {N} data rows, got {B}")
        return torch.arange(B, device=device)

    def _params_like(self, x: torch.Tensor):
        """(means, log weights, eigvals, eigvecs) on x's device and dtype, cast once."""
        key = (x.device, x.dtype)
        if key not in self._cast:
            self._cast[key] = tuple(p.to(x) for p in (self.means, self.log_weights,
                                                       self.eigvals, self.eigvecs))
        return self._cast[key]

    # -- sampling -----------------------------------------------------------------------------

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
               return_labels: bool = False):
        """Draw n data points x_0 = mu_k + U_k sqrt(lambda_k) z (n, D) (row b from mixture b in a
        batch of n mixtures), and their labels (n,) if asked; singular Sigma_k are allowed."""
        rows = self._rows(n, "cpu")
        probs = self.log_weights.exp()  # (N, K)
        if self.batch_size == 1:
            labels = torch.multinomial(probs[0], n, replacement=True, generator=generator)
        else:
            labels = torch.multinomial(probs, 1, generator=generator)[:, 0]
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scaled = self.eigvals[labels].sqrt() * z  # (n, D) in the eigenbasis
        x = self.means[rows, labels] + torch.einsum("nij,nj->ni", self.eigvecs[labels], scaled)
        x = x.to(device=device, dtype=dtype)
        return (x, labels.to(device)) if return_labels else x

    def sample_marginal(self, n: int, sde: sde_lib.SDE, t: float, *,
                        generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> torch.Tensor:
        """Exact draws of p_t: x_t = m(t) x_0 + s(t) z (n, D)."""
        x0 = self.sample(n, generator=generator, dtype=torch.float64)
        m, s = sde.marginal_coeffs(torch.tensor(float(t), dtype=torch.float64))
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (m * x0 + s * z).to(device=device, dtype=dtype)

    # -- exact densities ----------------------------------------------------------------------

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x[0].numel() != self.dim:
            raise ValueError(f"data of shape {tuple(x.shape)} does not have D={self.dim} dims per "
                             "sample")
        return x.reshape(x.shape[0], self.dim)

    def _rotated(self, xf: torch.Tensor, t, sde):
        """z = U_k^T (x - m mu_k) (B, K, D), marginal variances m^2 lambda_k + s^2 (B, K, D) in
        the eigenbasis, and log w_k (B, K)."""
        means, log_w, lam, U = self._params_like(xf)
        rows = self._rows(xf.shape[0], xf.device)
        means, log_w = means[rows], log_w[rows]  # (B, K, D), (B, K)
        if sde is None:
            if t is not None:
                raise ValueError("a time t needs the sde to define p_t")
            var = lam[None].expand(xf.shape[0], -1, -1)
            diff = xf[:, None, :] - means
        else:
            m, s = sde.marginal_coeffs(as_batch_time(t, xf))
            m, s = m[:, None, None], s[:, None, None]
            var = m**2 * lam[None] + s**2
            diff = xf[:, None, :] - m * means
        return torch.einsum("kdj,bkd->bkj", U, diff), var, log_w

    def component_log_prob(self, x: torch.Tensor, t: torch.Tensor | float | None = None,
                           sde: sde_lib.SDE | None = None) -> torch.Tensor:
        """log w_k + log N(x; m mu_k, m^2 Sigma_k + s^2 I) for every component: (B, K).

        Where a covariance is singular (t = None, or s(t) = 0), the density is the one on its
        support (pseudo-inverse and pseudo-determinant; every component must then have the same
        rank, as the posterior components of :meth:`condition` do: all live on {A x = y})."""
        xf = self._flat(x)
        z, var, log_w = self._rotated(xf, t, sde)
        support = var > 0
        rank = support.sum(-1)  # (B, K)
        if bool((rank != self.dim).any()) and bool((rank != rank[:, :1]).any()):
            raise ValueError("the components' covariances have different ranks here: their "
                             "densities on different supports do not mix; use t > 0")
        safe = torch.where(support, var, torch.ones_like(var))
        quad = torch.where(support, z**2 / safe, torch.zeros_like(z)).sum(-1)
        log_det = torch.log(safe).sum(-1)
        return log_w - 0.5 * (quad + log_det + rank.to(z.dtype) * math.log(2 * math.pi))

    def log_prob(self, x: torch.Tensor, t: torch.Tensor | float | None = None,
                 sde: sde_lib.SDE | None = None) -> torch.Tensor:
        """Exact log p_t(x) (B,) in nats; the data density (on its support) when t, sde are None."""
        return torch.logsumexp(self.component_log_prob(x, t, sde), dim=1)

    def class_log_posterior(self, x: torch.Tensor, t=None, sde=None) -> torch.Tensor:
        """Exact log p_t(k | x) (B, K)."""
        logits = self.component_log_prob(x, t, sde)
        return logits - torch.logsumexp(logits, dim=1, keepdim=True)

    def score(self, x: torch.Tensor, t: torch.Tensor | float, sde: sde_lib.SDE) -> torch.Tensor:
        """Exact score grad_x log p_t(x) = -sum_k p_t(k | x) (m^2 Sigma_k + s^2 I)^-1 (x - m mu_k)
        (B, *D); needs t > 0 (s(t) > 0), where every marginal covariance is invertible."""
        if sde is None or t is None:
            raise ValueError("the score needs a time t > 0 and its sde (the data density may be "
                             "singular)")
        xf = self._flat(x)
        z, var, log_w = self._rotated(xf, t, sde)
        quad = (z**2 / var).sum(-1)
        logits = log_w - 0.5 * (quad + torch.log(var).sum(-1))
        resp = torch.softmax(logits, dim=1)  # p_t(k | x) (B, K)
        _, _, _, U = self._params_like(xf)
        per_component = torch.einsum("kdj,bkj->bkd", U, z / var)  # (B, K, D)
        return -(resp[:, :, None] * per_component).sum(1).reshape(x.shape)

    def score_fn(self, sde: sde_lib.SDE) -> ScoreFn:
        """``score_fn(x, t)`` of the exact marginal score under ``sde``."""

        def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.score(x, t, sde)

        return score_fn

    # -- linear maps and observations ---------------------------------------------------------

    def _check_matrix(self, A) -> torch.Tensor:
        A = torch.as_tensor(A, dtype=torch.float64)
        if A.dim() != 2 or A.shape[1] != self.dim or not bool(torch.isfinite(A).all()):
            raise ValueError(f"A must be a finite (M, D={self.dim}) matrix, got shape "
                             f"{tuple(A.shape)}")
        return A

    def linear_map(self, A) -> FullGaussianMixture:
        """The law of A x: the mixture of N(A mu_k, A Sigma_k A^T) with the same weights (e.g. the
        low-resolution marginal of a cascade's base stage)."""
        A = self._check_matrix(A)
        means = self.means @ A.T  # (N, K, M)
        covs = A @ self.covs @ A.T
        lam, U = _eigh_psd(covs, "A Sigma_k A^T")
        if self.batched:
            return FullGaussianMixture._from_parts(self.log_weights, means, lam, U)
        return FullGaussianMixture._from_parts(self.log_weights[0], means[0], lam, U)

    def condition(self, A, y, noise_cov=None) -> FullGaussianMixture:
        """The exact posterior x | y for y = A x + n, n ~ N(0, R) (module docstring), one mixture
        per observation.

        Args:
            A: (M, D) observation matrix (any rank).
            y: observations (M,) or a batch (N, M) (or (N, *shape) of size M per row).
            noise_cov: R: None or 0 (noise-free), a float r (R = r I) or an (M, M) PSD matrix.
        Returns:
            the posterior mixture: single for y (M,), batched with N rows for y (N, M).
        Raises:
            ValueError: shapes, a negative R, or a y of zero likelihood under every component
                (off the support of A x when R is singular).
        """
        if self.batched:
            raise ValueError("condition a single mixture (not a batch of posteriors)")
        A = self._check_matrix(A)
        M = A.shape[0]
        y = torch.as_tensor(y, dtype=torch.float64)
        single = y.dim() == 1
        y = y.reshape(1 if single else y.shape[0], -1)
        if y.shape[1] != M:
            raise ValueError(f"y must have M={M} entries per row (A is {tuple(A.shape)}), got "
                             f"{y.shape[1]}")
        R = self._noise_cov(noise_cov, M)
        Sigma, mu, log_w = self.covs, self.means[0], self.log_weights[0]  # (K,D,D) (K,D) (K,)
        S = A @ Sigma @ A.T + R  # (K, M, M)
        lam_S, V = _eigh_psd(S, "A Sigma_k A^T + R")
        inv_lam = torch.where(lam_S > 0, 1.0 / lam_S.clamp(min=1e-300), torch.zeros_like(lam_S))
        S_pinv = V @ torch.diag_embed(inv_lam) @ V.transpose(-1, -2)
        G = Sigma @ A.T @ S_pinv  # (K, D, M) gains
        resid = y[:, None, :] - (mu @ A.T)[None]  # (N, K, M)
        post_means = mu[None] + torch.einsum("kdm,nkm->nkd", G, resid)
        post_covs = Sigma - G @ A @ Sigma
        # log N(y; A mu_k, S_k) on S_k's support (pseudo-determinant), -inf off it
        rz = torch.einsum("kmj,nkm->nkj", V, resid)  # (N, K, M) in S_k's eigenbasis
        support = lam_S > 0
        rank = support.sum(-1)  # (K,)
        quad = (rz**2 * inv_lam[None]).sum(-1)
        log_det = torch.log(torch.where(support, lam_S, torch.ones_like(lam_S))).sum(-1)
        log_lik = -0.5 * (quad + log_det + rank.to(quad.dtype) * math.log(2 * math.pi))
        off = (torch.where(support[None], torch.zeros_like(rz), rz).abs()
               > 1e-8 * (1.0 + resid.abs().amax(-1, keepdim=True))).any(-1)
        log_lik = torch.where(off, torch.full_like(log_lik, -math.inf), log_lik)
        if bool((rank != rank[0]).any()):
            raise ValueError("A Sigma_k A^T + R has different ranks across components: the "
                             "likelihoods N(y; A mu_k, S_k) are densities on different supports")
        log_post = log_w[None] + log_lik  # (N, K)
        if not bool(torch.isfinite(log_post).any(-1).all()):
            raise ValueError("some y has zero likelihood under every component (off the support "
                             "of A x + n)")
        lam, U = _eigh_psd(post_covs, "the posterior covariances")
        if single:
            return FullGaussianMixture._from_parts(log_post[0], post_means[0], lam, U)
        return FullGaussianMixture._from_parts(log_post, post_means, lam, U)

    def condition_augmented(self, A, y_s, aug_sde: sde_lib.SDE,
                            level: float) -> FullGaussianMixture:
        """The exact posterior x | y_s under noise conditioning augmentation at ``level``:
        y_s = m(s) A x + sigma(s) eps is the observation A' = m(s) A, R = sigma(s)^2 I
        (Ho, Saharia et al. 2022, Sec. 4.2); level 0 is the noise-free y = A x."""
        if float(level) == 0.0:
            return self.condition(A, y_s)
        m, s = aug_sde.marginal_coeffs(torch.tensor(float(level), dtype=torch.float64))
        return self.condition(float(m) * self._check_matrix(A), y_s, noise_cov=float(s) ** 2)

    @staticmethod
    def _noise_cov(noise_cov, M: int) -> torch.Tensor:
        if noise_cov is None:
            return torch.zeros(M, M, dtype=torch.float64)
        R = torch.as_tensor(noise_cov, dtype=torch.float64)
        if R.dim() == 0:
            if not float(R) >= 0:
                raise ValueError(f"noise_cov must be >= 0, got {float(R)}")
            return float(R) * torch.eye(M, dtype=torch.float64)
        if R.shape != (M, M):
            raise ValueError(f"noise_cov must be a scalar or ({M}, {M}), got {tuple(R.shape)}")
        _eigh_psd(R, "noise_cov")
        return 0.5 * (R + R.T)

    def __repr__(self) -> str:
        batch = f", N={self.batch_size}" if self.batched else ""
        return f"FullGaussianMixture(K={self.n_modes}, D={self.dim}{batch})"
