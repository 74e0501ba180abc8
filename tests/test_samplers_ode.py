"""Probability-flow ODE sampler, encoding and decoding against the exact mixture oracle."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq
from test_samplers_pc import MIX100, RING, SDE_NAMES, Counter, assert_matches_exact, make_sde

from samplers import sample
from samplers.ode import FIXED_STEP_SOLVERS, TABLEAUS, decode, encode, ode_flow

F64 = torch.float64


@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("gm,n", [(RING, 1000), (MIX100, 200)], ids=["ring", "mix100"])
def test_ode_sampler_matches_exact(gm, n, sde_name):
    sde = make_sde(sde_name)
    x, info = sample(sde, gm.score_fn(sde), (n, gm.dim), "ode", dtype=F64,
                     generator=torch.Generator().manual_seed(0))
    assert_matches_exact(gm, x)
    assert info["solver"] == "dopri5" and info["nfe"] > 0


@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_encode_then_decode_returns_the_input(sde_name):
    sde = make_sde(sde_name)
    x0 = RING.sample_marginal(64, sde, 1e-3, generator=torch.Generator().manual_seed(1),
                              dtype=F64)
    z, info_enc = encode(sde, RING.score_fn(sde), x0)
    x, info_dec = decode(sde, RING.score_fn(sde), z)
    # Local tolerance 1e-5 per step and per sample; the global error stays within 50x of it.
    torch.testing.assert_close(x, x0, rtol=0, atol=5e-4)
    assert info_enc["nfe"] > 0 and info_dec["nfe"] > 0
    # The latent of data is a prior draw: unit variance per coordinate for VP, sigma_max for VE.
    _, s_T = sde.marginal_coeffs(torch.tensor(sde.T, dtype=F64))
    assert abs(z.std().item() / s_T.item() - 1) < 0.25


@pytest.mark.parametrize("solver", sorted(FIXED_STEP_SOLVERS))
def test_fixed_step_nfe_and_order(solver):
    """NFE = steps x evaluations per step exactly; the error against a tight dopri5 solution
    falls with the solver's order (fitted slope within 0.3 of 1, 2, 4)."""
    order = TABLEAUS[solver].order
    sde = make_sde("vp")
    x_T = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t_end = 0.3  # away from the stiff end, where the asymptotic order shows at small budgets
    ref, _ = ode_flow(sde, RING.score_fn(sde), x_T, 1.0, t_end, rtol=1e-11, atol=1e-11)
    steps = [16, 32, 64] if order < 4 else [8, 16, 32]
    errors = []
    for n in steps:
        score = Counter(RING.score_fn(sde))
        x, info = ode_flow(sde, score, x_T, 1.0, t_end, solver=solver, steps=n)
        assert info["nfe"] == score.calls == n * FIXED_STEP_SOLVERS[solver]
        errors.append((x - ref).abs().max().item())
    slope = -(math.log(errors[-1]) - math.log(errors[0])) / (math.log(steps[-1] / steps[0]))
    assert abs(slope - order) < 0.3, (errors, slope)


@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("solver", sorted(FIXED_STEP_SOLVERS))
def test_fixed_step_solvers_equal_torchdiffeq(solver, sde_name):
    """The tableau loop takes the steps torchdiffeq's method of the same name takes (rk4: the
    3/8 rule): equal to rounding in float64, decoding and encoding (from t = 0, where sub-VP
    has g = 0), where any wrong tableau entry or slope factor would differ at the 1e-3 level."""
    sde = make_sde(sde_name)
    score_fn = RING.score_fn(sde)

    def rhs(t, x):
        drift, diffusion = sde.sde(x, t.expand(x.shape[0]))
        return drift - 0.5 * diffusion[:, None] ** 2 * score_fn(x, t.expand(x.shape[0]))

    x_T = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    for t0, t1 in ((1.0, 0.05), (0.0, 1.0)):
        x, _ = ode_flow(sde, score_fn, x_T, t0, t1, solver=solver, steps=7)
        t = torch.tensor([t0, t1], dtype=F64)
        grid = torch.linspace(t0, t1, 8, dtype=F64)
        ref = torchdiffeq.odeint(rhs, x_T, t, method=solver,
                                 options={"grid_constructor": lambda *_, g=grid: g})[-1]
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
        assert (x - x_T).abs().max() > 1e-2  # it moved


def test_fixed_step_solver_rejects_a_nan_diffusion():
    class Broken(type(make_sde("vp"))):
        def sde(self, x, t):
            drift, diffusion = super().sde(x, t)
            return drift, torch.where(t > 0.5, diffusion, math.nan)

    sde = Broken(N=10)
    with pytest.raises(ValueError, match=r"must be finite.*g = nan at t = 0\.4"):
        ode_flow(sde, RING.score_fn(sde), torch.zeros(2, 2), 1.0, 0.1, solver="euler", steps=6)


@pytest.mark.parametrize("solver", sorted(FIXED_STEP_SOLVERS))
def test_fixed_step_solver_refuses_a_score_fn_returning_its_input(solver):
    """The loop updates the state in place while it reads the score: a score_fn returning its
    input would be overwritten silently (Euler: a wrong step), so it is a clear error."""
    sde = make_sde("vp")
    with pytest.raises(RuntimeError, match="returned its input"):
        ode_flow(sde, lambda x, t: x, torch.ones(3, 2), 1.0, 0.5, solver=solver, steps=2)


@pytest.mark.parametrize("solver", sorted(FIXED_STEP_SOLVERS))
def test_fixed_step_solver_on_image_shaped_input(solver):
    """(B, C, H, W) states give the flattened run's numbers (per-sample slopes, no reshape
    assumptions), from a non-contiguous x_T."""
    sde = make_sde("subvp")
    score_fn = RING.score_fn(sde)
    x_T = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(3))[:, ::2]
    flat, _ = ode_flow(sde, score_fn, x_T.contiguous(), 1.0, 0.1, solver=solver, steps=5)

    def image_score(x, t):  # (B, 1, 2, 1) <-> (B, 2)
        return score_fn(x.reshape(len(x), 2), t).reshape(x.shape)

    image, _ = ode_flow(sde, image_score, x_T[:, None, :, None], 1.0, 0.1, solver=solver,
                        steps=5)
    assert image.shape == (4, 1, 2, 1)
    torch.testing.assert_close(image.reshape(4, 2), flat, rtol=0, atol=0)


def test_denoise_adds_one_counted_evaluation():
    sde = make_sde("ve")
    kw = dict(solver="euler", steps=10, dtype=F64)
    score = Counter(RING.score_fn(sde))
    _, info = sample(sde, score, (4, 2), "ode", denoise=True, **kw)
    assert info["nfe"] == score.calls == 11


def test_ode_is_deterministic_given_x_T():
    sde = make_sde("subvp")
    x_T = torch.randn(5, 2, dtype=F64)
    xs = [sample(sde, RING.score_fn(sde), x_T, "ode", generator=torch.Generator().manual_seed(s))[0]
          for s in (0, 1)]
    assert torch.equal(*xs)


def test_bad_solver_options_explain():
    sde = make_sde("vp", N=3)
    with pytest.raises(ValueError, match="Unknown ODE solver 'rk45'; valid: .*dopri5.*rk4"):
        sample(sde, RING.score_fn(sde), (2, 2), "ode", solver="rk45")
    with pytest.raises(ValueError, match="needs steps"):
        sample(sde, RING.score_fn(sde), (2, 2), "ode", solver="euler")
    with pytest.raises(ValueError, match="chooses its own steps"):
        sample(sde, RING.score_fn(sde), (2, 2), "ode", steps=5)
    with pytest.raises(ValueError, match="rtol"):
        sample(sde, RING.score_fn(sde), (2, 2), "ode", rtol=0)
