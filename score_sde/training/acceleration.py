"""A run's precision, ``torch.compile`` and gradient accumulation, read from its config
(docs/precision.md).

* ``training.precision`` ('auto' | 'fp32' | 'tf32' | 'bf16' | 'fp16'; ``utils.precision``): the
  training and evaluation-loss steps; 'auto' resolves to 'tf32' on CUDA and 'fp32' elsewhere,
  and the resolved value is logged at the start of a run. fp16 adds a ``torch.amp.GradScaler``
  (``state['grad_scaler']``, made by ``training.loop.build``).
* ``sampling.precision`` ('fp32' | 'tf32' | 'bf16'): the network while sampling (snapshots,
  ``--mode sample``, eval samples); the solver state stays float32 (or the input's dtype).
* ``eval.likelihood_precision`` (default 'fp32'): the network in bits/dim; the probability-flow
  ODE and the divergence run in a scope with TF32 off unless 'tf32' is asked for.
* ``training.compile`` / ``sampling.compile``: ``torch.compile`` of the network (off by
  default); the compiled module is only ever called, never saved, so checkpoints keep the bare
  network's keys.
* ``training.grad_accum = k``: micro-batches per step (``losses.accumulate_gradients``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from score_sde.utils.compile import compiled, inference_network
from score_sde.utils.precision import (
    PRECISIONS,
    SAMPLING_PRECISIONS,
    check_precision,
    resolve_precision,
)


def training_precision(config) -> str:
    """The resolved ``config.training.precision`` ('auto' -> 'tf32' on CUDA, else 'fp32')."""
    return resolve_precision(config.training.get("precision", "auto"), config.device)


def sampling_precision(config) -> str:
    """``config.sampling.precision`` (default 'fp32')."""
    return check_precision(config.sampling.get("precision", "fp32"), SAMPLING_PRECISIONS,
                           "config.sampling.precision")


def likelihood_precision(config) -> str:
    """``config.eval.likelihood_precision`` (default 'fp32': bits/dim stay in fp32 unless the
    user forces otherwise)."""
    return check_precision(config.eval.get("likelihood_precision", "fp32"), SAMPLING_PRECISIONS,
                           "config.eval.likelihood_precision")


def check_acceleration_config(config, world_size: int = 1) -> None:
    """The precision, compile and accumulation keys (each optional).

    Raises:
        ValueError: an unknown precision (naming it and the valid ones), a ``grad_accum`` that
            is not an integer >= 1 or does not divide the rows per process.
        TypeError: a compile flag that is not a bool.
    """
    check_precision(config.training.get("precision", "auto"), PRECISIONS,
                    "config.training.precision")
    if "sampling" in config:
        sampling_precision(config)
    if "eval" in config:
        likelihood_precision(config)
    for section in ("training", "sampling"):
        value = config.get(section, {}).get("compile", False)
        if not isinstance(value, bool):
            raise TypeError(f"config.{section}.compile must be True or False, got "
                            f"{type(value).__name__} {value!r}")
    k = config.training.get("grad_accum", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"config.training.grad_accum must be an integer >= 1, got {k!r}")
    rows = config.training.batch_size // max(world_size, 1)
    if rows % k:
        divisors = [d for d in range(1, rows + 1) if rows % d == 0]
        raise ValueError(f"config.training.grad_accum={k} must divide the {rows} rows per "
                         f"process (training.batch_size={config.training.batch_size} over "
                         f"{world_size} processes); valid: {', '.join(map(str, divisors))}")


def forward_model(config, model: nn.Module) -> nn.Module:
    """The module training calls: ``model`` compiled when ``config.training.compile``."""
    if config.training.get("compile", False):
        return compiled(model, config.device, "config.training.compile")
    return model


def with_forward_model(train_step: Callable[..., torch.Tensor], forward: nn.Module
                       ) -> Callable[..., torch.Tensor]:
    """``train_step`` calling ``forward`` (the compiled network) in place of ``state['model']``,
    which stays the bare module that checkpoints are written from (one process; under data
    parallelism ``training.distributed.data_parallel_step`` wraps ``forward`` in DDP)."""
    def step(state: dict, batch: torch.Tensor, **kwargs) -> torch.Tensor:
        if forward is state["model"]:
            return train_step(state, batch, **kwargs)
        view = dict(state, model=forward)
        loss = train_step(view, batch, **kwargs)
        state["step"] = view["step"]
        return loss

    return step


def grad_scaler(config) -> torch.amp.GradScaler | None:
    """A ``torch.amp.GradScaler`` on the run's device for fp16 training, else None."""
    if training_precision(config) != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(config.device).type)


def precision_record(precision: str, key: str, solver: str) -> dict:
    """What a record says of the precision: the network's, where it comes from, whether TF32
    ran, and the precision of the ``solver`` (its state, the ODE, the divergence)."""
    return {"network": precision, "key": key, "tf32": precision == "tf32",
            "solver": solver if precision != "tf32" else f"{solver}; TF32 matmuls allowed"}


def describe(config) -> str:
    """One log line of the run's resolved precision, compile and accumulation settings."""
    t = config.training
    k = t.get("grad_accum", 1)
    return (f"precision {training_precision(config)} (training.precision="
            f"{t.get('precision', 'auto')!r}), compile {bool(t.get('compile', False))}, "
            f"grad_accum {k} (micro-batches of {t.batch_size // k})")


__all__ = [
    "training_precision",
    "sampling_precision",
    "likelihood_precision",
    "check_acceleration_config",
    "compiled",
    "forward_model",
    "with_forward_model",
    "grad_scaler",
    "inference_network",
    "precision_record",
    "describe",
]
