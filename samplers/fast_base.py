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
from collections.abc import Sequence
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
        eps: the final time (samples are draws of p_eps); default 1e-3, or the last time of an
            explicit ``grid``.
        grid: name of a registered time grid (see ``samplers.grids``), or explicit times
            (n_steps + 1,) decreasing from T to eps, e.g. from :func:`samplers.tune_time_grid`;
            their number of steps must be the one this sampler takes for ``nfe``.
    """

    default_grid = "logsnr"
    default_nfe = 10
    stops_at_eps = True

    def __init__(self, *, nfe: int | None = None, eps: float | None = None,
                 grid: str | torch.Tensor | Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.nfe = check_int("nfe", self.default_nfe if nfe is None else nfe, self.nfe_per_step)
        self.grid = self.default_grid if grid is None else grid
        if isinstance(self.grid, str):
            TIME_GRIDS.get(self.grid)  # unknown names fail here, listing the valid ones
            self.eps = check_float("eps", 1e-3 if eps is None else eps, 0.0)
        else:
            self.grid = check_time_grid(self.grid)
            last = float(self.grid[-1])
            if eps is not None and not math.isclose(check_float("eps", eps, 0.0), last,
                                                    rel_tol=1e-9):
                raise ValueError(f"eps={eps!r} differs from the grid's last time {last!r}")
            self.eps = last

    def check_sde(self, sde: sde_lib.SDE) -> None:
        if not self.eps < sde.T:
            raise ValueError(f"eps={self.eps} must be below the SDE's end time T={sde.T}")
        if not isinstance(self.grid, str) and not math.isclose(float(self.grid[0]), sde.T,
                                                               rel_tol=1e-9):
            raise ValueError(f"the grid must start at the SDE's end time T={sde.T}, "
                             f"got {float(self.grid[0])!r}")

    def table(self, sde: sde_lib.SDE, n_steps: int, x: torch.Tensor) -> MarginalTable:
        """m, s, sigma, lambda/2 on this sampler's grid of ``n_steps`` steps (times like ``x``)."""
        if isinstance(self.grid, str):
            return marginal_table(sde, get_time_grid(self.grid, sde, n_steps, self.eps), x)
        if len(self.grid) != n_steps + 1:
            raise ValueError(
                f"the grid has {len(self.grid) - 1} steps but {type(self).__name__} takes "
                f"{n_steps} steps for nfe={self.nfe}: pass {n_steps + 1} times, or the nfe the "
                f"grid was made for")
        return marginal_table(sde, self.grid, x)


def check_time_grid(grid: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Explicit times as a float64 CPU tensor (n + 1,), n >= 1, finite, positive and strictly
    decreasing (from T to eps); else a ``ValueError`` saying what is wrong."""
    try:
        t = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"grid must be a registered name or a 1-D sequence of times, got "
                        f"{type(grid).__name__}") from err
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"an explicit grid must be 1-D with at least 2 times, got shape "
                         f"{tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError(f"grid times must be finite and positive, got {t.tolist()}")
    if not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"grid times must decrease strictly (from T to eps), got {t.tolist()}")
    return t.clone()
