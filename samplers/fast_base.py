"""Shared options of the fast samplers: an NFE budget, the stopping time eps and a time grid.

The last step. Every fast sampler integrates from T down to ``eps`` and returns x_eps, a sample of
p_eps, as the reference does with ``noise_removal=False``. It does not jump from eps to t = 0 with
the denoiser x0_hat = E[x_0 | x_eps]: that first-order jump returns a posterior mean, whose spread
is too small by Var[x_0 | x_eps] (it concentrates samples on the modes' centres), and at low NFE it
is this jump, not the solver's order, that keeps samplers away from exact quality. With
eps = 1e-3 the remaining noise s(eps) (0.01 on the default VP and VE) is far below any data scale;
tests and benchmarks compare samples to exact draws of p_eps.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import sde_lib
from samplers.base import Sampler
from samplers.grids import TIME_GRIDS, MarginalTable, get_time_grid, marginal_table


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an int >= ``low``, or a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a ``TypeError`` naming it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_float(name: str, value: Any, low: float, high: float = float("inf"), *,
                closed_low: bool = False, closed_high: bool = False) -> float:
    """``value`` as a float in the interval from ``low`` to ``high`` (open unless ``closed_*``),
    else a ``ValueError`` naming it and the interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low <= value if closed_low else low < value)
    ok = ok and (value <= high if closed_high else value < high)
    if not ok:
        interval = f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


class FastSampler(Sampler):
    """Base of the fixed-grid fast samplers: validates ``nfe``, ``eps`` and ``grid``.

    ``callback(step, t, x, x0_pred_or_None)`` receives the live state, which later steps update
    in place (the loops reuse buffers): clone what you keep.

    Args:
        nfe: score-evaluation budget; the sampler uses at most this many.
        eps: the final time (samples are draws of p_eps).
        grid: name of a registered time grid (see ``samplers.grids``).
    """

    default_grid = "logsnr"
    default_nfe = 10

    def __init__(self, *, nfe: int | None = None, eps: float = 1e-3, grid: str | None = None,
                 **options: Any) -> None:
        super().__init__(**options)
        self.nfe = check_int("nfe", self.default_nfe if nfe is None else nfe, self.nfe_per_step)
        self.eps = check_float("eps", eps, 0.0)
        self.grid = self.default_grid if grid is None else grid
        TIME_GRIDS.get(self.grid)  # unknown names fail here, listing the valid ones

    def check_sde(self, sde: sde_lib.SDE) -> None:
        if not self.eps < sde.T:
            raise ValueError(f"eps={self.eps} must be below the SDE's end time T={sde.T}")

    def table(self, sde: sde_lib.SDE, n_steps: int, x: torch.Tensor) -> MarginalTable:
        """m, s, sigma, lambda/2 on this sampler's grid of ``n_steps`` steps (times like ``x``)."""
        return marginal_table(sde, get_time_grid(self.grid, sde, n_steps, self.eps), x)
