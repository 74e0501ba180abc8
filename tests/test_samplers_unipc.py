"""UniPC (samplers/unipc.py) against closed forms and the exact Gaussian-mixture oracle.

Samples are compared with exact draws of p_eps by mean exact log-density and mode weights within
a few standard errors; the declared order is the fitted slope of the error against a dopri5
solution (rtol 1e-10) of the probability-flow ODE from the same x_T; the step weights are checked
against the variation-of-constants integral and the Taylor-fit weights of DPM-Solver++.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq

import sde_lib
from samplers import SAMPLERS, sample
from samplers.dpm_solver import _weights
from samplers.grids import get_time_grid
from samplers.unipc import UniPC, unipc_weights
from score_sde import oracle

EPS = 1e-3
SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.subVPSDE(), "ve": sde_lib.VESDE()}
UNIPC = [n for n in SAMPLERS.names() if issubclass(SAMPLERS.get(n), UniPC)]
F64 = torch.float64


@pytest.fixture(scope="module")
def problems():
    return {"ring": (oracle.GaussianMixture.ring(), 4000),
            "mix128": (oracle.GaussianMixture.random(128, 4, seed=0), 1000)}


def _z_scores(gm, sde, x, n):
    """(log-density z-score, max mode-weight z-score) of samples x against n exact draws."""
    ref = gm.sample_marginal(n, sde, EPS, generator=torch.Generator().manual_seed(123), dtype=F64)
    lp_x, lp_r = gm.log_prob(x, EPS, sde), gm.log_prob(ref, EPS, sde)
    se = math.sqrt(lp_x.var().item() / len(lp_x) + lp_r.var().item() / len(lp_r))
    z_lp = (lp_x.mean() - lp_r.mean()).item() / se
    w_x, w_r = (torch.bincount(gm.class_log_posterior(y, EPS, sde).argmax(1),
                               minlength=gm.n_modes) / len(y) for y in (x, ref))
    pooled = 0.5 * (w_x + w_r)
    se_w = (pooled * (1 - pooled) * (1 / len(x) + 1 / len(ref))).sqrt()
    return z_lp, ((w_x - w_r).abs() / se_w).max().item()


def _sample(name, sde, gm, n, score_fn=None, **options):
    score_fn = score_fn or gm.score_fn(sde)
    return sample(sde, score_fn, (n, gm.dim), name, dtype=F64,
                  generator=torch.Generator().manual_seed(0), **options)


# -- sample quality -------------------------------------------------------------------------

# Modest budgets at which each is exact-quality at these sample sizes (the whole NFE curve is
# in benchmarks/sampler_quality.py).
QUALITY = [("unipc_3", 40), ("unipc_2", 40)]


# On the ring for every SDE; in 128-D for one SDE per order by default (the rest under slow).
_QUALITY_128D_DEFAULT = {("unipc_3", "vp"), ("unipc_2", "ve")}


@pytest.mark.parametrize("name, nfe, sde_name, problem", [
    pytest.param(name, nfe, sde_name, problem, id=f"{name}-{nfe}-{sde_name}-{problem}",
                 marks=() if problem == "ring" or (name, sde_name) in _QUALITY_128D_DEFAULT
                 else pytest.mark.slow)
    for name, nfe in QUALITY for sde_name in SDES for problem in ("ring", "mix128")])
def test_quality_matches_exact_samples(name, nfe, sde_name, problem, problems):
    gm, n = problems[problem]
    sde = SDES[sde_name]
    x, info = _sample(name, sde, gm, n, nfe=nfe)
    assert torch.isfinite(x).all() and info["nfe"] == nfe
    z_lp, z_w = _z_scores(gm, sde, x, n)
    # 4.5 standard errors: a z-test at this sample size; a wrong sign or a missing factor 2
    # moves the mean log-density by tens of standard errors (test below).
    assert abs(z_lp) < 4.5, f"{name} on {sde_name}/{problem}: log-density off by {z_lp:.1f} SE"
    assert z_w < 4.5, f"{name} on {sde_name}/{problem}: mode weights off by {z_w:.1f} SE"


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["ring", "mix128"])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_quality_unipc_1(sde_name, problem, problems):
    gm, n = problems[problem]
    sde = SDES[sde_name]
    x, _ = _sample("unipc_1", sde, gm, n, nfe=200)
    z_lp, z_w = _z_scores(gm, sde, x, n)
    assert abs(z_lp) < 4.5 and z_w < 4.5, (z_lp, z_w)


@pytest.mark.parametrize("factor", [-1.0, 2.0])
def test_quality_check_detects_a_wrong_score(factor, problems):
    """The quality check's power: a flipped or doubled score fails it by far."""
    gm, n = problems["ring"]
    sde = SDES["vp"]
    x, _ = _sample("unipc_3", sde, gm, n, score_fn=lambda x, t: factor * gm.score(x, t, sde),
                   nfe=30)
    z_lp, _ = _z_scores(gm, sde, x, n)
    assert abs(z_lp) > 20


# -- convergence order ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def order_problem():
    """Per SDE: the ring, 16 prior draws x_T and x_eps from dopri5 (rtol 1e-10) on the
    probability-flow ODE (Song et al. 2021, eq. 13)."""
    gm = oracle.GaussianMixture.ring()
    out = {}
    for name, sde in SDES.items():
        x_T = sde.prior_sampling((16, 2), generator=torch.Generator().manual_seed(7), dtype=F64)
        flow = sde.probability_flow(gm.score_fn(sde))

        def drift(t, x, flow=flow):
            return flow.sde(x, t)[0]

        t = torch.tensor([sde.T, EPS], dtype=F64)
        # step_t: land on eps instead of stepping past it into t < 0.
        x_ref = torchdiffeq.odeint(drift, x_T, t, rtol=1e-10, atol=1e-10, method="dopri5",
                                   options={"step_t": t[1:]})[-1]
        out[name] = (gm, x_T, x_ref)
    return out


# Step counts in the asymptotic range, with errors >= 5e-9 (the reference's are ~1e-10).
ORDER_STEPS = {2: [64, 128, 256, 512], 3: [64, 128, 256, 512], 4: [128, 256, 512, 1024]}


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("name", UNIPC)
def test_convergence_order(name, sde_name, order_problem):
    """Fitted slope of log error against log NFE within 0.3 of the declared order, which is
    p + 1 for UniPC-p: UniC-p raises UniP-p by one (Zhao et al. 2023, Theorem 3.1)."""
    cls = SAMPLERS.get(name)
    assert cls.order == cls.predictor_order + 1
    gm, x_T, x_ref = order_problem[sde_name]
    sde = SDES[sde_name]
    errors = []
    for nfe in ORDER_STEPS[cls.order]:
        x, _ = sample(sde, gm.score_fn(sde), x_T.clone(), name, nfe=nfe)
        errors.append((x - x_ref).pow(2).sum(1).mean().sqrt().item())
    log_n = torch.tensor(ORDER_STEPS[cls.order], dtype=F64).log()
    log_e = torch.tensor(errors, dtype=F64).log()
    slope = -(((log_n - log_n.mean()) * (log_e - log_e.mean())).sum()
              / (log_n - log_n.mean()).pow(2).sum()).item()
    assert abs(slope - cls.order) < 0.3, f"{name}/{sde_name}: slope {slope:.2f}, errors {errors}"


# -- exact formulas -------------------------------------------------------------------------

def _coefficients(sde, t_s, t_t):
    (m_s, s_s), (m_t, s_t) = (sde.marginal_coeffs(torch.tensor(v, dtype=F64)) for v in (t_s, t_t))
    lam_s, lam_t = (0.5 * sde.log_snr(torch.tensor(v, dtype=F64)).item() for v in (t_s, t_t))
    return lam_s, lam_t, m_s.item(), s_s.item(), m_t.item(), s_t.item()


# UniP-1..3 (previous predictions only) and UniC-1..3 (plus the one at r = 1, tau = h).
TAUS = [[], [-0.4], [-0.4, -0.9], ["h"], ["h", -0.4], ["h", -0.4, -0.9]]


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("taus", TAUS, ids=str)
def test_step_is_exact_for_polynomial_predictions(taus, sde_name):
    """With x0_hat(lambda) a polynomial of degree len(taus), the step through len(taus) + 1
    points equals x_t = s_t/s_s x_s + s_t int e^lambda x0_hat dlambda (Lu et al. 2022b, eq. 8),
    so UniP-p has order p and UniC-p order p + 1 (Zhao et al. 2023, Cor. 3.2, Thm. 3.1)."""
    sde = SDES[sde_name]
    lam_s, lam_t, _, s_s, m_t, s_t = _coefficients(sde, 0.6, 0.3)
    h = lam_t - lam_s
    taus = [0.0] + [h if tau == "h" else tau for tau in taus]
    coeffs = [0.3, -1.2, 0.7, 0.25][: len(taus)]

    def f(lam):
        return sum(c * (lam - lam_s) ** k for k, c in enumerate(coeffs))

    a, b = unipc_weights(lam_s, lam_t, m_t, s_s, s_t, taus)
    x_s = 1.7
    step = a * x_s + sum(bj * f(lam_s + tau) for bj, tau in zip(b, taus))
    lam = torch.linspace(lam_s, lam_t, 200001, dtype=F64)
    exact = s_t / s_s * x_s + s_t * torch.trapezoid(torch.exp(lam) * f(lam), lam).item()
    assert step == pytest.approx(exact, rel=1e-9)
    # One degree more is not integrated exactly: the order is no higher than claimed.
    degree = len(taus)
    exact_next = s_t * torch.trapezoid(torch.exp(lam) * (lam - lam_s) ** degree, lam).item()
    step_next = sum(bj * tau**degree for bj, tau in zip(b, taus))
    assert abs(step_next - exact_next) > 1e-6 * abs(exact_next)


@pytest.mark.parametrize("taus", TAUS, ids=str)
def test_unip_and_unic_weights_equal_the_taylor_fit_weights(taus):
    """R_p a = phi_p / B is square, so B(h) drops out and each step equals DPM-Solver++'s
    exact Taylor-fit quadrature through the same points (``dpm_solver._weights``)."""
    lam_s, lam_t, m_s, s_s, m_t, s_t = _coefficients(SDES["vp"], 0.6, 0.3)
    h = lam_t - lam_s
    taus = [0.0] + [h if tau == "h" else tau for tau in taus]
    a, b = unipc_weights(lam_s, lam_t, m_t, s_s, s_t, taus)
    a_ref, b_ref = _weights("x0", lam_s, lam_t, m_s, s_s, m_t, s_t, taus)
    assert a == pytest.approx(a_ref, rel=1e-12)
    assert b == pytest.approx(b_ref, rel=1e-9, abs=1e-12)


# -- contract: NFE, orders, callback, errors ------------------------------------------------

@pytest.mark.parametrize("name", UNIPC)
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 7, 16])
def test_nfe_is_exact(name, nfe):
    gm, sde = oracle.GaussianMixture.ring(), SDES["ve"]
    calls = []

    def score_fn(x, t):
        calls.append(t.shape)
        return gm.score(x, t, sde)

    x, info = sample(sde, score_fn, (8, 2), name, nfe=nfe, generator=torch.Generator())
    assert info["nfe"] == len(calls) == nfe and info["n_steps"] == nfe
    assert all(shape == (8,) for shape in calls) and torch.isfinite(x).all()


@pytest.mark.parametrize("lower_order_final", [True, False])
def test_step_orders(lower_order_final):
    """min(p, i + 1) from the start; below 15 steps, the last steps drop to what remains."""
    sampler = SAMPLERS.get("unipc_3")(nfe=6, lower_order_final=lower_order_final)
    assert sampler.orders(6) == ([1, 2, 3, 3, 2, 1] if lower_order_final else [1, 2, 3, 3, 3, 3])
    assert sampler.orders(20) == [1, 2] + [3] * 18


def test_callback_gets_each_step_and_the_data_prediction():
    gm, sde = oracle.GaussianMixture.ring(), SDES["vp"]
    x_T = sde.prior_sampling((5, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
    seen = []
    x, _ = sample(sde, gm.score_fn(sde), x_T.clone(), "unipc_2", nfe=4,
                  callback=lambda i, t, x, x0: seen.append((i, t.clone(), x.clone(), x0)))
    assert [i for i, *_ in seen] == [0, 1, 2, 3]
    t0 = torch.full((5,), sde.T, dtype=F64)
    m, s = sde.marginal_coeffs(t0[0])
    grid = get_time_grid("logsnr", sde, 4, 1e-3)
    torch.testing.assert_close(seen[0][1], grid[1].expand(5))  # the state's time: the step's end
    torch.testing.assert_close(seen[-1][1], torch.full((5,), 1e-3, dtype=F64))
    torch.testing.assert_close(seen[0][3], (x_T + s**2 * gm.score(x_T, t0, sde)) / m)
    torch.testing.assert_close(seen[-1][2], x)


def test_float32_on_every_sde():
    gm = oracle.GaussianMixture.ring()
    for sde in SDES.values():
        x, _ = sample(sde, gm.score_fn(sde), (64, 2), "unipc_3", nfe=10,
                      generator=torch.Generator().manual_seed(0))
        assert x.dtype == torch.float32 and torch.isfinite(x).all()


def test_errors_name_value_and_choices():
    sde = SDES["vp"]
    score = oracle.GaussianMixture.ring().score_fn(sde)
    with pytest.raises(TypeError, match="lower_order_final must be a bool"):
        sample(sde, score, (2, 2), "unipc_2", lower_order_final=1)
    with pytest.raises(TypeError, match="unknown options: order"):
        sample(sde, score, (2, 2), "unipc_2", order=3)
    with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
        sample(sde, score, (2, 2), "unipc_3", nfe=0)
    with pytest.raises(ValueError, match="Unknown sampler 'unipc_4'; valid: .*unipc_3"):
        sample(sde, score, (2, 2), "unipc_4")
