"""Explicit time grids and tuned grids (samplers/fast_base.py, samplers/tuning.py).

An explicit grid equal to a registered one reproduces its samples bitwise; bad grids fail with
errors naming the problem. ``tune_time_grid`` lowers a solver's error against a fine-step
solution (also from a float32 pilot), counts its evaluations exactly and keeps to its candidate
budget, refuses samplers it cannot tune, and its grids make unipc_3 at 8 NFE and dpm_solver++_3m
at 10 NFE sample the exact 8-mode ring where the log-SNR grid is far off.
"""

from __future__ import annotations

import math

import pytest
import torch

import sde_lib
from samplers import CountingScore, sample, tune_time_grid
from samplers.grids import get_time_grid
from score_sde import oracle

EPS = 1e-3
F64 = torch.float64
SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.subVPSDE(), "ve": sde_lib.VESDE()}


def _sample(sde, gm, n, method, seed=0, **options):
    return sample(sde, gm.score_fn(sde), (n, gm.dim), method, dtype=F64,
                  generator=torch.Generator().manual_seed(seed), **options)


@pytest.mark.parametrize("method,n_steps", [("ddim", 7), ("dpm_solver++_3m", 6), ("unipc_3", 7),
                                            ("edm_heun", 4), ("dpm_solver_3", 3)])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_explicit_grid_equals_registered_grid(sde_name, method, n_steps):
    sde, gm = SDES[sde_name], oracle.GaussianMixture.ring()
    named, _ = _sample(sde, gm, 64, method, nfe=7, grid="karras")
    times = get_time_grid("karras", sde, n_steps, EPS)
    explicit, info = _sample(sde, gm, 64, method, nfe=7, grid=times)
    assert info["nfe"] <= 7
    assert torch.equal(named, explicit)
    # A plain list of floats works too.
    listed, _ = _sample(sde, gm, 64, method, nfe=7, grid=times.tolist())
    assert torch.equal(named, listed)


def test_explicit_grid_errors_name_the_problem():
    sde, gm = SDES["vp"], oracle.GaussianMixture.ring()
    good = get_time_grid("logsnr", sde, 9, EPS)
    with pytest.raises(ValueError, match="has 9 steps but DDIM takes 10 steps for nfe=10"):
        _sample(sde, gm, 8, "ddim", nfe=10, grid=good)
    with pytest.raises(ValueError, match="decrease strictly"):
        _sample(sde, gm, 8, "ddim", nfe=9, grid=good.flip(0))
    with pytest.raises(ValueError, match="start at the SDE's end time T=1"):
        _sample(sde, gm, 8, "ddim", nfe=8, grid=good[1:])
    with pytest.raises(ValueError, match="differs from the grid's last time"):
        _sample(sde, gm, 8, "ddim", nfe=9, grid=good, eps=0.01)
    with pytest.raises(ValueError, match="finite and positive"):
        _sample(sde, gm, 8, "ddim", nfe=2, grid=[1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="1-D with at least 2 times"):
        _sample(sde, gm, 8, "ddim", nfe=1, grid=good[:, None])
    with pytest.raises(TypeError, match="registered name or a 1-D sequence"):
        _sample(sde, gm, 8, "ddim", nfe=1, grid={"a": 1})
    with pytest.raises(ValueError, match="Unknown time grid 'nope'"):
        _sample(sde, gm, 8, "ddim", nfe=1, grid="nope")
    # The grid's last time is eps when eps is not given.
    x, _ = _sample(sde, gm, 8, "ddim", nfe=9, grid=good, callback=None)
    assert x.shape == (8, 2)


def test_tune_refuses_what_it_cannot_tune():
    sde, gm = SDES["vp"], oracle.GaussianMixture.ring()
    with pytest.raises(ValueError, match="'pc' is not one.*valid: .*dpm_solver\\+\\+_3m"):
        tune_time_grid(sde, gm.score_fn(sde), (8, 2), "pc", dtype=F64)
    with pytest.raises(ValueError, match="needs a deterministic sampler"):
        tune_time_grid(sde, gm.score_fn(sde), (8, 2), "ddim", eta=1.0, nfe=4, teacher_nfe=20,
                       dtype=F64)
    with pytest.raises(ValueError, match="do not pass grid="):
        tune_time_grid(sde, gm.score_fn(sde), (8, 2), "ddim", grid="uniform", dtype=F64)
    with pytest.raises(ValueError, match="max_evals must be an integer >= 1"):
        tune_time_grid(sde, gm.score_fn(sde), (8, 2), "ddim", max_evals=0, dtype=F64)


@pytest.mark.parametrize("sde_name", [  # sub-VP, the slowest to tune, under slow
    pytest.param(n, marks=pytest.mark.slow) if n == "subvp" else n for n in SDES])
def test_tuning_lowers_the_error_and_counts_its_evaluations(sde_name):
    sde, gm = SDES[sde_name], oracle.GaussianMixture.ring()
    score = CountingScore(gm.score_fn(sde))
    grid, info = tune_time_grid(sde, score, (64, 2), "dpm_solver++_2m", nfe=6, teacher_nfe=200,
                                max_evals=150, dtype=F64,
                                generator=torch.Generator().manual_seed(1))
    assert info["nfe"] == score.nfe and info["evals"] <= 150
    assert info["n_steps"] == 6 and grid.shape == (7,) and grid.dtype == F64
    assert grid[0] == sde.T and grid[-1] == EPS and bool((grid[1:] < grid[:-1]).all())
    assert info["mse"] < 0.5 * info["mse_start"]
    # The report's error is the tuned grid's: rerun it from the same pilot noise.
    x_T = sde.prior_sampling((64, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
    x_ref, _ = sample(sde, gm.score_fn(sde), x_T, "dpm_solver++_3m", nfe=200)
    x, run = sample(sde, gm.score_fn(sde), x_T, "dpm_solver++_2m", nfe=6, grid=grid)
    assert run["nfe"] == 6
    assert math.isclose((x - x_ref).pow(2).mean().item(), info["mse"], rel_tol=1e-9)


def _z_lp(gm, sde, x, n):
    ref = gm.sample_marginal(n, sde, EPS, generator=torch.Generator().manual_seed(123), dtype=F64)
    lp_x, lp_r = gm.log_prob(x, EPS, sde), gm.log_prob(ref, EPS, sde)
    se = math.sqrt(lp_x.var().item() / len(lp_x) + lp_r.var().item() / len(lp_r))
    return (lp_x.mean() - lp_r.mean()).item() / se


def test_tuning_refuses_a_score_that_is_not_finite():
    sde = SDES["vp"]
    with pytest.raises(ValueError, match="non-finite"):
        tune_time_grid(sde, lambda x, t: torch.full_like(x, math.nan), (8, 2), nfe=4,
                       teacher_nfe=20, max_evals=5, dtype=F64)


def test_tuning_a_float32_pilot_lowers_the_error():
    # Finite-difference gradients of the error must stand clear of float32 rounding.
    sde, gm = SDES["ve"], oracle.GaussianMixture.ring()
    grid, info = tune_time_grid(sde, gm.score_fn(sde), (64, 2), nfe=6, teacher_nfe=200,
                                max_evals=150, dtype=torch.float32,
                                generator=torch.Generator().manual_seed(1))
    assert grid.dtype == F64 and info["evals"] <= 150
    assert info["mse"] < 0.5 * info["mse_start"]


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("sde_name,method,nfe", [
    ("vp", "unipc_3", 8),
    pytest.param("subvp", "unipc_3", 8, marks=_SLOW),
    # On VE at 8 NFE the log-SNR grid happens to be within 2 SE already: test at 10.
    pytest.param("ve", "unipc_3", 10, marks=_SLOW),
    *[pytest.param(name, "dpm_solver++_3m", 10, marks=_SLOW) for name in SDES]])
def test_tuned_grid_samples_the_ring_exactly(sde_name, method, nfe):
    # The 8-mode ring: at these budgets on the log-SNR grid both solvers are off (tens of SE,
    # samples between the modes); on a grid tuned from 256 pilot samples (another seed) they
    # are exact, by the criterion the log-SNR grid fails.
    sde, gm, n = SDES[sde_name], oracle.GaussianMixture.ring(), 8000
    grid, info = tune_time_grid(sde, gm.score_fn(sde), (256, 2), method, nfe=nfe,
                                max_evals=800, dtype=F64,
                                generator=torch.Generator().manual_seed(99))
    tuned, _ = _sample(sde, gm, n, method, seed=7, nfe=nfe, grid=grid)
    plain, _ = _sample(sde, gm, n, method, seed=7, nfe=nfe)
    assert abs(_z_lp(gm, sde, tuned, n)) < 3.5
    assert abs(_z_lp(gm, sde, plain, n)) > 3.5


@pytest.mark.parametrize("sde_name", list(SDES))
def test_init_grid_is_refined_or_resampled_in_log_snr(sde_name):
    from samplers.tuning import _resample

    sde = SDES[sde_name]
    lam = sde.log_snr
    # Fewer steps: its times kept, the widest steps halved in log-SNR, the widest first.
    base = get_time_grid("karras", sde, 5, EPS)
    refined = _resample(sde, base, 7, EPS)
    assert refined.shape == (8,) and bool((refined[1:] < refined[:-1]).all())
    assert all(bool(torch.isclose(refined, t, rtol=1e-12).any()) for t in base)
    widest = int(torch.diff(lam(base)).argmax())
    half = 0.5 * (lam(base)[widest] + lam(base)[widest + 1])
    assert bool(torch.isclose(lam(refined), half, atol=1e-9).any())
    # More steps: a uniform log-SNR grid interpolates to the uniform log-SNR grid.
    moved = _resample(sde, get_time_grid("logsnr", sde, 12, EPS), 5, EPS)
    torch.testing.assert_close(lam(moved), lam(get_time_grid("logsnr", sde, 5, EPS)),
                               rtol=0, atol=1e-9)
    assert moved[0] == sde.T and moved[-1] == EPS


def test_tuning_starts_from_init_when_it_is_best():
    # A grid tuned for 6 NFE, resampled, is a better start for 7 than any registered grid.
    sde, gm = SDES["vp"], oracle.GaussianMixture.ring()
    kw = dict(teacher_nfe=200, dtype=F64, generator=torch.Generator().manual_seed(1))
    grid6, _ = tune_time_grid(sde, gm.score_fn(sde), (64, 2), "dpm_solver++_2m", nfe=6,
                              max_evals=150, **kw)
    kw["generator"] = torch.Generator().manual_seed(1)
    grid7, info = tune_time_grid(sde, gm.score_fn(sde), (64, 2), "dpm_solver++_2m", nfe=7,
                                 max_evals=20, init=grid6, **kw)
    assert info["start"] == "init" and grid7.shape == (8,)
    assert info["mse"] <= info["mse_start"]


def test_tuning_counts_the_evaluations_of_a_two_evaluation_step_sampler():
    # The report counts what each run spent (read from the runs, not assumed from the budget).
    sde, gm = SDES["vp"], oracle.GaussianMixture.ring()
    score = CountingScore(gm.score_fn(sde))
    _, info = tune_time_grid(sde, score, (16, 2), "edm_heun", nfe=6, teacher_nfe=50,
                             max_evals=10, dtype=F64)
    assert info["nfe"] == score.nfe
