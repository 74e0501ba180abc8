"""The non-finite guard of training: a NaN/inf loss or gradient stops the run naming its step,
or, with ``config.training.skip_nonfinite = True``, the step is skipped, up to a cap: more than
``config.training.max_skip_fraction`` of the last :data:`SKIP_WINDOW` steps, and at least
:data:`MIN_SKIPS` skips, stop the run as without skipping.

fp16 training's ``torch.amp.GradScaler`` skips a step whose scaled gradients overflowed and lowers
its scale: that is how it finds its scale, not a failure. Such a step either never calls
``optimizer.step()`` or (a fused optimiser) calls it with the scaler's ``found_inf`` set; either
way the guard neither records nor counts it, and counts it in :meth:`NonFiniteGuard.scaler_skips`
instead (logged with the scale).

Stopping costs no host synchronisation per step: the first bad step is kept in a device tensor
and read at the loop's side effects (logging, checkpoints), always before a checkpoint is
written. Skipping has to decide before the optimiser step, so it reads one boolean per step.
With data parallelism the gradients are checked after DistributedDataParallel averaged them, so
every rank takes the same decision.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

import torch

from score_sde.training import distributed

log = logging.getLogger(__name__)

_NONE = torch.iinfo(torch.int64).max  # "no bad step yet" (the minimum over ranks ignores it)
SKIP_WINDOW = 1000  #: the skip cap looks at this many latest steps
MIN_SKIPS = 10  #: ... and stops a run only from this many skips in them


def grads_finite(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """True (a 0-d bool tensor) when every gradient is finite; the norm is inf/NaN otherwise."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.nn.utils.get_total_norm(grads))


class NonFiniteGuard:
    """Watches losses and gradients for NaN/inf.

    Args:
        device: where the bookkeeping tensor lives (the model's device).
        skip: skip steps with a non-finite gradient (logging a warning) instead of stopping.
        max_skip_fraction: with ``skip``, stop as without it once more than this fraction of
            the last ``SKIP_WINDOW`` steps (of those taken so far, if fewer) were skipped, and at
            least ``MIN_SKIPS``.
    """

    def __init__(self, device: torch.device | str, skip: bool = False,
                 max_skip_fraction: float = 0.01) -> None:
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must lie in [0, 1], got {max_skip_fraction!r}")
        self.skip = bool(skip)
        self.max_skip_fraction = float(max_skip_fraction)
        self.skipped = 0
        self._recent: deque[bool] = deque(maxlen=SKIP_WINDOW)  # skipped?, per step taken
        self._recent_skips = 0
        self.first_bad = torch.full((), _NONE, dtype=torch.int64, device=device)
        self._stepped = False  # optimizer.step() was called since the last end_step()
        self._scaler_skipped = 0  # steps whose optimizer.step() the scaler did not call
        self._fused_scaler_skips = torch.zeros((), dtype=torch.int64, device=device)

    def _record(self, bad: torch.Tensor, step: int) -> None:
        self.first_bad = torch.where(bad & (self.first_bad == _NONE),
                                     torch.full_like(self.first_bad, step), self.first_bad)

    def protect(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Check the gradients before every ``optimizer.step()`` (after clipping and, with data
        parallelism, after averaging); ``state['step'] + 1`` is the step being taken."""
        inner = optimizer.step

        def step(*args, **kwargs):
            self._stepped = True
            params = [p for group in optimizer.param_groups for p in group["params"]]
            finite = grads_finite(params)
            found_inf = getattr(optimizer, "found_inf", None)  # GradScaler, fused optimiser
            if isinstance(found_inf, torch.Tensor):  # the kernel skips the update itself
                scaler_skip = found_inf.reshape(()) > 0
                self._fused_scaler_skips = self._fused_scaler_skips + scaler_skip.to(
                    self._fused_scaler_skips)
                finite = finite.to(scaler_skip.device) | scaler_skip
            number = int(state["step"]) + 1
            if self.skip:
                bad = not bool(finite)  # one host sync per step, only in skip mode
                self._count(bad, number)
                if bad:
                    self.skipped += 1
                    log.warning("step %d: non-finite gradient, step skipped (%d so far)",
                                number, self.skipped)
                    optimizer.zero_grad(set_to_none=True)
                    return None
            else:
                self._record(~finite, number)
            return inner(*args, **kwargs)

        optimizer.step = step

    def _count(self, bad: bool, number: int) -> None:
        """Slide the window by step ``number``; raise when its skips pass the cap."""
        if len(self._recent) == self._recent.maxlen:
            self._recent_skips -= self._recent[0]
        self._recent.append(bad)
        self._recent_skips += bad
        steps, skips = len(self._recent), self._recent_skips
        if bad and skips >= MIN_SKIPS and skips > self.max_skip_fraction * steps:
            raise FloatingPointError(
                f"non-finite loss or gradient at step {number}; the run stopped before writing "
                f"a checkpoint of it ({skips} of the last {steps} steps were skipped, more than "
                f"config.training.max_skip_fraction={self.max_skip_fraction:g})")

    def end_step(self) -> None:
        """Close a training step: one that never called ``optimizer.step()`` was skipped by the
        gradient scaler (fp16), and is counted as such."""
        if not self._stepped:
            self._scaler_skipped += 1
        self._stepped = False

    def scaler_skips(self) -> int:
        """Steps skipped by the fp16 gradient scaler so far (reads a device counter)."""
        return self._scaler_skipped + int(self._fused_scaler_skips)

    def observe_loss(self, loss: torch.Tensor, step: int) -> None:
        """Record ``loss`` of step ``step`` (1-based, steps completed); no host sync."""
        if not self.skip:
            self._record(~torch.isfinite(loss.detach()), step)

    def check(self, ctx: distributed.Context | None = None) -> None:
        """Raise if any rank saw a non-finite loss or gradient (a collective with several ranks).

        Raises:
            FloatingPointError: naming the first bad step.
        """
        first = int(distributed.minimum(self.first_bad, ctx or distributed.Context()))
        if first != _NONE:
            raise FloatingPointError(
                f"non-finite loss or gradient at step {first}; the run stopped before writing "
                "a checkpoint of it (set config.training.skip_nonfinite=True to skip such steps)"
            )


def check_state_finite(state: dict, what: str = "checkpoint") -> None:
    """Refuse to write ``what`` when a floating tensor of the model, EMA or optimizer state is
    NaN/inf.

    Raises:
        FloatingPointError: naming the entry and the step.
    """
    step = state.get("step")
    entries = {"model": state["model"].state_dict(), "ema": state["ema"].state_dict(),
               "optimizer": state["optimizer"].state_dict()}
    for section, tree in entries.items():
        for name, value in _tensors(tree):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise FloatingPointError(
                    f"refusing to write a {what} at step {step}: {section} entry {name!r} has "
                    "non-finite values"
                )


def _tensors(tree, prefix: str = ""):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for k, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}[{k}]")
