"""Divergence estimators for the instantaneous change of variables (Song et al. 2021, eq. 39-40).

The log-density ODE needs ``div f(x, t) = tr(df/dx)`` of the probability-flow drift f at every
solver evaluation. Each estimator here works from ONE forward pass: it receives ``vjp`` (the
batched vector-Jacobian product of f at x, :func:`batched_vjp`) and a block of cotangent probes
drawn once before the solve, maps the whole block through ``vjp`` in one batched backward pass
(``autograd.grad(..., is_grads_batched=True)``), and returns per-probe estimates (B, K_out) whose
mean is the divergence:

* ``exact``: the D basis vectors as probes, ``sum_i (e_i^T J)_i = tr J`` (low-dimensional data);
* ``rademacher`` / ``gaussian``: Hutchinson (1989) ``v^T J v`` with E[v v^T] = I, the FFJORD
  estimator (Grathwohl et al. 2019). Rademacher's variance comes only from off-diagonal entries,
  ``sum_{i<j} (J_ij + J_ji)^2``; Gaussian adds ``2 sum_i J_ii^2``;
* ``hutchpp``: a soft Hutch++ (Meyer, Musco, Musco & Woodruff 2021) on the off-diagonal part,
  the variance-reduced mode: a third of the budget sketches the dominant off-diagonal range of J,
  whose trace is taken exactly, and the rest are Rademacher probes of the deflated remainder.
  Unbiased. It pays when the off-diagonal part of J is nearly low-rank: score Jacobians are
  ``(m^2 Cov[x_0 | x_t] / s^2 - I) / s^2`` (Tweedie), and the posterior covariance carries the
  off-diagonal energy.

Probes stay fixed over the solve, as the estimator requires (the integral of ``v^T J(t) v`` over
one path is then an unbiased estimate of the integrated trace).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from score_sde.utils import Registry

DIVERGENCES = Registry("divergence estimator")
register_divergence = DIVERGENCES.register


#: ``vjp(cotangents (K, B, *D)) -> (K, B, *D)``: K vector-Jacobian products at one point.
BatchedVJP = Callable[[torch.Tensor], torch.Tensor]


def batched_vjp(output: torch.Tensor, inputs: torch.Tensor) -> BatchedVJP:
    """VJPs of ``output`` (B, *D) w.r.t. ``inputs`` for a block of K cotangents, one backward pass.

    Plain autograd (the graph is recorded once, kept for repeated calls): no per-op wrapper cost
    beyond what one forward + one VJP costs anyway.
    """

    def vjp(cotangents: torch.Tensor) -> torch.Tensor:
        if cotangents.shape[0] == 1:
            return torch.autograd.grad(output, inputs, cotangents[0], retain_graph=True)[0][None]
        return torch.autograd.grad(output, inputs, cotangents, retain_graph=True,
                                   is_grads_batched=True)[0]

    return vjp


def get_divergence(name: str, num_probes: int = 1, antithetic: bool = False) -> Divergence:
    """The registered divergence estimator ``name`` with K = ``num_probes`` probes per sample."""
    return DIVERGENCES.get(name)(num_probes, antithetic)


class Divergence:
    """Base of the divergence estimators: draw probes once, then estimate from a batched ``vjp``.

    Subclasses override :meth:`probes` (and :meth:`__call__` when the probes are not used as
    plain Hutchinson quadratic forms).

    Args:
        num_probes: K probes (vector-Jacobian products) per sample and evaluation.
        antithetic: draw the probes in sign-split pairs (see :func:`_antithetic`).

    Class attributes:
        exact: the estimate has no Monte Carlo error (its standard error is reported as 0).
    """

    exact: bool = False

    def __init__(self, num_probes: int = 1, antithetic: bool = False) -> None:
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
        if antithetic and num_probes % 2:
            raise ValueError(f"antithetic probes come in pairs; num_probes must be even, "
                             f"got {num_probes}")
        self.num_probes = num_probes
        self.antithetic = bool(antithetic)

    @property
    def num_outputs(self) -> int:
        """Independent per-probe estimates (columns of Delta log p) integrated by the solver."""
        return self.num_probes // 2 if self.antithetic else self.num_probes

    def probes(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Cotangents (K, B, *D) drawn once per solve."""
        raise NotImplementedError

    def __call__(self, vjp: BatchedVJP, probes: torch.Tensor) -> torch.Tensor:
        """Per-probe estimates (B, num_outputs) of tr(J) at the current point."""
        # (K, B, *D) -> (K, B): v^T J v per probe, then sample-major.
        quad = (vjp(probes) * probes).flatten(2).sum(2)
        if self.antithetic:  # the mean of each pair is one independent estimate
            quad = 0.5 * (quad[: self.num_outputs] + quad[self.num_outputs :])
        return quad.T


def _signs(shape, x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1


def _antithetic(v: torch.Tensor, generator) -> torch.Tensor:
    """Pair each probe v (K/2, B, *D) with v * h, h a balanced random sign pattern per sample.

    A quadratic form cannot use v -> -v (same estimate). The pair's cross products v_i v_j
    cancel on every (i, j) that h splits, so the two estimates are negatively correlated: for
    D = 2 the pair is exact, in general the variance of the pair mean is (D - 2)/(D - 1) of two
    independent probes (a finite-population correction), a gain only for small D.
    """
    B, D = v.shape[1], v[0, 0].numel()
    ranks = torch.rand(B, D, generator=generator, device=v.device).argsort(dim=1).argsort(dim=1)
    h = torch.where(ranks < (D + 1) // 2, 1.0, -1.0).to(v.dtype).reshape(v.shape[1:])
    return torch.cat([v, v * h], dim=0)


@register_divergence("rademacher")
class Rademacher(Divergence):
    """Hutchinson's estimator with Rademacher (+-1) probes (Hutchinson 1989)."""

    def probes(self, x, generator):
        v = _signs((self.num_outputs, *x.shape), x, generator)
        return _antithetic(v, generator) if self.antithetic else v


@register_divergence("gaussian")
class Gaussian(Divergence):
    """Hutchinson's estimator with standard normal probes (Skilling 1989; FFJORD)."""

    def probes(self, x, generator):
        shape = (self.num_outputs, *x.shape)
        v = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        return _antithetic(v, generator) if self.antithetic else v


@register_divergence("exact")
class Exact(Divergence):
    """Exact trace: one vector-Jacobian product per dimension, batched in a few backward passes.

    Assumes samples do not interact inside the drift (true for any score network in eval mode):
    the cotangent e_i in every row then gives row b's Jacobian row i.
    """

    exact = True

    def __init__(self, num_probes=1, antithetic=False):
        if num_probes != 1 or antithetic:
            raise ValueError("the exact trace takes no probes: leave num_probes=1 and "
                             "antithetic=False")
        super().__init__(1, False)

    def probes(self, x, generator):
        D = x[0].numel()
        eye = torch.eye(D, device=x.device, dtype=x.dtype)  # (D, D)
        return eye[:, None, :].expand(D, x.shape[0], D).reshape(D, *x.shape)

    #: Elements per batched chunk of basis cotangents: whole (D, B, D) blocks fall out of cache
    #: (2-3x slower at D = 192, B = 200 than chunks of ~2^19 elements).
    chunk_elements = 1 << 19

    def __call__(self, vjp, probes):
        D = probes.shape[0]
        chunk = max(1, self.chunk_elements // probes[0].numel())
        rows = torch.cat([vjp(block) for block in probes.split(chunk)])  # (D, B, *D)
        rows = rows.reshape(D, probes.shape[1], D)
        return torch.diagonal(rows, dim1=0, dim2=2).sum(1, keepdim=True)  # (B, 1)


@register_divergence("hutchpp")
class HutchPlusPlus(Divergence):
    """Soft Hutch++ on the off-diagonal part: the variance-reduced mode (Meyer et al. 2021).

    Rademacher probes are exact on the diagonal, so only the off-diagonal part L of J costs
    variance. With K products: k = K // 3 sketch probes S give S^T J; removing the diagonal
    estimate d = mean_k s_k * (J^T s_k) (Bekas et al. 2007) leaves ~ L S, whose SVD gives
    directions U and singular values sigma. A soft projector P = U diag(w) U^T with
    w = sigma^2 / (sigma^2 + |d - mean d|^2) keeps strong off-diagonal directions and fades out
    where projecting would only smear a varying diagonal into new off-diagonal terms (and stays
    continuous in t, which plain QR-based Hutch++ is not when L vanishes). Then, exactly,

        tr J = sum_i (2 w_i - w_i^2) u_i^T J u_i + E_g[g'^T J g'],   g' = (I - P) g,

    with k products for the first term and m = K - 2k Rademacher probes g for the second.
    Unbiased for any P (P is independent of the g). Per-probe estimates (B, m): their mean is the
    estimate, their spread its error. One forward pass, two batched backward passes.
    """

    def __init__(self, num_probes=6, antithetic=False):
        if isinstance(num_probes, int) and num_probes < 6 or antithetic:
            raise ValueError(f"hutchpp needs num_probes >= 6 (two sketch probes at least) and no "
                             f"antithetic pairs, got num_probes={num_probes}, "
                             f"antithetic={antithetic}")
        super().__init__(num_probes, False)

    @property
    def num_outputs(self):
        return self.num_probes - 2 * (self.num_probes // 3)

    def probes(self, x, generator):
        k = self.num_probes // 3
        return _signs((k + self.num_outputs, *x.shape), x, generator)  # sketch, then residual

    def __call__(self, vjp, probes):
        k = self.num_probes // 3
        flat = probes.flatten(2)  # (k + m, B, D)
        sketch = vjp(probes[:k]).flatten(2)  # (k, B, D): S^T J
        diag = (sketch * flat[:k]).mean(dim=0)  # (B, D)
        off = (sketch - diag * flat[:k]).permute(1, 2, 0)  # (B, D, k): ~ L S, L = J - diag J
        U, sigma, _ = torch.linalg.svd(off, full_matrices=False)  # (B, D, k), (B, k)
        # Soft projector P = U diag(w) U^T: w -> 1 on strong off-diagonal directions, -> 0 where
        # projecting would only spread the (varying) diagonal into off-diagonal noise. Continuous
        # in t, so the adaptive solver sees a smooth right-hand side.
        lam2 = (diag - diag.mean(dim=1, keepdim=True)).pow(2).sum(dim=1, keepdim=True)  # (B, 1)
        w = sigma**2 / (sigma**2 + lam2 + torch.finfo(sigma.dtype).tiny)  # (B, k)
        g = flat[k:].permute(1, 2, 0)  # (B, D, m)
        g = g - U @ (w[:, :, None] * (U.transpose(1, 2) @ g))  # (I - P) g
        cot = torch.cat([U, g], dim=2).permute(2, 0, 1)  # (k + m, B, D)
        out = vjp(cot.reshape(probes.shape))
        quad = (out.flatten(2) * cot).sum(2)  # (k + m, B)
        # tr J = tr(P J P) + tr(J (P - P^2)) * 2 + tr((I - P) J (I - P)), P symmetric.
        exact_part = ((2 * w - w**2) * quad[:k].T).sum(1, keepdim=True)  # (B, 1)
        return exact_part + quad[k:].T  # (B, m)
