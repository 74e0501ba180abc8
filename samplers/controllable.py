"""Controllable generation as score transforms around the one sampling loop (Song et al. 2021,
Sec. 5 and App. I): inpainting, colorization, classifier guidance and classifier-free guidance.

Each is a ``score_fn(x, t)`` built from another, so it works with every registered sampler
(predictor-corrector, probability-flow ODE, fast solvers) and the sampler's own denoising.

Inpainting and colorization replace the score of the known coordinates (in an orthogonal basis
for colorization) by the score of the forward-noised observation, -(x - m(t) y) / s(t)^2: the
known coordinates then follow the exact reverse process of a point mass at y (they reach y
exactly in the continuous limit), while the unknown ones see the score of p_t at an x whose known
part is distributed as the noised observation: the replacement method of App. I, without copying
the loop and without extra random draws. For data with independent coordinates it samples the
exact conditional. The known entries of the result are set to the observation exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import sde_lib
from samplers.base import NoiseSource, _initial_state, make_generators, sample
from score_sde.utils import ScoreFn, as_batch_time, batch_mul

#: ``log_prob_fn(x, t, y) -> log p_t(y | x)`` (B,): a time-dependent classifier.
LogProbFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: The reference's orthonormal colour transform (controllable_generation.py): column 0 is the
#: grey direction (R + G + B) / sqrt(3); ``decouple`` maps RGB to (grey, two chroma) channels.
COLOR_TRANSFORM = torch.tensor(
    [
        [5.7735014e-01, -8.1649649e-01, 4.7008697e-08],
        [5.7735026e-01, 4.0824834e-01, 7.0710671e-01],
        [5.7735026e-01, 4.0824822e-01, -7.0710683e-01],
    ],
    dtype=torch.float64,
)


def decouple(x: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) -> (grey, chroma, chroma) (B, 3, H, W): y_j = sum_i x_i M_ij."""
    return torch.einsum("bihw,ij->bjhw", x, COLOR_TRANSFORM.to(x))


def couple(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`decouple` (with M^-1, as the reference)."""
    return torch.einsum("bihw,ij->bjhw", y, torch.linalg.inv(COLOR_TRANSFORM).to(y))


def _identity(v: torch.Tensor) -> torch.Tensor:
    return v


class ReplacementScore:
    """Score transform for a linear observation: in the basis ``to_basis``, coordinates where
    ``mask`` is true are known to equal ``known``; their score becomes the score of the noised
    observation, -(x - m(t) known) / s(t)^2 (Song et al. 2021, App. I).

    Args:
        sde: the forward SDE.
        score_fn: the unconditional ``score_fn(x, t)``.
        known: observation (B, *D) in the basis.
        mask: boolean (B, *D) or broadcastable, true where known.
        to_basis, from_basis: orthogonal change of basis and its inverse (identity by default).
    """

    def __init__(self, sde, score_fn, known, mask, to_basis=None, from_basis=None) -> None:
        self.sde, self.score_fn = sde, score_fn
        self.known, self.mask = known, mask
        self.to_basis = to_basis or _identity
        self.from_basis = from_basis or _identity

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = as_batch_time(t, x)
        m, s = self.sde.marginal_coeffs(t)
        score = self.to_basis(self.score_fn(x, t))
        observed = batch_mul(-1.0 / s**2, self.to_basis(x) - batch_mul(m, self.known))
        return self.from_basis(torch.where(self.mask, observed, score))


def _conditional_sample(sde, score, known, mask, to_basis, from_basis, method, generator, seeds,
                        progress, callback, options):
    """Shared driver: x_T with its known part shifted to m(T) y, the sampler, exact replacement."""
    B = known.shape[0]
    to_basis, from_basis = to_basis or _identity, from_basis or _identity
    generator = make_generators(generator, seeds, B, known.device)
    x = _initial_state(sde, tuple(known.shape), NoiseSource(generator), known.device, known.dtype)
    m_T, _ = sde.marginal_coeffs(torch.tensor(sde.T, dtype=known.dtype, device=known.device))
    # The prior draw plus the signal m(T) y of the known part: N(m(T) y, s(T)^2) in the known
    # coordinates, up to the same prior mismatch as unconditional sampling.
    x = from_basis(to_basis(x) + torch.where(mask, m_T * known, 0.0))
    options.pop("dtype", None), options.pop("device", None)  # x_T fixes both
    x, info = sample(sde, score, x, method, generator=generator, progress=progress,
                     callback=callback, **options)
    return from_basis(torch.where(mask, known, to_basis(x))), info


def inpaint(
    sde: sde_lib.SDE,
    score_fn: ScoreFn,
    data: torch.Tensor,
    mask: torch.Tensor,
    method: str = "pc",
    *,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
    progress: bool = False,
    callback=None,
    **options,
) -> tuple[torch.Tensor, dict]:
    """Inpainting (Song et al. 2021, App. I.2) with any registered sampler.

    Args:
        sde, score_fn: as for :func:`samplers.sample`.
        data: images (B, *D); only the entries where ``mask`` is true are read.
        mask: (B, *D) or broadcastable; true (or 1) marks known entries.
        method, generator, seeds, progress, callback, **options: as for :func:`samplers.sample`.
    Returns:
        samples (B, *D) whose known entries equal ``data`` exactly, and the sampler's report.
    """
    mask = _check_mask(mask, data)
    score = ReplacementScore(sde, score_fn, data, mask)
    return _conditional_sample(sde, score, data, mask, None, None, method, generator, seeds,
                               progress, callback, options)


def colorize(
    sde: sde_lib.SDE,
    score_fn: ScoreFn,
    gray: torch.Tensor,
    method: str = "pc",
    *,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
    progress: bool = False,
    callback=None,
    **options,
) -> tuple[torch.Tensor, dict]:
    """Colorization (Song et al. 2021, App. I.3) with any registered sampler: the grey channel
    of :func:`decouple` is known, the two chroma channels are sampled.

    Args:
        gray: grey-scale images (B, 3, H, W) with equal R, G, B channels.
        others: as for :func:`inpaint`.
    Returns:
        colour images (B, 3, H, W) whose grey projection equals that of ``gray``.
    """
    if gray.dim() != 4 or gray.shape[1] != 3:
        raise ValueError(f"gray must have shape (B, 3, H, W), got {tuple(gray.shape)}")
    known = decouple(gray)
    mask = torch.zeros_like(known, dtype=torch.bool)
    mask[:, 0] = True
    score = ReplacementScore(sde, score_fn, known, mask, decouple, couple)
    return _conditional_sample(sde, score, known, mask, decouple, couple, method, generator,
                               seeds, progress, callback, options)


def _check_mask(mask: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
    try:
        torch.broadcast_shapes(mask.shape, data.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to data {tuple(data.shape)}"
        ) from None
    if mask.dtype != torch.bool:
        if not torch.all((mask == 0) | (mask == 1)):
            raise ValueError("mask must be boolean or hold only 0 and 1")
        mask = mask != 0
    return mask.to(data.device)


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 1; Song et al. 2021, eq. 14):
    score(x, t) + scale * grad_x log p_t(y | x) with a time-dependent classifier.

    At scale 1 with the exact classifier this is the score of p_t(x | y).

    Args:
        score_fn: unconditional ``score_fn(x, t)``.
        log_prob_fn: ``log_prob_fn(x, t, y) -> log p_t(y | x)`` (B,), differentiable in x.
        y: class labels, an int or (B,).
        scale: guidance scale.
    """

    def __init__(self, score_fn: ScoreFn, log_prob_fn: LogProbFn, y, scale: float = 1.0) -> None:
        self.score_fn, self.log_prob_fn = score_fn, log_prob_fn
        self.y, self.scale = y, float(scale)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = torch.as_tensor(self.y, device=x.device).expand(x.shape[0])
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob_fn(x_in, t, y).sum(), x_in)
        return self.score_fn(x, t) + self.scale * grad


class ClassifierFreeGuidance:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 in score form):
    (1 + w) score(x, t | y) - w score(x, t). Two network calls per call (one at w = 0), which
    ``nfe_per_call`` reports to the NFE counter.

    Args:
        cond_score_fn: ``score_fn(x, t)`` of the class-conditional model.
        uncond_score_fn: ``score_fn(x, t)`` of the unconditional model.
        w: guidance weight (0: the conditional model alone).
    """

    def __init__(self, cond_score_fn: ScoreFn, uncond_score_fn: ScoreFn, w: float) -> None:
        self.cond_score_fn, self.uncond_score_fn, self.w = cond_score_fn, uncond_score_fn, float(w)
        self.nfe_per_call = 1 if self.w == 0 else 2

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = self.cond_score_fn(x, t)
        if self.w == 0:
            return cond
        return torch.add(cond * (1.0 + self.w), self.uncond_score_fn(x, t), alpha=-self.w)


__all__ = [
    "COLOR_TRANSFORM",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "ReplacementScore",
    "colorize",
    "couple",
    "decouple",
    "inpaint",
]
