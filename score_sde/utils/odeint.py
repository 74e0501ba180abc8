"""Options that keep an adaptive torchdiffeq solve inside its time interval."""

from __future__ import annotations

import torch


def bounded_odeint_options(time_grid: torch.Tensor, first_step_fraction: float = 0.01) -> dict:
    """torchdiffeq options under which an adaptive Runge-Kutta solve over the increasing
    ``time_grid`` (K,) evaluates its function only at times in [time_grid[0], time_grid[-1]].

    Left alone, torchdiffeq steps past the last time and interpolates back, and its initial-step
    probe (Hairer et al., Sec. II.4) evaluates at t_0 + h_0 with no upper bound: on a score model
    both leave the trained range (and VP is NaN before 0). Here every grid time is a step boundary
    (``step_t``; the stages of a step lie in [t_n, t_{n+1}], its last one at t_{n+1}) and the first
    step is a fixed fraction of the interval (``first_step``), so there is no probe. The solution
    at the grid times is that of the unchanged ODE.

    Args:
        time_grid: increasing output times (K,), K >= 2, on the state's device and dtype.
        first_step_fraction: the first step as a fraction of the interval; the step controller
            shrinks it if it is rejected.
    Returns:
        the ``options`` dict for ``torchdiffeq.odeint`` (add ``norm`` etc. to it).
    """
    span = time_grid[-1] - time_grid[0]  # stays on the grid's device: no host synchronisation
    return {"first_step": first_step_fraction * span, "step_t": time_grid[1:]}
