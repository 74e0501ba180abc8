"""The optimiser, the reference's ``optimize_fn`` and the one-step train/eval function, with
gradient accumulation and mixed precision.

Gradient accumulation (``grad_accum = k``): the draws of a step (t, z, probes, importance-sampled
steps) are made once for the whole batch, then the rows are split into k equal micro-batches; the
micro-batch j's mean loss L_j is back-propagated with weight 1 / k, so the summed gradient is
that of the batch mean (1/B) sum_i l_i = (1/k) sum_j L_j: the update equals the one-shot
batch's (dropout masks aside). Under ``DistributedDataParallel`` the first k - 1 backward passes
run under ``no_sync`` and the last one all-reduces the accumulated gradients.

Precision (``utils.precision``): ``'tf32'`` runs the step in a TF32 scope; ``'bf16'``/``'fp16'``
run the network's forward under autocast (its outputs cast back to float32, so the loss, its
reduction, the gradients of the fp32 master weights, the optimiser and the EMA stay float32);
``'fp16'`` multiplies the loss by the ``torch.amp.GradScaler`` of ``state['grad_scaler']``,
unscales before clipping and lets the scaler skip a step whose gradients overflowed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

import sde_lib
from score_sde.discrete_diffusion import VLBImportanceSampler
from score_sde.losses.objectives import (
    DISCRETE_LOSSES,
    OBJECTIVES,
    LossFn,
    get_hybrid_loss_fn,
    get_sde_loss_fn,
)
from score_sde.utils import Registry
from score_sde.utils.precision import PRECISIONS, check_precision, network_precision
from score_sde.utils.precision import precision_scope as _precision_scope

#: ``optimize_fn(optimizer, params, step, scaler=None)``: set the learning rate, clip, step.
OptimizeFn = Callable[..., None]

OPTIMIZERS = Registry("optimizer")


def _build(cls: type[torch.optim.Optimizer], params, **kwargs) -> torch.optim.Optimizer:
    """``cls(params, fused=True)`` where the device has the fused kernel (one pass per tensor;
    equal to the reference's update up to rounding, 3x faster on CPU), else the multi-tensor
    ``foreach`` implementation, else the plain loop."""
    params = list(params)
    for impl in ({"fused": True}, {"foreach": True}, {}):
        try:
            return cls(params, **impl, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            continue
    return cls(params, **kwargs)  # raises the plain constructor's own error


def _adam_kwargs(config) -> dict:
    kwargs = dict(lr=config.optim.lr, betas=(config.optim.beta1, 0.999), eps=config.optim.eps,
                  weight_decay=config.optim.weight_decay,
                  amsgrad=config.optim.get("amsgrad", False))
    if not isinstance(kwargs["amsgrad"], bool):
        raise ValueError(f"optim.amsgrad must be a bool, got {kwargs['amsgrad']!r}")
    return kwargs


@OPTIMIZERS.register("Adam")
def _adam(config, params) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba 2015), the reference's: weight decay as an L2 term of the gradient."""
    return _build(torch.optim.Adam, params, **_adam_kwargs(config))


@OPTIMIZERS.register("AdamW")
def _adamw(config, params) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019): weight decay decoupled from the adaptive step,
    theta <- theta - lr * weight_decay * theta (DiT trains with AdamW and weight decay 0)."""
    return _build(torch.optim.AdamW, params, **_adam_kwargs(config))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict(state_dict)`` keeping this optimiser's ``fused`` / ``foreach``
    choice: a checkpoint written by an unfused (or a reference) run would otherwise switch it
    off, and a fused one loaded where the kernel is missing would fail at the first step."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if isinstance(groups, list) and len(groups) == len(optimizer.param_groups):
        state_dict = dict(state_dict, param_groups=[
            {**saved, **{k: live[k] for k in ("fused", "foreach") if k in live}}
            if isinstance(saved, dict) else saved
            for saved, live in zip(groups, optimizer.param_groups)
        ])
    optimizer.load_state_dict(state_dict)


def get_optimizer(config, params) -> torch.optim.Optimizer:
    """The optimiser named by ``config.optim.optimizer``: ``Adam`` (the reference's) or ``AdamW``,
    with betas (beta1, 0.999), ``eps`` and ``weight_decay`` from ``config.optim``; fused where the
    device supports it, else ``foreach``."""
    return OPTIMIZERS.get(config.optim.optimizer)(config, params)


def optimization_manager(config) -> OptimizeFn:
    """``optimize_fn(optimizer, params, step, scaler=None)``: linear learning-rate warm-up over
    ``config.optim.warmup`` steps and gradient-norm clipping at ``config.optim.grad_clip`` (off
    when negative), then one optimiser step, as the reference. The learning rate is a Python
    float (the reference's numpy float breaks ``torch.load(weights_only=True)``). With a
    ``torch.amp.GradScaler`` the gradients are unscaled before clipping, and the scaler steps
    (skipping a step with inf/NaN gradients) and updates its scale."""
    lr, warmup, grad_clip = config.optim.lr, config.optim.warmup, config.optim.grad_clip

    def optimize_fn(optimizer: torch.optim.Optimizer, params, step,
                    scaler: torch.amp.GradScaler | None = None) -> None:
        if warmup > 0:
            for group in optimizer.param_groups:
                group["lr"] = lr * min(float(step) / warmup, 1.0)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if grad_clip >= 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm=grad_clip)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    return optimize_fn


def _check_grad_accum(grad_accum) -> int:
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be an integer >= 1, got {grad_accum!r}")
    return grad_accum


def micro_batches(rows: slice, grad_accum: int) -> list[slice]:
    """The ``grad_accum`` equal consecutive slices of ``rows`` (the whole batch, or this
    process's rows under data parallelism).

    Raises:
        ValueError: the rows do not split evenly, naming both numbers.
    """
    n = rows.stop - rows.start
    if n % grad_accum:
        raise ValueError(f"grad_accum={grad_accum} must divide the {n} rows of the batch on this "
                         "process (training.batch_size / world size)")
    m = n // grad_accum
    return [slice(rows.start + j * m, rows.start + (j + 1) * m) for j in range(grad_accum)]


def accumulate_gradients(loss_fn: LossFn, model: nn.Module, batch: torch.Tensor, *,
                         generator: torch.Generator | None, shard: slice | None,
                         grad_accum: int = 1, scaler: torch.amp.GradScaler | None = None,
                         **extra) -> torch.Tensor:
    """Back-propagate the batch-mean loss over ``grad_accum`` micro-batches; returns the loss.

    The k calls of ``loss_fn`` each start from the generator's state at entry, so each draws the
    whole batch's (t, z, ...) anew and identically and keeps its own rows (``shard``); the
    generator ends where one draw leaves it. Micro-batch j contributes (1/k) L_j, and only the
    last backward pass of a ``DistributedDataParallel`` model all-reduces.

    Args:
        shard: the rows of ``batch`` this process trains on (None: all).
        scaler: multiplies each loss before its backward pass (fp16).
        extra: passed to ``loss_fn`` (``class_labels``).
    Returns:
        the detached mean loss over the rows (a 0-d tensor).
    """
    grad_accum = _check_grad_accum(grad_accum)
    if grad_accum == 1:
        loss = loss_fn(model, batch, generator=generator,
                       **({} if shard is None else {"shard": shard}), **extra)
        (loss if scaler is None else scaler.scale(loss)).backward()
        return loss.detach()
    if generator is None:
        raise ValueError(f"grad_accum={grad_accum} replays the batch's draws for every "
                         "micro-batch: pass a torch.Generator")
    micro = micro_batches(shard or slice(0, batch.shape[0]), grad_accum)
    start = generator.get_state()
    total = None
    for j, rows in enumerate(micro):
        generator.set_state(start)
        last = j == grad_accum - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") \
            else model.no_sync()
        with sync:
            loss = loss_fn(model, batch, generator=generator, shard=rows, **extra) / grad_accum
            (loss if scaler is None else scaler.scale(loss)).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def get_step_fn(sde: sde_lib.SDE, train: bool, optimize_fn: OptimizeFn | None = None,
                reduce_mean: bool = False, continuous: bool = True,
                likelihood_weighting: bool = False, *, importance_weighting: bool = False,
                loss_fn: LossFn | None = None, loss: str = "simple", vlb_rescale: bool = False,
                importance_sampler: VLBImportanceSampler | None = None, grad_accum: int = 1,
                precision: str = "fp32") -> Callable[..., torch.Tensor]:
    """``step_fn(state, batch, *, generator=None, shard=None, class_labels=None) -> loss``: one
    training or evaluation step.

    ``state`` is the reference's dict with ``model``, ``optimizer``, ``ema`` and ``step`` (and
    ``grad_scaler``, a ``torch.amp.GradScaler``, for ``precision='fp16'`` training).
    Training: zero grads, backward (over ``grad_accum`` micro-batches:
    :func:`accumulate_gradients`), ``optimize_fn(optimizer, model.parameters(), step)``,
    ``step += 1``, ``ema.update(model.parameters())``. Evaluation: the loss under ``no_grad``
    with the EMA weights swapped in (``store``/``copy_to``/``restore``). The loss is the
    continuous ``get_sde_loss_fn`` or, with ``continuous=False``, the discrete loss registered for
    the SDE's ``model_conventions['discrete']`` (DDPM for VP, SMLD for VE); ``loss='hybrid'``
    (discrete VP, a model with learned variances) is :func:`get_hybrid_loss_fn` with
    ``vlb_rescale`` and ``importance_sampler`` (always a mean over dimensions, as the official
    L_hybrid: ``reduce_mean`` does not apply); ``loss_fn`` overrides.
    ``shard`` (data-parallel training) is passed on to the loss: rows of ``batch`` this process
    trains on, with the draws made for the whole batch. ``class_labels`` (B,) of the whole batch
    (class-conditional training) are passed on to the loss, which shards them like the rows;
    so are ``cond_image`` (B, C_y, h, w) and ``cond_level`` (B,) of an image-conditional model
    (a super-resolution stage of a cascade, :mod:`training.cascade`).
    ``precision`` is a resolved name of ``utils.precision`` (not ``'auto'``): the network's
    forward in bf16/fp16 autocast, the step in a TF32 scope for ``'tf32'``.
    Returns the detached loss.
    """
    if loss not in OBJECTIVES:
        raise ValueError(f"Unknown loss {loss!r}; valid: {', '.join(OBJECTIVES)}")
    check_precision(precision, PRECISIONS[1:], "precision")
    grad_accum = _check_grad_accum(grad_accum)
    if loss_fn is None and loss == "hybrid":
        if continuous or likelihood_weighting or importance_weighting:
            raise ValueError("loss='hybrid' is discrete training: needs continuous=False and no "
                             "likelihood or importance weighting")
        loss_fn = get_hybrid_loss_fn(sde, train, rescale=vlb_rescale,
                                     importance_sampler=importance_sampler)
    elif importance_sampler is not None:
        raise ValueError("an importance_sampler of the steps needs loss='hybrid'")
    if loss_fn is None:
        if continuous:
            loss_fn = get_sde_loss_fn(sde, train, reduce_mean=reduce_mean, continuous=True,
                                      likelihood_weighting=likelihood_weighting,
                                      importance_weighting=importance_weighting)
        else:
            if likelihood_weighting or importance_weighting:
                raise ValueError("likelihood weighting is not supported for discrete "
                                 "(SMLD/DDPM) training")
            convention = sde.model_conventions.get("discrete")
            if convention not in DISCRETE_LOSSES:
                raise ValueError(f"no discrete training for {type(sde).__name__}; discrete "
                                 f"losses exist for: {', '.join(DISCRETE_LOSSES.names())}")
            loss_fn = DISCRETE_LOSSES.get(convention)(sde, train, reduce_mean=reduce_mean)
    if train and optimize_fn is None:
        raise ValueError("a training step_fn needs optimize_fn (see optimization_manager)")

    def step_fn(state: dict, batch: torch.Tensor, *, generator: torch.Generator | None = None,
                shard: slice | None = None, class_labels: torch.Tensor | None = None,
                **image_cond: torch.Tensor | None) -> torch.Tensor:
        model: nn.Module = state["model"]
        network = network_precision(model, precision)  # shares the fp32 parameters
        ema = state.get("ema")
        # only what is given: a custom loss_fn of an unconditional run need not take labels
        extra = {} if class_labels is None else {"class_labels": class_labels}
        extra.update({k: v for k, v in image_cond.items() if v is not None})
        if train:
            optimizer = state["optimizer"]
            scaler = state.get("grad_scaler") if precision == "fp16" else None
            if precision == "fp16" and scaler is None:
                raise ValueError("precision='fp16' training needs state['grad_scaler'], a "
                                 "torch.amp.GradScaler")
            optimizer.zero_grad(set_to_none=True)
            deferred = (importance_sampler.deferred_updates()
                        if importance_sampler is not None and grad_accum > 1
                        else contextlib.nullcontext())
            with _precision_scope(precision):
                with deferred:
                    loss = accumulate_gradients(loss_fn, network, batch, generator=generator,
                                                shard=shard, grad_accum=grad_accum,
                                                scaler=scaler, **extra)
                kwargs = {} if scaler is None else {"scaler": scaler}
                optimize_fn(optimizer, model.parameters(), step=state["step"], **kwargs)
            state["step"] += 1
            if ema is not None:
                ema.update(model.parameters())
            return loss
        with torch.no_grad(), _precision_scope(precision):
            if ema is None:
                return loss_fn(network, batch, generator=generator, **extra)
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            try:
                return loss_fn(network, batch, generator=generator, **extra)
            finally:
                ema.restore(model.parameters())

    return step_fn


__all__ = [
    "OPTIMIZERS",
    "OptimizeFn",
    "get_optimizer",
    "load_optimizer_state",
    "optimization_manager",
    "micro_batches",
    "accumulate_gradients",
    "get_step_fn",
]
