"""The network's numerical precision: TF32 switches scoped to a block, and bf16/fp16 autocast of
the network's forward alone.

A precision is a name (``config.training.precision``, ``config.sampling.precision``,
``config.eval.likelihood_precision``):

* ``'fp32'``: IEEE float32 everywhere; TF32 is switched *off* inside the scope, even where torch's
  process-wide default allows it (cuDNN convolutions);
* ``'tf32'``: float32 tensors, with TF32 tensor-core matmuls and convolutions on CUDA (Ampere and
  later; no effect on a CPU);
* ``'bf16'`` / ``'fp16'``: the network's forward under ``torch.autocast`` in bfloat16 / float16,
  its floating outputs cast back to float32 (or the input's dtype if higher); weights, gradients,
  optimiser state, the loss reduction and the EMA stay float32 ("master weights",
  Micikevicius et al. 2018). fp16 training adds a gradient scaler (``losses.optimization``);
* ``'auto'`` (training only): ``'tf32'`` on CUDA, ``'fp32'`` elsewhere.

TF32 flags are process-wide in torch, so :func:`precision_scope` sets them on entry and restores
the previous values on exit: the likelihood's ODE and divergence run in a ``'fp32'`` scope unless
the user asks otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

#: ``config.training.precision``
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
#: ``config.sampling.precision`` and ``config.eval.likelihood_precision`` (no gradient scaler)
SAMPLING_PRECISIONS = ("fp32", "tf32", "bf16")
#: the autocast dtype of each mixed precision
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(value, choices: tuple[str, ...] = PRECISIONS,
                    key: str = "precision") -> str:
    """``value`` if it is one of ``choices``.

    Raises:
        ValueError: naming ``key``, the bad value and the valid choices.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{key}={value!r}; valid: {', '.join(choices)}")
    return value


def resolve_precision(value: str, device: torch.device | str,
                      key: str = "config.training.precision") -> str:
    """The precision that runs: ``'auto'`` is ``'tf32'`` on CUDA and ``'fp32'`` elsewhere.

    Raises:
        ValueError: an unknown name (naming it and the valid ones).
    """
    check_precision(value, PRECISIONS, key)
    if value == "auto":
        return "tf32" if torch.device(device).type == "cuda" else "fp32"
    return value


def _tf32_flags() -> list[tuple[object, str, object, object]]:
    """(object, attribute, value for TF32 on, value for off) of torch's TF32 switches: the
    ``fp32_precision`` API of torch >= 2.9 (mixing it with the legacy flags is an error there),
    else the legacy ``allow_tf32`` flags."""
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision"):
        return [(backends.cuda.matmul, "fp32_precision", "tf32", "ieee"),
                (backends.cudnn.conv, "fp32_precision", "tf32", "ieee")]
    return [(backends.cuda.matmul, "allow_tf32", True, False),
            (backends.cudnn, "allow_tf32", True, False)]


@contextlib.contextmanager
def tf32_scope(enabled: bool) -> Iterator[None]:
    """TF32 for float32 matmuls and convolutions switched on (``enabled``) or off inside the
    block; torch's process-wide flags are restored on exit, also after an error."""
    flags = _tf32_flags()
    saved = [getattr(obj, attr) for obj, attr, _, _ in flags]
    try:
        for obj, attr, on, off in flags:
            setattr(obj, attr, on if enabled else off)
        yield
    finally:
        for (obj, attr, _, _), value in zip(flags, saved):
            setattr(obj, attr, value)


def precision_scope(precision: str) -> contextlib.AbstractContextManager:
    """The TF32 scope of a resolved precision: on for ``'tf32'``, off for every other (the
    float32 parts of a bf16/fp16 run, the loss reduction and the EMA, stay IEEE float32)."""
    check_precision(precision, PRECISIONS[1:])
    return tf32_scope(precision == "tf32")


class AutocastModel(nn.Module):
    """``model``'s forward under ``torch.autocast(dtype)`` on the input's device; a floating
    output comes back in float32, or in the input's dtype if that is wider (a float64 solver
    state stays float64). Parameters are ``model``'s own (fp32 master weights); attributes the
    wrapper lacks (``learn_sigma``, ``num_classes``, ``no_sync`` ...) are ``model``'s.

    Args:
        model: the network (or its ``DistributedDataParallel``), called as ``model(x, ...)``.
        dtype: ``torch.bfloat16`` or ``torch.float16``.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        if dtype not in AUTOCAST_DTYPES.values():
            raise ValueError(f"autocast dtype must be torch.bfloat16 or torch.float16, got "
                             f"{dtype}")
        self.module = model
        self.autocast_dtype = dtype

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``model(x, *args, **kwargs)`` under autocast, cast back (see the class)."""
        # autocast lowers float32 only: a float64 solver state enters as float32
        args, kwargs = _narrow_float64((x, *args)), _narrow_float64(kwargs)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            out = self.module(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out.to(torch.promote_types(x.dtype, torch.float32))
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self._modules["module"], name)


def _narrow_float64(values):
    """float64 tensors of a tuple or dict of arguments as float32 (others unchanged)."""
    def narrow(v):
        return v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float64 else v
    if isinstance(values, dict):
        return {k: narrow(v) for k, v in values.items()}
    return tuple(narrow(v) for v in values)


def network_precision(model: nn.Module, precision: str) -> nn.Module:
    """``model`` as it runs in ``precision``: wrapped in :class:`AutocastModel` for
    ``'bf16'``/``'fp16'``, itself otherwise (TF32 is a scope: :func:`precision_scope`)."""
    check_precision(precision, PRECISIONS[1:])
    dtype = AUTOCAST_DTYPES.get(precision)
    return model if dtype is None else AutocastModel(model, dtype)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare network inside autocast, ``torch.compile`` and ``DistributedDataParallel``
    wrappers (its ``state_dict`` keys carry no ``module.`` or ``_orig_mod.`` prefix)."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(model, (AutocastModel, DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


__all__ = [
    "PRECISIONS",
    "SAMPLING_PRECISIONS",
    "AUTOCAST_DTYPES",
    "check_precision",
    "resolve_precision",
    "tf32_scope",
    "precision_scope",
    "AutocastModel",
    "network_precision",
    "unwrap_model",
]
