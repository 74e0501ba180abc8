"""Memory options of the networks: activation checkpointing and the channels_last layout.

* ``config.model.grad_checkpoint``: the residual and attention blocks of the U-Nets (NCSN++,
  DDPM++, DDPM, NCSNv2) and the transformer blocks of DiT keep only their inputs during the
  forward pass and recompute their activations during the backward pass (Chen et al. 2016,
  "Training deep nets with sublinear memory cost"): activation memory drops from one copy per
  layer to one per block boundary, for about one more forward pass of compute. Only in training
  mode with gradients enabled; sampling, evaluation and the likelihood's divergence (eval mode)
  run the plain blocks. Dropout masks are the same in the recomputation (torch restores the RNG
  state), so gradients equal the plain model's.
* ``config.model.channels_last``: the U-Nets' 4-D parameters and inputs in
  ``torch.channels_last`` (NHWC) memory format, which cuDNN's convolution kernels prefer on
  tensor-core GPUs; outputs are returned in the default layout. Values, state-dict keys and
  checkpoints are unchanged (``load_state_dict`` copies across layouts).

Both are properties of the model, not of its weights: no wrapper module is added, so state dicts
are exactly those of the plain model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

#: The config keys (``config.model.<key>``), each a bool, default False.
MEMORY_KEYS = ("grad_checkpoint", "channels_last")


class CheckpointedBlock:
    """Mixin for an ``nn.Module`` block whose activations may be recomputed in the backward pass.

    With ``grad_checkpoint`` set (by :func:`set_grad_checkpoint`), a call in training mode with
    gradients enabled runs through ``torch.utils.checkpoint.checkpoint`` (non-reentrant, RNG
    state preserved); otherwise the block runs as usual. Put it before ``nn.Module`` in the
    bases: ``class ResnetBlock(CheckpointedBlock, nn.Module)``. The recomputation goes through
    ``nn.Module.__call__`` again, so the block's forward hooks fire twice.
    """

    grad_checkpoint: bool = False

    def __call__(self, *args, **kwargs):
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


def set_grad_checkpoint(model: nn.Module, enabled: bool) -> int:
    """Turn activation checkpointing of every :class:`CheckpointedBlock` in ``model`` on or off.

    Returns:
        the number of blocks switched (0: the model has no checkpointable blocks).
    """
    blocks = [m for m in model.modules() if isinstance(m, CheckpointedBlock)]
    for block in blocks:
        block.grad_checkpoint = bool(enabled)
    return len(blocks)


def read_memory_options(config, model_name: str, grad_checkpoint: bool = True,
                        channels_last: bool = True, why: str = "") -> tuple[bool, bool]:
    """``config.model.grad_checkpoint`` and ``config.model.channels_last`` (False when absent).

    Args:
        config: the experiment config.
        model_name: for the messages.
        grad_checkpoint, channels_last: whether the model supports each option.
        why: the reason an unsupported option is refused, appended to the message.
    Returns:
        (grad_checkpoint, channels_last) as bools.
    Raises:
        ValueError: a value that is not a bool, or True for an option the model does not
            support (naming the model and the models that do).
    """
    supported = {"grad_checkpoint": grad_checkpoint, "channels_last": channels_last}
    models_with = {"grad_checkpoint": "ncsnpp, ddpm, ncsnv2_* and dit",
                   "channels_last": "the convolutional U-Nets ncsnpp, ddpm and ncsnv2_*"}
    values = []
    for key in MEMORY_KEYS:
        value = config.model.get(key, False)
        value = False if value is None else value
        if not isinstance(value, bool):
            raise ValueError(f"config.model.{key} must be True or False, got "
                             f"{type(value).__name__} {value!r}")
        if value and not supported[key]:
            raise ValueError(f"{model_name} does not support config.model.{key} = True "
                             f"({key} is available on {models_with[key]}){why}; set it to False")
        values.append(value)
    return values[0], values[1]


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` (B, C, H, W) in ``torch.channels_last`` if asked, else in the default
    (contiguous) layout; a no-op when it already is."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def apply_channels_last(model: nn.Module) -> nn.Module:
    """``model`` with its 4-D parameters and buffers in channels_last when
    ``model.channels_last`` is True (set by the model from its config); else unchanged."""
    if getattr(model, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    return model


def match_optimizer_state_layout(optimizer: torch.optim.Optimizer) -> int:
    """Put each per-parameter optimizer buffer (``exp_avg``, ``exp_avg_sq``, ...) in the memory
    layout of its parameter, values unchanged.

    A checkpoint written with one layout and resumed with the other (``channels_last`` switched)
    loads its buffers in the old layout; torch's fused Adam assumes a buffer laid out as its
    parameter and, on CPU (torch 2.13), silently mixes up elements otherwise. Call it after
    ``optimizer.load_state_dict``.

    Returns:
        the number of buffers re-laid out.
    """
    moved = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if (isinstance(value, torch.Tensor) and value.shape == p.shape
                        and value.stride() != p.stride()):
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
                    moved += 1
    return moved
