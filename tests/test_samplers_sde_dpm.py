"""Stochastic multistep DPM-Solver++ (samplers/sde_dpm_solver.py) against the exact oracle."""

from __future__ import annotations

import math

import pytest
import torch
from test_samplers_fast import SDES, _compare, _exact

from samplers import sample
from samplers.sde_dpm_solver import sde_weights
from score_sde import oracle

NAMES = ["dpm_solver++_2m_sde", "dpm_solver++_3m_sde"]


# On the ring for every SDE; in 128-D on VP by default, on sub-VP and VE under slow.
@pytest.mark.parametrize("sde_name, problem, n", [
    pytest.param(sde_name, problem, n, id=f"{sde_name}-{problem}-{n}",
                 marks=pytest.mark.slow if problem == "mix128" and sde_name != "vp" else ())
    for sde_name in SDES for problem, n in (("ring", 4000), ("mix128", 1000))])
def test_third_order_drift_matches_exact_samples_at_100_nfe(sde_name, problem, n):
    """Within 4.5 standard errors of exact draws of p_eps in mean log-density and mode weights
    (a wrong sign, factor 2 or swapped m/s is off by tens of SE; so is ``ddim`` with eta = 1 at
    this budget on the 128-D mixture, about +20 SE)."""
    gm = oracle.GaussianMixture.ring() if problem == "ring" else oracle.GaussianMixture.random(
        128, 4, seed=0)
    sde = SDES[sde_name]
    x, info = sample(sde, gm.score_fn(sde), (n, gm.dim), "dpm_solver++_3m_sde", nfe=100,
                     dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert info["nfe"] == 100 and torch.isfinite(x).all()
    z_lp, z_w = _compare(gm, sde, x, _exact(gm, sde, n))
    assert abs(z_lp) < 4.5, f"{sde_name}/{problem}: log-density off by {z_lp:.1f} SE"
    assert z_w < 4.5, f"{sde_name}/{problem}: mode weights off by {z_w:.1f} SE"


def test_higher_order_drift_removes_the_bias_of_ancestral_sampling():
    """At 100 NFE on the 128-D mixture, ancestral sampling (the first-order member) is far off
    and the second-order drift is not: the correction term is what makes the difference."""
    gm, sde, n = oracle.GaussianMixture.random(128, 4, seed=0), SDES["vp"], 1000
    ref = _exact(gm, sde, n)
    z = {}
    for name, opts in (("ddim", {"eta": 1.0}), ("dpm_solver++_2m_sde", {})):
        x, _ = sample(sde, gm.score_fn(sde), (n, 128), name, nfe=100, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(1), **opts)
        z[name] = _compare(gm, sde, x, ref)[0]
    assert z["ddim"] > 8 and abs(z["dpm_solver++_2m_sde"]) < 4.5, z


@pytest.mark.parametrize("name", NAMES)
def test_first_step_is_ancestral_sampling(name):
    """With no history the step is DDIM with eta = 1 (Song, Meng & Ermon 2021, eq. 12)."""
    gm, sde = oracle.GaussianMixture.ring(), SDES["subvp"]
    runs = [sample(sde, gm.score_fn(sde), (64, 2), method, nfe=1, dtype=torch.float64,
                   generator=torch.Generator().manual_seed(5), **opts)[0]
            for method, opts in ((name, {}), ("ddim", {"eta": 1.0}))]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q", [1, 2, 3])
def test_drift_weights_integrate_polynomial_predictions_exactly(q):
    """For x0_hat(lambda) a polynomial of degree q - 1, a x_s + sum_j b_j x0_hat_j equals the
    variation-of-constants integral of the module docstring (quadrature), and c^2 is the exact
    transition variance s_t^2 (1 - e^(-2h))."""
    sde = SDES["vp"]
    t_s, t_t = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.35, dtype=torch.float64)
    (_, s_s), (m_t, s_t) = sde.marginal_coeffs(t_s), sde.marginal_coeffs(t_t)
    lam_s, lam_t = 0.5 * sde.log_snr(t_s).item(), 0.5 * sde.log_snr(t_t).item()
    taus = [0.0, -0.3, -0.7][:q]
    coef = [0.4, -1.1, 0.6][:q]

    def x0(lam):
        return sum(c * (lam - lam_s) ** k for k, c in enumerate(coef))

    a, b, c = sde_weights(lam_s, lam_t, m_t.item(), s_s.item(), s_t.item(), taus)
    x_s = 0.9
    step = a * x_s + sum(bj * x0(lam_s + tau) for bj, tau in zip(b, taus))
    lam = torch.linspace(lam_s, lam_t, 200001, dtype=torch.float64)
    h = lam_t - lam_s
    exact = (s_t / s_s * math.exp(-h) * x_s
             + 2 * m_t * torch.trapezoid(torch.exp(-2 * (lam_t - lam)) * x0(lam), lam))
    assert step == pytest.approx(exact.item(), rel=1e-9)
    assert c**2 == pytest.approx((s_t**2 * -math.expm1(-2 * h)).item(), rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_seeds_independent_of_batch(name):
    gm, sde = oracle.GaussianMixture.ring(), SDES["ve"]
    seeds = list(range(200, 232))
    batch, _ = sample(sde, gm.score_fn(sde), (32, 2), name, seeds=seeds, nfe=20,
                      dtype=torch.float64)
    for k in (0, 31):
        single, _ = sample(sde, gm.score_fn(sde), (1, 2), name, seeds=[seeds[k]], nfe=20,
                           dtype=torch.float64)
        torch.testing.assert_close(single[0], batch[k], rtol=1e-12, atol=1e-12)


def test_lower_order_final_lowers_the_last_orders_only_below_15_steps():
    from samplers.sde_dpm_solver import SDEDPMSolverPP3M
    assert SDEDPMSolverPP3M(nfe=6).orders(6) == [1, 2, 3, 3, 3, 3]
    assert SDEDPMSolverPP3M(nfe=6, lower_order_final=True).orders(6) == [1, 2, 3, 3, 2, 1]
    assert SDEDPMSolverPP3M(nfe=16, lower_order_final=True).orders(16)[-1] == 3
    with pytest.raises(TypeError, match="lower_order_final must be a bool"):
        SDEDPMSolverPP3M(lower_order_final="yes")
