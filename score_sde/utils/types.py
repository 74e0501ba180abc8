"""Type aliases shared across the toolkit."""

from __future__ import annotations

from collections.abc import Callable

import torch

#: ``score_fn(x, t) -> score``: x (B, *D), t (B,) -> score (B, *D) = grad_x log p_t(x).
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Maps data from model space back to the data space, e.g. [-1, 1] -> [0, 1].
InverseScaler = Callable[[torch.Tensor], torch.Tensor]
