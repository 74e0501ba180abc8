"""Super-resolution and cascaded sampling with any sampler (Ho, Saharia et al. 2022; Saharia et
al. 2021, SR3), model-agnostic: a stage is an SDE, a score and a sampler with its options.

A super-resolution stage samples x (B, C, H, W) from p(x | y) given a low-resolution image y
(B, C, h, w) in model space. Its conditional score comes from a *score factory*
``score_factory(y_s, level) -> score_fn``, which binds the conditioning (a network adapter that
upsamples y_s and concatenates it, or the exact oracle of ``score_sde.oracle``); the bound
``score_fn(x, t)`` runs through :func:`samplers.sample` like any other, so every registered
sampler does super-resolution and the NFE is counted as usual.

Noise conditioning augmentation (Ho, Saharia et al. 2022, Sec. 4.2) happens at low resolution:
with the stage's augmentation SDE and level s (a time of that SDE),

    y_s = m(s) y + sigma(s) eps,    eps ~ N(0, I)  (same shape as y),

and the factory receives y_s and s; s = 0 means no augmentation (y_s = y, whatever sigma(0)).
Truncated conditioning augmentation (ibid., Sec. 4.3): instead of noising the previous stage's
final output, the previous stage's sampler stops at the time t* of its own SDE whose marginal
coefficients equal (m(s), sigma(s)), so its state x_{t*} is already a draw of y_s. That needs
equal marginals at s (e.g. the same SDE), a sampler that stops at an arbitrary ``eps``
(``Sampler.stops_at_eps``: the probability-flow ODE, the fast solvers, the adaptive solver; not
``pc`` or ``ddpm``, which end at t = 0), and no denoising step at its end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from numbers import Real
from typing import Any

import torch

import sde_lib
from samplers.base import (
    SAMPLERS,
    NoiseSource,
    make_generators,
    option_defaults,
    resolved_options,
    sample,
)
from score_sde.utils import ScoreFn, batch_mul

#: ``score_factory(y_s, level) -> score_fn``: y_s (B, C, h, w) the augmented low-resolution
#: conditioning in model space (None for a base stage), level (B,) its augmentation level (a time
#: of the stage's ``aug_sde``; 0 = no augmentation); the returned ``score_fn(x, t)`` has the
#: conditioning bound.
ScoreFactory = Callable[[torch.Tensor | None, torch.Tensor], ScoreFn]

#: Relative tolerance on (m, sigma) when matching an augmentation level to a previous stage's time.
_MATCH_RTOL = 1e-5


@dataclass
class Stage:
    """One stage of a cascade: what to sample (SDE, score, shape) and how (sampler, options).

    Args:
        sde: the forward SDE of this stage's score.
        shape: (C, H, W) of one sample, without the batch dimension.
        score_factory: ``score_factory(y_s, level) -> score_fn`` (see :data:`ScoreFactory`);
            required for a super-resolution stage, optional for the base stage (called with
            ``y_s = None`` and a (B,) tensor of zero levels).
        score_fn: a plain ``score_fn(x, t)`` instead of a factory: the base stage only.
        method: a registered sampler name (``samplers.SAMPLERS``).
        options: the sampler's options (``nfe``, ``eps``, ``solver``, ...).
        aug_sde: the SDE whose marginals define the augmentation of this stage's conditioning;
            None only without augmentation (``aug_level == 0``).
        aug_level: the augmentation level s, a time of ``aug_sde`` in [0, T] (0: none).
        truncate: obtain this stage's conditioning by stopping the previous stage at level s
            (truncated conditioning augmentation) instead of noising its final output.
        name: a label for reports (default ``stage<i>`` in a cascade).
    """

    sde: sde_lib.SDE
    shape: tuple[int, ...]
    score_factory: ScoreFactory | None = None
    score_fn: ScoreFn | None = None
    method: str = "ode"
    options: dict[str, Any] = field(default_factory=dict)
    aug_sde: sde_lib.SDE | None = None
    aug_level: float = 0.0
    truncate: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sde, sde_lib.SDE):
            raise TypeError(f"sde must be an sde_lib.SDE, got {type(self.sde).__name__}")
        try:
            self.shape = tuple(int(s) for s in self.shape)
        except (TypeError, ValueError):
            raise TypeError(f"shape must be (C, H, W) ints, got {self.shape!r}") from None
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be (C, H, W) with positive sizes (no batch dimension), "
                             f"got {self.shape}")
        if (self.score_factory is None) == (self.score_fn is None):
            raise ValueError("give exactly one of score_factory (any stage) and score_fn (a base "
                             "stage without conditioning)")
        for role, fn in (("score_factory", self.score_factory), ("score_fn", self.score_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{role} must be callable, got {type(fn).__name__}")
        SAMPLERS.get(self.method)  # unknown names fail here, listing the registered ones
        if not isinstance(self.options, dict):
            raise TypeError(f"options must be a dict of sampler options, got "
                            f"{type(self.options).__name__}")
        if self.aug_sde is not None and not isinstance(self.aug_sde, sde_lib.SDE):
            raise TypeError(f"aug_sde must be an sde_lib.SDE or None, got "
                            f"{type(self.aug_sde).__name__}")
        self.aug_level = check_level(self.aug_level, self.aug_sde)
        if not isinstance(self.truncate, bool):
            raise TypeError(f"truncate must be a bool, got {self.truncate!r}")

    @property
    def conditional(self) -> bool:
        """Whether the stage takes a low-resolution conditioning (it has a factory)."""
        return self.score_factory is not None


def check_level(level: Any, aug_sde: sde_lib.SDE | None) -> float:
    """An augmentation level as a float in [0, aug_sde.T]; ``ValueError`` naming it otherwise
    (a level above 0 needs an ``aug_sde``)."""
    if level is None:
        return 0.0
    if isinstance(level, bool) or not isinstance(level, Real) or not math.isfinite(level):
        raise ValueError(f"aug_level must be a finite number, got {level!r}")
    level = float(level)
    if level == 0.0:
        return level
    if aug_sde is None:
        raise ValueError(f"aug_level={level} > 0 needs an aug_sde (the SDE whose marginals "
                         "define the augmentation)")
    if not 0.0 <= level <= aug_sde.T:
        raise ValueError(f"aug_level must lie in [0, T={aug_sde.T}] of {aug_sde!r}, got {level}")
    return level


def augment(
    y: torch.Tensor,
    aug_sde: sde_lib.SDE | None,
    level: torch.Tensor,
    noise: NoiseSource,
) -> torch.Tensor:
    """Noise conditioning augmentation y_s = m(s) y + sigma(s) eps (Ho, Saharia et al. 2022,
    Sec. 4.2) at per-sample levels s (B,); rows with s = 0 keep y exactly.

    Args:
        y: low-resolution images (B, C, h, w) in model space.
        aug_sde: the augmentation SDE (None when every level is 0).
        level: (B,) levels on y's device and dtype.
        noise: the random source (row k from generator k when seeded per sample).
    Returns:
        y_s (B, C, h, w).
    """
    if aug_sde is None:
        return y
    m, sigma = aug_sde.marginal_coeffs(level)
    eps = noise.randn_like(y)
    noised = batch_mul(m, y) + batch_mul(sigma, eps)
    return torch.where((level > 0).reshape(-1, *([1] * (y.dim() - 1))), noised, y)


def truncation_time(prev_sde: sde_lib.SDE, aug_sde: sde_lib.SDE, level: float) -> float:
    """The time t* of ``prev_sde`` with the marginal coefficients (m, sigma) of ``aug_sde`` at
    ``level``: x_{t*} = m y + sigma z is then a draw of the augmented y_s (truncated
    conditioning augmentation, Ho, Saharia et al. 2022, Sec. 4.3).

    Found by the log-SNR, lambda = log m^2 / sigma^2 (``sde.log_snr_inverse``), then checked on
    (m, sigma) themselves.

    Raises:
        ValueError: no time of ``prev_sde`` has those (m, sigma) (e.g. VP against VE, or VP
            against sub-VP), or t* does not lie in (0, T).
    """
    s = torch.tensor(float(level), dtype=torch.float64)
    m_aug, sigma_aug = aug_sde.marginal_coeffs(s)
    t_star = prev_sde.log_snr_inverse(aug_sde.log_snr(s).to(torch.float64)).to(torch.float64)
    m_prev, sigma_prev = prev_sde.marginal_coeffs(t_star)
    t_star = float(t_star)
    if not (math.isclose(float(m_prev), float(m_aug), rel_tol=_MATCH_RTOL)
            and math.isclose(float(sigma_prev), float(sigma_aug), rel_tol=_MATCH_RTOL)):
        raise ValueError(
            f"truncated conditioning augmentation needs the previous stage's SDE {prev_sde!r} to "
            f"have the marginal of the augmentation SDE {aug_sde!r} at level {level}: "
            f"(m, sigma) = ({float(m_aug):.6g}, {float(sigma_aug):.6g}), but at the time "
            f"{t_star:.6g} with the same log-SNR it has ({float(m_prev):.6g}, "
            f"{float(sigma_prev):.6g}); use the same SDE for both, or truncate=False")
    if not 0.0 < t_star < prev_sde.T:
        raise ValueError(f"level {level} maps to time {t_star:.6g} of {prev_sde!r}, outside "
                         f"(0, T={prev_sde.T}); truncation needs a level inside it")
    return t_star


def stop_early_options(method: str, options: dict[str, Any], t_end: float) -> dict[str, Any]:
    """``options`` of sampler ``method`` changed to stop at time ``t_end`` without denoising.

    Raises:
        ValueError: the sampler cannot stop at an arbitrary time (``pc``, ``ddpm``: they end at
            t = 0), or its options fix another end (an explicit ``grid``).
    """
    if not SAMPLERS.get(method).stops_at_eps:
        valid = ", ".join(n for n in SAMPLERS.names() if SAMPLERS.get(n).stops_at_eps)
        raise ValueError(
            f"truncated conditioning augmentation stops the previous stage at t*={t_end:.6g}, but "
            f"its sampler {method!r} ends at t = 0; use one that stops at its eps: {valid}")
    grid = options.get("grid")
    if grid is not None and not isinstance(grid, str):
        raise ValueError("truncated conditioning augmentation sets the previous stage's end time; "
                         "its explicit grid fixes another one: pass a grid name instead")
    stopped = {**options, "eps": t_end}
    if "denoise" in option_defaults(method):
        stopped["denoise"] = False
    return stopped


def _level_tensor(level: float | torch.Tensor | None, stage: Stage, y: torch.Tensor):
    """(B,) levels on y's device and dtype from a float or a (B,) tensor; validated."""
    if not isinstance(level, torch.Tensor):
        value = check_level(stage.aug_level if level is None else level, stage.aug_sde)
        return y.new_full((y.shape[0],), value), value
    if level.shape != (y.shape[0],) or not torch.is_floating_point(level):
        raise ValueError(f"a per-sample level must be a float tensor of shape ({y.shape[0]},), "
                         f"got {tuple(level.shape)} {level.dtype}")
    T = stage.aug_sde.T if stage.aug_sde is not None else 0.0
    if not bool(((level >= 0) & (level <= T)).all()):
        raise ValueError(f"levels must lie in [0, {T}] (the aug_sde's times; 0 without aug_sde), "
                         f"got min {float(level.min())}, max {float(level.max())}")
    return level.to(y), level.tolist()


def super_resolve(
    stage: Stage,
    y_low: torch.Tensor,
    *,
    level: float | torch.Tensor | None = None,
    noised: bool = False,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    seeds: Sequence[int] | None = None,
    progress: bool = False,
    callback=None,
) -> tuple[torch.Tensor, dict]:
    """Sample x ~ p(x | y_s) for low-resolution images y with the stage's sampler (SR3, Saharia
    et al. 2021; conditioning augmentation: Ho, Saharia et al. 2022, Sec. 4.2).

    Augments ``y_low`` at the level (unless ``noised``), binds it through the stage's score
    factory and runs :func:`samplers.sample` on the stage's SDE, shape and options.

    Args:
        stage: a conditional :class:`Stage`.
        y_low: low-resolution images (B, C, h, w) in model space, C the stage's channels and
            h <= H, w <= W.
        level: the augmentation level, a float or per-sample (B,) tensor of times of
            ``stage.aug_sde`` in [0, T] (default ``stage.aug_level``).
        noised: ``y_low`` is already y_s at that level (a truncated previous stage's state): bind
            it without adding noise.
        generator, seeds, progress, callback: as for :func:`samplers.sample`; the augmentation
            noise is drawn first, from the same source.
    Returns:
        samples (B, C, H, W) and the sampler's report, with ``nfe`` the exact score calls, plus
        ``aug_level`` (the resolved level), ``conditioning`` ('noised' when augmented here,
        'given' for ``noised``, 'clean' at level 0) and ``options`` (every resolved sampler
        option).
    """
    if not isinstance(stage, Stage):
        raise TypeError(f"stage must be a samplers.cascade.Stage, got {type(stage).__name__}")
    if not stage.conditional:
        raise ValueError("super_resolve needs a stage with a score_factory (a conditional stage); "
                         "this one has a plain score_fn")
    if not isinstance(y_low, torch.Tensor) or not torch.is_floating_point(y_low):
        raise TypeError(f"y_low must be a floating-point tensor, got {type(y_low).__name__}")
    C, H, W = stage.shape
    if y_low.dim() != 4 or y_low.shape[1] != C or y_low.shape[2] > H or y_low.shape[3] > W:
        raise ValueError(f"y_low must have shape (B, {C}, h, w) with h <= {H}, w <= {W} (the "
                         f"stage's shape {stage.shape}), got {tuple(y_low.shape)}")
    if y_low.shape[0] < 1:
        raise ValueError("y_low is an empty batch")
    B = y_low.shape[0]
    generator = make_generators(generator, seeds, B, y_low.device)
    s, resolved = _level_tensor(level, stage, y_low)
    if noised:
        y_s, conditioning = y_low, "given"
    else:
        any_level = resolved != 0.0 if isinstance(resolved, float) else any(resolved)
        y_s = augment(y_low, stage.aug_sde, s, NoiseSource(generator)) if any_level else y_low
        conditioning = "noised" if any_level else "clean"
    score_fn = stage.score_factory(y_s, s)
    x, info = sample(stage.sde, score_fn, (B, C, H, W), stage.method, generator=generator,
                     progress=progress, callback=callback, device=y_low.device,
                     dtype=y_low.dtype, **stage.options)
    info.update(aug_level=resolved, conditioning=conditioning,
                options=resolved_options(stage.method, stage.options))
    return x, info


class Cascade:
    """A base stage followed by super-resolution stages, each conditioned on the previous
    stage's output (Ho, Saharia et al. 2022, Sec. 3).

    Args:
        stages: the base :class:`Stage` (a plain ``score_fn`` or a factory called with
            ``y_s = None``), then conditional stages with the same channels and sizes no smaller
            than the previous stage's. A stage with ``truncate`` stops the previous one at the
            time matching its level (see :func:`truncation_time`); this is checked here.
    """

    def __init__(self, stages: Sequence[Stage]) -> None:
        stages = list(stages)
        if not stages or not all(isinstance(s, Stage) for s in stages):
            raise TypeError("stages must be a non-empty sequence of samplers.cascade.Stage")
        for i, (prev, stage) in enumerate(zip(stages, stages[1:]), start=1):
            if not stage.conditional:
                raise ValueError(f"stage {i} has a plain score_fn; every stage after the base "
                                 "needs a score_factory taking the previous stage's output")
            if stage.shape[0] != prev.shape[0] or stage.shape[1] < prev.shape[1] \
                    or stage.shape[2] < prev.shape[2]:
                raise ValueError(f"stage {i} has shape {stage.shape}; after a stage of shape "
                                 f"{prev.shape} it needs the same channels and sizes no smaller")
        self.stages = stages
        # the end time of each stage that a truncating successor stops early (None: its own)
        self.end_times: list[float | None] = [None] * len(stages)
        self._options = [dict(s.options) for s in stages]
        for i, stage in enumerate(stages[1:], start=1):
            if stage.truncate and stage.aug_level > 0:
                prev = stages[i - 1]
                t_star = truncation_time(prev.sde, stage.aug_sde, stage.aug_level)
                self._options[i - 1] = stop_early_options(prev.method, prev.options, t_star)
                self.end_times[i - 1] = t_star

    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seeds: Sequence[int] | None = None,
        low_res: torch.Tensor | None = None,
        progress: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[list[torch.Tensor], list[dict]]:
        """Sample the base stage, then each super-resolution stage from the previous output.

        Args:
            batch_size: B.
            generator, seeds: the random source of every stage, drawn in stage order (with
                ``seeds``, sample k depends only on ``seeds[k]``).
            low_res: optional base-stage output (B, *stages[0].shape) to start from instead of
                sampling the base (a truncated second stage then noises it at its level).
            progress: tqdm bars.
            device, dtype: of the samples (``low_res`` fixes both when given).
        Returns:
            the outputs of every stage (B, C_i, H_i, W_i) in model space (a stage stopped early
            by its truncating successor returns its noisy state at that time), and one report
            per stage: the sampler's (``nfe`` exact, ``options`` all resolved), ``aug_level``,
            ``conditioning``, ``end_time`` (the time the stage stopped at) and ``truncated``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if low_res is not None:
            want = (batch_size, *self.stages[0].shape)
            if not isinstance(low_res, torch.Tensor) or tuple(low_res.shape) != want \
                    or not torch.is_floating_point(low_res):
                got = (tuple(low_res.shape), low_res.dtype) if isinstance(low_res, torch.Tensor) \
                    else low_res
                raise ValueError(f"low_res must be a floating-point tensor of shape {want}, got "
                                 f"{got!r}")
            device, dtype = low_res.device, low_res.dtype
        generator = make_generators(generator, seeds, batch_size, device)
        outputs, infos = [], []
        for i, stage in enumerate(self.stages):
            options = self._options[i]
            if i == 0 and low_res is not None:
                x, info = low_res, {"method": None, "nfe": 0, "conditioning": "given"}
            elif i == 0:
                score_fn = stage.score_fn
                if score_fn is None:
                    level = torch.zeros(batch_size, device=device,
                                        dtype=dtype or torch.get_default_dtype())
                    score_fn = stage.score_factory(None, level)
                x, info = sample(stage.sde, score_fn, (batch_size, *stage.shape), stage.method,
                                 generator=generator, progress=progress, device=device,
                                 dtype=dtype, **options)
                info.update(aug_level=0.0, conditioning="none",
                            options=resolved_options(stage.method, options))
            else:
                # a truncated predecessor already returned y_s at this stage's level
                given = stage.truncate and self.end_times[i - 1] is not None \
                    and not (i == 1 and low_res is not None)
                staged = replace(stage, options=options)
                x, info = super_resolve(staged, outputs[-1], noised=given, generator=generator,
                                        progress=progress)
            info["truncated"] = self.end_times[i] is not None
            info["end_time"] = self.end_times[i] if info["truncated"] else _end_time(stage,
                                                                                     info)
            outputs.append(x)
            infos.append(info)
        return outputs, infos


def _end_time(stage: Stage, info: dict) -> float | None:
    """The time a stage's sampler stopped at: its eps when it stops there, else 0."""
    if info.get("method") is None:  # given low_res: not sampled
        return None
    return float(info["options"]["eps"]) if SAMPLERS.get(stage.method).stops_at_eps else 0.0


__all__ = ["Cascade", "ScoreFactory", "Stage", "augment", "check_level", "stop_early_options",
           "super_resolve", "truncation_time"]
