"""The scheduler side of the diffusers pixel adapter without diffusers itself: timesteps, the
DDIM grid and SDE that reproduce a DDIMScheduler run, and DDIM's final step to t = 0."""

from __future__ import annotations

import pytest
import torch

import samplers
from models.diffusers_unet import ddim_time_grid, scheduler_timesteps, sde_from_scheduler


def test_scheduler_timesteps_by_spacing():
    leading = scheduler_timesteps({"timestep_spacing": "leading"}, 50)
    assert leading[:3] == [980, 960, 940] and leading[-1] == 0 and len(leading) == 50
    offset = scheduler_timesteps({"timestep_spacing": "leading", "steps_offset": 1}, 50)
    assert offset == [k + 1 for k in leading]
    trailing = scheduler_timesteps({"timestep_spacing": "trailing"}, 50)
    assert trailing[:2] == [999, 979] and trailing[-1] == 19
    assert scheduler_timesteps({"timestep_spacing": "linspace"}, 4) == [999, 666, 333, 0]
    with pytest.raises(ValueError, match="Unknown timestep_spacing 'odd'; valid: leading"):
        scheduler_timesteps({"timestep_spacing": "odd"}, 10)


def test_ddim_grid_starts_at_the_first_timestep_and_ends_by_set_alpha_to_one():
    sde = sde_from_scheduler({})
    assert sde.N == 1000
    sde_k, options = ddim_time_grid({"set_alpha_to_one": True}, 50, sde)
    assert sde_k.N == 981  # T is timestep 980
    torch.testing.assert_close(sde_k.alphas_cumprod, sde.alphas_cumprod[:981], rtol=0, atol=0)
    grid = options["grid"]
    assert options["nfe"] == 50 and options["final_time_zero"] and float(grid[-1]) == 0.0
    # every step's time is its timestep's: t_k = (k + 1) / N'
    torch.testing.assert_close(grid[:-1] * 981 - 1, torch.arange(980, -1, -20).double())
    _, options = ddim_time_grid({"set_alpha_to_one": False}, 50, sde)
    # the last step from timestep 0 to alpha_bar_0 is the identity: left out
    assert options["nfe"] == 49 and not options["final_time_zero"]
    _, options = ddim_time_grid({"set_alpha_to_one": False, "steps_offset": 1}, 50, sde)
    assert options["nfe"] == 50 and float(options["grid"][-1]) == pytest.approx(1 / 982)


def test_sde_from_scheduler_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match="Unknown beta_schedule 'sigmoid'; valid: linear"):
        sde_from_scheduler({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="zero terminal SNR"):
        sde_from_scheduler({"rescale_betas_zero_snr": True})
    trained = sde_from_scheduler({"trained_betas": [0.1, 0.2, 0.3]})
    assert trained.N == 3


def test_ddim_final_step_to_time_zero_returns_the_posterior_mean():
    """On Gaussian data N(0, c^2 I) the exact score is -x / (m^2 c^2 + s^2): DDIM's last step
    onto t = 0 must return E[x_0 | x_t] = m c^2 / (m^2 c^2 + s^2) x_t from the state before it
    (a wrong coefficient at m = 1, s = 0 would not)."""
    sde = sde_from_scheduler({})
    c2 = 0.25

    def score_fn(x, t):
        m, s = sde.marginal_coeffs(t)
        return -x / (m**2 * c2 + s**2)[:, None]

    sde_k, options = ddim_time_grid({"set_alpha_to_one": True}, 10, sde)
    states = []
    x, info = samplers.sample(sde_k, score_fn, (64, 3), "ddim", generator=torch.Generator()
                              .manual_seed(0), callback=lambda i, t, x, _: states.append(
                                  (t.clone(), x.clone())), **options)
    assert info["nfe"] == 10
    t_prev, x_prev = states[-2]
    m, s = sde_k.marginal_coeffs(t_prev.double())
    expected = (m * c2 / (m**2 * c2 + s**2)).float()[:, None] * x_prev  # t_prev: (B,)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="finite and positive"):
        samplers.sample(sde_k, score_fn, (4, 3), "ddim", grid=options["grid"], nfe=10)
