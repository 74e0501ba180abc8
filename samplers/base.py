"""The one calling convention of every sampler: registry, NFE counting, noise, progress, callback.

A sampler is a registered subclass of :class:`Sampler` that declares its properties (``order``,
``nfe_per_step``, ``stochastic``) and implements :meth:`Sampler.run`. Users call
:func:`sample` (or the reference-style ``get_sampling_fn``); ``sample`` validates the inputs,
draws x_T from the prior, counts every score evaluation and returns the samples and a report.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

import sde_lib
from score_sde.utils import Registry, ScoreFn

SAMPLERS = Registry("sampler")
register_sampler = SAMPLERS.register

#: ``callback(step, t, x, x0_pred_or_None)`` receives intermediate states: after each step its
#: state x at time t (the step's end) and, where the sampler has one, the data prediction it used.
Callback = Callable[..., None]


class CountingScore:
    """Wraps ``score_fn`` and counts its calls: one call = one batched network evaluation (NFE).

    A score transform that calls a network more than once per call (classifier-free guidance
    with two functions) declares it as ``nfe_per_call``.
    """

    def __init__(self, score_fn: ScoreFn) -> None:
        self.score_fn = score_fn
        self.nfe = 0
        self._per_call = getattr(score_fn, "nfe_per_call", 1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe += self._per_call
        return self.score_fn(x, t)

    @property
    def eps_and_v(self) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
        """The wrapped function's ``eps_and_v(x, t) -> (eps, v)`` (a network's raw output; see
        ``models.utils``), counted like a score call; absent (``AttributeError``, so ``hasattr``
        is False) when the wrapped function has none."""
        inner = getattr(self.score_fn, "eps_and_v", None)
        if inner is None:
            raise AttributeError(f"{type(self.score_fn).__name__} has no eps_and_v")

        def counted(x: torch.Tensor, t: torch.Tensor) -> tuple:
            self.nfe += self._per_call
            return inner(x, t)

        return counted


def check_fresh_score(score: torch.Tensor, *kept: torch.Tensor) -> None:
    """Raise ``RuntimeError`` if ``score`` shares its memory with one of the tensors ``kept``
    (the input it was computed at, past scores a solver keeps or writes into): a score_fn that
    returns its input or reuses one output buffer would overwrite them silently. Pointers only,
    so no device sync in a step loop."""
    ptr = score.data_ptr()
    if any(ptr == k.data_ptr() for k in kept):
        raise RuntimeError(
            "score_fn returned its input or a tensor it returned before (a reused output "
            "buffer); this sampler keeps past scores or writes into them: return a new tensor "
            "(e.g. score.clone())")


class NoiseSource:
    """Gaussian noise for stochastic samplers, from one generator or one generator per sample.

    With per-sample generators (``seeds=[...]`` in :func:`sample`), row k of every draw comes from
    generator k alone, so sample k depends only on its seed, whatever the batch size.
    """

    def __init__(self, generator: torch.Generator | Sequence[torch.Generator] | None) -> None:
        self.generator = generator

    @property
    def per_sample(self) -> bool:
        """True when each sample has its own generator."""
        return isinstance(self.generator, (list, tuple))

    def randn_like(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Standard normal noise shaped like ``x`` (B, *D) on its device and dtype, written into
        ``out`` (a buffer shaped like x, reused across steps) when given."""
        if self.per_sample:
            if out is None:
                out = torch.empty_like(x)
            for row, g in zip(out, self.generator):
                row.normal_(generator=g)
            return out
        if out is not None:
            return out.normal_(generator=self.generator)
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def rand_like(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform [0, 1) noise shaped like ``x``."""
        if self.per_sample:
            rows = [
                torch.rand(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                for g in self.generator
            ]
            return torch.stack(rows)
        return torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)


class Sampler:
    """Base of all samplers. Subclasses declare their properties and implement :meth:`run`.

    Class attributes:
        order: convergence order of the deterministic part (measured in the tests).
        nfe_per_step: score evaluations per step.
        stochastic: whether the sampler draws noise after x_T.
        config_keys: option -> its ``config.sampling`` key, where a config shares the option's
            name with other samplers in another meaning (the CLI reads options by name).
        stops_at_eps: the sampler returns x at the time given by its ``eps`` option, any time in
            (0, T), with nothing after it but an optional ``denoise`` step (what truncated
            conditioning augmentation in ``samplers.cascade`` needs).
    """

    order: int = 1
    nfe_per_step: int = 1
    stochastic: bool = False
    stops_at_eps: bool = False
    config_keys: dict[str, str] = {}

    def __init__(self, **options: Any) -> None:
        """Subclasses take their options as keyword arguments and validate them here."""
        if options:
            raise TypeError(
                f"{type(self).__name__} got unknown options: {', '.join(sorted(options))}"
            )

    def check_sde(self, sde: sde_lib.SDE) -> None:
        """Raise ``ValueError`` if this sampler cannot run on ``sde`` (default: every SDE)."""

    def run(
        self,
        sde: sde_lib.SDE,
        score_fn: ScoreFn,
        x: torch.Tensor,
        *,
        noise: NoiseSource,
        progress: bool = False,
        callback: Callback | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Integrate from x_T (B, *D) to data; returns samples and extra report entries."""
        raise NotImplementedError


def option_defaults(method: str) -> dict[str, Any]:
    """Every keyword option of the sampler registered as ``method``, with its default (the
    first ``__init__`` along the class's MRO that declares it wins; ``None`` where it has none).

    Raises:
        ValueError: unknown method (listing the registered ones).
    """
    defaults: dict[str, Any] = {}
    for klass in SAMPLERS.get(method).__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) \
                    and name != "self" and name not in defaults:
                defaults[name] = None if param.default is param.empty else param.default
    return defaults


def resolved_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of sampler ``method`` as an instance built from ``options`` holds it: the
    given values, the defaults the sampler fills in (e.g. a fast sampler's ``grid``, ``nfe`` and
    ``eps``), and the declared default of an option it keeps under another name. An option that
    is only known once the SDE is (PC's ``N``) stays ``None``."""
    sampler = SAMPLERS.get(method)(**options)
    return {name: getattr(sampler, name, options.get(name, default))
            for name, default in sorted(option_defaults(method).items())}


def progress_bar(iterable, enabled: bool, desc: str):
    """A tqdm bar over ``iterable`` when ``enabled``; the iterable itself otherwise."""
    return tqdm(iterable, desc=desc, leave=False) if enabled else iterable


def _initial_state(sde, shape, noise: NoiseSource, device, dtype) -> torch.Tensor:
    """x_T: the given tensor, or a prior draw (row k from generator k when seeded per sample)."""
    if isinstance(shape, torch.Tensor):
        if shape.dim() < 2:
            raise ValueError(f"x_T must have shape (B, *D), got {tuple(shape.shape)}")
        if not torch.is_floating_point(shape):
            raise TypeError(f"x_T must be a floating-point tensor, got {shape.dtype}")
        return shape
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise TypeError(
            f"shape must be a tuple of ints or an initial tensor x_T, got {shape!r}"
        ) from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (B, *D) with positive sizes, got {shape}")
    if noise.per_sample:
        rows = [
            sde.prior_sampling((1, *shape[1:]), generator=g, device=device, dtype=dtype)
            for g in noise.generator
        ]
        return torch.cat(rows)
    return sde.prior_sampling(shape, generator=noise.generator, device=device, dtype=dtype)


def make_generators(
    generator: torch.Generator | Sequence[torch.Generator] | None,
    seeds: Sequence[int] | None,
    batch: int,
    device: torch.device | str | None,
) -> torch.Generator | list[torch.Generator] | None:
    """The random source of a sampler: ``generator`` as given, or one generator per sample
    seeded from ``seeds`` (on ``device``)."""
    if seeds is None:
        return generator
    if generator is not None:
        raise ValueError("give either generator or seeds, not both")
    if len(seeds) != batch:
        raise ValueError(f"seeds has {len(seeds)} entries for a batch of {batch}")
    return [torch.Generator(device=device or "cpu").manual_seed(int(s)) for s in seeds]


def sample(
    sde: sde_lib.SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...] | torch.Tensor,
    method: str = "pc",
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    seeds: Sequence[int] | None = None,
    progress: bool = False,
    callback: Callback | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> tuple[torch.Tensor, dict]:
    """Draw samples by integrating the reverse SDE / probability-flow ODE (Song et al. 2021).

    Args:
        sde: the forward SDE the score belongs to.
        score_fn: ``score_fn(x, t) -> score``, any callable (a network adapter or an exact score)
            returning a new tensor per call (samplers keep past scores and may write into
            them; a reused output buffer is refused where it would be overwritten).
        shape: (B, *D) of the samples, or an initial tensor x_T (B, *D).
        method: a registered sampler name (``'pc'``, ``'ode'``, fast samplers ...).
        generator: the random source of x_T and every later draw (or a sequence of one
            generator per sample).
        seeds: one integer seed per sample instead of ``generator``: sample k then depends only
            on ``seeds[k]``, whatever the batch size.
        progress: show a tqdm bar.
        callback: called with intermediate states (see each sampler).
        device, dtype: of x_T when ``shape`` is a tuple.
        **options: the sampler's own options (see its docstring).
    Returns:
        samples (B, *D) and a report dict whose ``nfe`` is the exact number of score calls; a
        score transform's own entries (its ``sampler_report`` dict, e.g. the ``guidance`` of
        ``ClassifierFreeGuidance``) are added.
    """
    if not isinstance(sde, sde_lib.SDE):
        raise TypeError(f"sde must be an sde_lib.SDE, got {type(sde).__name__}")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    sampler_cls = SAMPLERS.get(method)
    if seeds is not None:
        batch = shape.shape[0] if isinstance(shape, torch.Tensor) else int(shape[0])
        gen_device = shape.device if isinstance(shape, torch.Tensor) else device
        generator = make_generators(generator, seeds, batch, gen_device)
    noise = NoiseSource(generator)
    x = _initial_state(sde, shape, noise, device, dtype)
    counter = CountingScore(score_fn)
    sampler = sampler_cls(**options)  # options are validated here, before any work
    sampler.check_sde(sde)
    with torch.no_grad():  # sampling never backpropagates; guidance enables grad where it needs it
        samples, extra = sampler.run(
            sde, counter, x, noise=noise, progress=progress, callback=callback
        )
    info = {"method": method, "nfe": counter.nfe, **extra,
            **getattr(score_fn, "sampler_report", {})}
    return samples, info
