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

import math
from collections.abc import Callable, Sequence
from numbers import Real

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
    (1 + w) score(x, t | y) - w score(x, t).

    In DiT's convention (Peebles & Xie 2023) the guided output is eps_u + s (eps_c - eps_u) with
    scale s (1.5 for FID, 4.0 for pictures); since the score is -eps / s(t) sample by sample,
    that is this formula with **w = s - 1** (s = 1, w = 0: the conditional model alone; s = 0,
    w = -1: the unconditional one).

    Two ways to evaluate it:

    * two functions, ``ClassifierFreeGuidance(cond_score_fn, uncond_score_fn, w)``: two network
      calls per call (one at w = 0), ``nfe_per_call`` = 2;
    * batched, :meth:`batched` ``(score_fn, w)``: one function evaluated on a doubled batch whose
      first half carries the class labels and whose second half the null label (the caller
      binds both, e.g. ``models.utils.get_score_fn(..., class_labels=cat([y, null]))``); each
      call evaluates it once on ``cat([x, x])``, ``cat([t, t])`` and combines the halves.
      ``nfe_per_call`` = 1: one network evaluation, of a 2B batch, which costs about twice a
      plain evaluation of B in compute and memory (the NFE counts network calls, not samples).

    ``channels`` = n guides channels 0..n-1 of dim 1 only; the other channels are the conditional
    half's own output. ``official_dit=True`` is ``channels=3``, the official DiT
    ``forward_with_cfg`` (guidance on three channels, kept there "for exact reproducibility");
    fewer channels than n are refused. If the wrapped functions expose the learned-variance
    interface ``eps_and_v(x, t) -> (eps, v)`` (raw outputs (B, C, ...) each), so does this
    object: the guided eps (same formula, same channels) and v of the conditional half, at the
    same ``nfe_per_call``.

    Args:
        cond_score_fn: ``score_fn(x, t)`` of the class-conditional model.
        uncond_score_fn: ``score_fn(x, t)`` of the unconditional model.
        w: guidance weight (0: the conditional model alone), a finite number.
        channels: guide only channels [0, channels) (None: all).
        official_dit: the official DiT rule, ``channels=3``.
    """

    def __init__(self, cond_score_fn: ScoreFn | None = None,
                 uncond_score_fn: ScoreFn | None = None, w: float = 0.0, *,
                 channels: int | None = None, official_dit: bool = False,
                 doubled_score_fn: ScoreFn | None = None) -> None:
        pair = (cond_score_fn, uncond_score_fn)
        if doubled_score_fn is None and not all(callable(f) for f in pair):
            raise TypeError("ClassifierFreeGuidance needs cond_score_fn and uncond_score_fn "
                            "(callables), or use ClassifierFreeGuidance.batched(score_fn, w)")
        if doubled_score_fn is not None and (not callable(doubled_score_fn)
                                             or any(f is not None for f in pair)):
            raise TypeError("the batched mode takes one callable score_fn of the doubled batch "
                            "and no cond_score_fn / uncond_score_fn")
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w):
            raise ValueError(f"w must be a finite number (w = s - 1 for DiT's scale s), got {w!r}")
        if not isinstance(official_dit, bool):
            raise TypeError(f"official_dit must be True or False, got {official_dit!r}")
        if official_dit:
            if channels not in (None, 3):
                raise ValueError(f"official_dit=True guides channels 0-2 (channels=3); got "
                                 f"channels={channels!r} as well")
            channels = 3
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int)
                                     or channels < 1):
            raise ValueError(f"channels must be None (all) or an integer >= 1, got {channels!r}")
        self.cond_score_fn, self.uncond_score_fn = cond_score_fn, uncond_score_fn
        self.doubled_score_fn = doubled_score_fn
        self.w, self.channels, self.official_dit = float(w), channels, official_dit
        self.batched_mode = doubled_score_fn is not None
        self.nfe_per_call = 1 if self.batched_mode or self.w == 0 else 2
        wrapped = (doubled_score_fn,) if self.batched_mode else pair
        if all(hasattr(f, "eps_and_v") for f in wrapped):
            self.eps_and_v = self._guided_eps_and_v

    @classmethod
    def batched(cls, score_fn: ScoreFn, w: float, *, channels: int | None = None,
                official_dit: bool = False) -> ClassifierFreeGuidance:
        """The batched mode: ``score_fn(x (2B, *D), t (2B,))`` returns the conditional scores in
        rows 0..B-1 and the unconditional ones (null label) in rows B..2B-1; one call of it per
        call (``nfe_per_call`` = 1, a 2B batch). Other arguments as the class's."""
        return cls(w=w, channels=channels, official_dit=official_dit, doubled_score_fn=score_fn)

    @property
    def sampler_report(self) -> dict:
        """Entries for the sampler's report (``samplers.sample`` adds them): the guidance."""
        return {"guidance": {"kind": "classifier_free", "w": self.w, "cfg_scale": self.w + 1.0,
                             "batched": self.batched_mode, "nfe_per_call": self.nfe_per_call,
                             "channels": "all" if self.channels is None else self.channels,
                             "official_dit": self.official_dit}}

    def _check_channels(self, x: torch.Tensor) -> None:
        if self.channels is not None and (x.dim() < 2 or x.shape[1] < self.channels):
            rule = "official_dit=True guides channels 0-2 and" if self.official_dit else \
                f"channels={self.channels}"
            raise ValueError(f"classifier-free guidance with {rule} needs at least "
                             f"{self.channels} channels (dim 1), got x of shape "
                             f"{tuple(x.shape)}")

    def _combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """(1 + w) cond - w uncond on the guided channels; cond elsewhere. (B, C, ...)."""
        guided = torch.add(cond * (1.0 + self.w), uncond, alpha=-self.w)
        if self.channels is None:
            return guided
        return torch.cat([guided[:, :self.channels], cond[:, self.channels:]], dim=1)

    def _doubled(self, fn, x: torch.Tensor, t: torch.Tensor):
        t = as_batch_time(t, x)
        return fn(torch.cat([x, x]), torch.cat([t, t]))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._check_channels(x)
        if self.batched_mode:
            cond, uncond = self._doubled(self.doubled_score_fn, x, t).chunk(2)  # (B, *D) each
            return self._combine(cond, uncond)
        cond = self.cond_score_fn(x, t)
        if self.w == 0:
            return cond
        return self._combine(cond, self.uncond_score_fn(x, t))

    def _guided_eps_and_v(self, x: torch.Tensor, t: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Guided eps and the conditional v (B, C, ...) each, from the wrapped ``eps_and_v``."""
        self._check_channels(x)
        if self.batched_mode:
            eps, v = self._doubled(self.doubled_score_fn.eps_and_v, x, t)
            eps_c, eps_u = eps.chunk(2)
            return self._combine(eps_c, eps_u), None if v is None else v.chunk(2)[0]
        eps_c, v_c = self.cond_score_fn.eps_and_v(x, t)
        if self.w == 0:
            return eps_c, v_c
        return self._combine(eps_c, self.uncond_score_fn.eps_and_v(x, t)[0]), v_c


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
