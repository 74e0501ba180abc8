"""Fast samplers (DDIM, EDM, DPM-Solver(++), adaptive) against the exact Gaussian-mixture oracle.

Closed forms first: samples are compared with exact draws of p_eps (the samplers stop at eps), by
mean exact log-density and mode weights within a few standard errors; convergence orders are fitted
against a torchdiffeq dopri5 solution (rtol 1e-10) of the probability-flow ODE from the same x_T.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchdiffeq

import samplers
import sde_lib
from samplers import SAMPLERS, sample
from samplers.adaptive import AdaptiveSDE
from samplers.dpm_solver import DPMSolver, _weights, phi
from samplers.fast_base import FastSampler
from samplers.grids import TIME_GRIDS, get_time_grid
from score_sde import oracle

EPS = 1e-3
SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.subVPSDE(), "ve": sde_lib.VESDE()}
FAST = [n for n in SAMPLERS.names() if issubclass(SAMPLERS.get(n), (FastSampler, AdaptiveSDE))]
DPM = [n for n in FAST if issubclass(SAMPLERS.get(n), DPMSolver)]
# Options that switch on the stochastic part of each stochastic sampler.
STOCHASTIC = {"ddim": {"eta": 1.0}, "edm_heun": {"churn": 10.0}, "adaptive": {}}


@pytest.fixture(scope="module")
def problems():
    return {"ring": (oracle.GaussianMixture.ring(), 4000), "mix128": (
        oracle.GaussianMixture.random(128, 4, seed=0), 1000)}


def _exact(gm, sde, n):
    return gm.sample_marginal(n, sde, EPS, generator=torch.Generator().manual_seed(123),
                              dtype=torch.float64)


def _compare(gm, sde, x, ref):
    """(log-density z-score, max mode-weight z-score) of samples x against exact samples ref."""
    lp_x, lp_r = gm.log_prob(x, EPS, sde), gm.log_prob(ref, EPS, sde)
    se = math.sqrt(lp_x.var().item() / len(lp_x) + lp_r.var().item() / len(lp_r))
    z_lp = (lp_x.mean() - lp_r.mean()).item() / se
    K = gm.n_modes
    w_x = torch.bincount(gm.class_log_posterior(x, EPS, sde).argmax(1), minlength=K) / len(x)
    w_r = torch.bincount(gm.class_log_posterior(ref, EPS, sde).argmax(1), minlength=K) / len(ref)
    pooled = 0.5 * (w_x + w_r)
    se_w = (pooled * (1 - pooled) * (1 / len(x) + 1 / len(ref))).sqrt()
    z_w = ((w_x - w_r).abs() / se_w).max().item()
    return z_lp, z_w


def _run(name, sde, gm, n, seed=0, **options):
    cls = SAMPLERS.get(name)
    opts = dict(STOCHASTIC.get(name, {})) if cls.stochastic else {}
    opts.update(options)
    return sample(sde, gm.score_fn(sde), (n, gm.dim), name, dtype=torch.float64,
                  generator=torch.Generator().manual_seed(seed), **opts)


# -- sample quality -------------------------------------------------------------------------

# (sampler, nfe, options): modest budgets at which each is exact-quality at these sample sizes
# (benchmarks/sampler_quality.py has the whole NFE curve).
QUALITY_DEFAULT = [("dpm_solver_3", 48, {}), ("dpm_solver++_3m", 48, {}),
                   ("dpm_solver++_2m", 60, {}), ("edm_heun", 160, {"churn": 0.0})]
QUALITY_SLOW = [("ddim", 1000, {"eta": 0.0}), ("ddim", 1000, {"eta": 1.0}),
                ("edm_heun", 400, {"churn": 10.0}), ("dpm_solver_1", 1000, {}),
                ("dpm_solver++_1", 1000, {}), ("dpm_solver_2", 60, {}), ("dpm_solver_2m", 60, {}),
                ("dpm_solver_3m", 48, {}), ("dpm_solver++_2s", 60, {}),
                ("dpm_solver++_3s", 48, {})]


def _quality(name, nfe, options, sde_name, problem, problems):
    gm, n = problems[problem]
    sde = SDES[sde_name]
    x, info = _run(name, sde, gm, n, nfe=nfe, **options)
    assert torch.isfinite(x).all()
    z_lp, z_w = _compare(gm, sde, x, _exact(gm, sde, n))
    # 4.5 standard errors: a z-test at this sample size; a wrong sign, a missing factor 2 or a
    # swapped m(t)/s(t) moves the mean log-density by tens of standard errors.
    assert abs(z_lp) < 4.5, f"{name} on {sde_name}/{problem}: log-density off by {z_lp:.1f} SE"
    assert z_w < 4.5, f"{name} on {sde_name}/{problem}: mode weights off by {z_w:.1f} SE"


#: VP in the default suite, sub-VP and VE under ``slow``.
VP_THEN_SLOW = ["vp", *(pytest.param(n, marks=pytest.mark.slow) for n in ("subvp", "ve"))]


def _quality_cases():
    """QUALITY_DEFAULT on every SDE: on the 2-D ring always, in 128-D for one SDE per sampler
    (a different one for each of the first three) by default, the other 128-D cases under slow."""
    cases = []
    for k, (name, nfe, options) in enumerate(QUALITY_DEFAULT):
        for sde_name in SDES:
            for problem in ("ring", "mix128"):
                default = problem == "ring" or sde_name == list(SDES)[k % len(SDES)]
                cases.append(pytest.param(name, nfe, options, sde_name, problem,
                                          marks=() if default else pytest.mark.slow,
                                          id=f"{name}-{nfe}-options{k}-{sde_name}-{problem}"))
    return cases


@pytest.mark.parametrize("name, nfe, options, sde_name, problem", _quality_cases())
def test_quality_matches_exact_samples(name, nfe, options, sde_name, problem, problems):
    _quality(name, nfe, options, sde_name, problem, problems)


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["ring", "mix128"])
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("name, nfe, options", QUALITY_SLOW)
def test_quality_matches_exact_samples_slow(name, nfe, options, sde_name, problem, problems):
    _quality(name, nfe, options, sde_name, problem, problems)


# VP in the default suite, the other SDEs under slow (the same error control on each SDE).
@pytest.mark.parametrize("sde_name", VP_THEN_SLOW)
def test_adaptive_quality_high_dimension(sde_name, problems):
    """nfe=None, the default: no budget, every sample error-controlled down to eps."""
    _quality("adaptive", None, {"rtol": 0.05}, sde_name, "mix128", problems)


# VP in the default suite (it alone catches the missing Brownian memory at -8 SE), the other SDEs
# (the slowest tests of this file) under slow.
@pytest.mark.parametrize("sde_name", VP_THEN_SLOW)
def test_adaptive_quality_ring(sde_name, problems):
    """Low dimension, where the error norm cannot average the noise out: without the Brownian
    memory, acceptance selected the noise (log-density -8, -11, -27 SE on VP, sub-VP, VE)."""
    _quality("adaptive", None, {"rtol": 0.01}, sde_name, "ring", problems)


def test_adaptive_budget_reports_and_warns_forced_samples():
    """Where the budget runs out, the samples still running take an unchecked step to eps: the
    report counts them and gives the time they had reached, and a warning says so. With
    atol = rtol ~ 0 the first steps are rejected until h is ~1e-10: all samples are forced from
    ~T. On the VE ring at nfe = 40: some are, from a time that some sample was at before the
    last iteration."""
    gm, sde = oracle.GaussianMixture.ring(), SDES["ve"]
    with pytest.warns(RuntimeWarning, match="16 of 16 samples .* forced step .* t=1"):
        x, info = _run("adaptive", sde, gm, 16, nfe=20, rtol=1e-12, atol=1e-12)
    assert info["forced"] == 16 and 1 - 1e-6 < info["t_reached"] <= sde.T
    assert info["iterations"] == 10 and (info["rejected"] >= 3).all() and torch.isfinite(x).all()
    seen = []
    with pytest.warns(RuntimeWarning, match="budget ran out"):
        _, info = _run("adaptive", sde, gm, 256, nfe=40,
                       callback=lambda i, t, x, x0: seen.append(t.clone()))
    before_last = seen[-2]  # each sample's time before the last (forcing) iteration
    assert 0 < info["forced"] <= int((before_last > EPS).sum())
    assert EPS < info["t_reached"] <= before_last.max().item()
    assert bool((before_last == info["t_reached"]).any())
    torch.testing.assert_close(seen[-1], torch.full_like(seen[-1], EPS), rtol=0, atol=0)


def test_adaptive_without_budget_runs_to_eps_without_forcing():
    """nfe=None (the default): no forced step, no warning, every sample at eps by its own
    accepted steps; the same run under a budget it does not exhaust gives the same bits."""
    gm, sde = oracle.GaussianMixture.ring(), SDES["ve"]
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        x, info = _run("adaptive", sde, gm, 64, callback=lambda i, t, x, x0: seen.append(t))
        capped, capped_info = _run("adaptive", sde, gm, 64, nfe=info["nfe"] + 100)
    assert AdaptiveSDE().nfe is None
    assert info["forced"] == 0 and info["t_reached"] == EPS
    assert (seen[-1] == EPS).all() and info["nfe"] > 0
    assert capped_info["forced"] == 0 and torch.equal(x, capped)


@pytest.mark.parametrize("score", ["noise", "nan"])
def test_adaptive_without_budget_stops_when_the_step_size_collapses(score):
    """A score whose error cannot be controlled (random at each call, or NaN) drives the step
    size below h_min: without a budget this is a clear error, not an endless loop (the score
    fails the test after 20 000 calls if the sampler kept going)."""
    sde = SDES["vp"]
    g = torch.Generator().manual_seed(0)
    calls = []

    def bad(x, t):
        calls.append(1)
        assert len(calls) < 20000, "the sampler kept looping"
        if score == "nan":
            return torch.full_like(x, math.nan)
        return 1e3 * torch.randn(x.shape, generator=g, dtype=x.dtype)

    with pytest.raises(RuntimeError, match=r"step size of \d+ of 8 samples fell below h_min=1e-06"):
        sample(sde, bad, (8, 2), "adaptive", dtype=torch.float64)
    assert len(calls) < 1000


class _BrownianSDE:
    """dx = dw_bar (f = 0, g = 1), for the scripted score below."""

    T = 1.0

    def sde(self, x, t):
        return torch.zeros_like(x), torch.ones_like(t)


class _ScriptedScore:
    """A score that scripts the adaptive sampler's accept/reject on _BrownianSDE (atol = 1,
    rtol ~ 0) while every accepted step is x <- x + dW: the samples are the consumed path.

    The first call of an iteration returns c, the second (at x' = x + h c + dW, time t - h)
    -c, so that x'' = x + dW and E = c h: the steps hover near h = 0.9^(1/r) / c ~ 0.045.
    Where ``reject(dW, h)`` holds it returns c - 4 / h instead: E = 2, the step is rejected
    and h about halves."""

    def __init__(self, reject, c=20.0):
        self.reject, self.c, self.first = reject, c, None

    def __call__(self, x, t):
        if self.first is None:
            self.first = (x.clone(), t.clone())
            return torch.full_like(x, self.c)
        (x0, t0), self.first = self.first, None
        h = (t0 - t)[:, None]
        reject = self.reject(x - x0 - h * self.c, h)
        return torch.where(reject, self.c - 4.0 / h.clamp(min=1e-300), -self.c)


def _scripted_run(reject, n=10000, callback=None):
    sampler = AdaptiveSDE(nfe=400, eps=EPS, rtol=1e-12, atol=1.0, h_init=0.05)
    x_T = torch.zeros(n, 1, dtype=torch.float64)
    noise = samplers.base.NoiseSource(torch.Generator().manual_seed(0))
    x, info = sampler.run(_BrownianSDE(), _ScriptedScore(reject), x_T, noise=noise,
                          callback=callback)
    assert info["iterations"] < 200  # every sample reached eps before the forced step
    assert (info["rejected"] > 0).float().mean() > 0.9
    return x[:, 0], info


def _assert_standard_normal(z):
    """Mean, variance and two-sided 1-sigma tail mass of z within 5 standard errors."""
    n, p = len(z), math.erfc(1 / math.sqrt(2))
    assert abs(z.mean().item()) < 5 / math.sqrt(n), z.mean().item()
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n), z.var().item()
    tail = (z.abs() > 1).double().mean().item()
    assert abs(tail - p) < 5 * math.sqrt(p * (1 - p) / n), tail


def test_adaptive_rejections_keep_the_brownian_law():
    """Rejection sampling with memory: a rejected increment is bridged, never redrawn, so the
    increment consumed over [eps, T] is N(0, T - eps) even when acceptance selects the noise
    (here: reject |dW| > 0.3, about 1.4 standard deviations at the typical step). Redrawing
    after a rejection (the paper's rule) keeps only small increments: variance 0.53 (T - eps),
    33 standard errors off."""
    w, info = _scripted_run(lambda dw, h: dw.abs() > 0.3)
    assert info["rejected"].float().mean() > 3
    _assert_standard_normal(w / math.sqrt(1.0 - EPS))
    assert (info["memory_overflows"] > 0).float().mean() < 0.01  # 15 of the 10^4 samples


def test_adaptive_bridge_increments_are_brownian():
    """The bridge law itself: steps longer than 0.02 are rejected whatever the noise, so each
    accepted step is drawn from the bridge inside a remembered segment, or spans remembered
    points and extends past them; over this noise-independent grid the accepted increments
    must be independent N(0, h). (A bridge drawn with variance h' instead of h'(h - h')/h, or
    centred on 0 instead of (h'/h) W, fails.)"""
    path = []
    _, info = _scripted_run(lambda dw, h: h > 0.02,
                            callback=lambda it, t, x, _: path.append((t.clone(), x[:, 0].clone())))
    assert info["rejected"].float().mean() > 40 and info["memory_overflows"].sum() == 0
    t = torch.stack([p[0] for p in path])  # (iterations, B)
    w = torch.stack([p[1] for p in path])
    t = torch.cat([torch.full_like(t[:1], 1.0), t])
    w = torch.cat([torch.zeros_like(w[:1]), w])
    moved = t[1:] < t[:-1]
    z = (w[1:] - w[:-1]) / (t[:-1] - t[1:]).clamp(min=1e-300).sqrt()
    _assert_standard_normal(z[moved])
    # consecutive accepted increments of a sample are uncorrelated
    z = z.T[moved.T].split(moved.sum(0).tolist())
    pairs = torch.cat([torch.stack([zk[:-1], zk[1:]], 1) for zk in z])
    corr = torch.corrcoef(pairs.T)[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(len(pairs)), corr


def test_wrong_score_sign_is_detected(problems):
    """The quality check's power: a flipped score must fail it by far."""
    gm, n = problems["ring"]
    sde = SDES["vp"]
    x, _ = sample(sde, lambda x, t: -gm.score(x, t, sde), (n, 2), "dpm_solver_3", nfe=30,
                  dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z_lp, _ = _compare(gm, sde, x, _exact(gm, sde, n))
    assert abs(z_lp) > 20


# -- convergence order ----------------------------------------------------------------------

def _reference_solution(sde, gm, x_T):
    """x_eps from the probability-flow ODE (Song et al. 2021, eq. 13) by dopri5, rtol 1e-10."""
    flow = sde.probability_flow(gm.score_fn(sde))

    def f(t, x):
        return flow.sde(x, t)[0]

    t = torch.tensor([sde.T, EPS], dtype=torch.float64)
    # step_t: land on eps instead of stepping past it into t < 0, where VP's s(t) is undefined.
    return torchdiffeq.odeint(f, x_T, t, rtol=1e-10, atol=1e-10, method="dopri5",
                              options={"step_t": t[1:]})[-1]


@pytest.fixture(scope="module")
def order_problem():
    gm = oracle.GaussianMixture.ring()
    out = {}
    for name, sde in SDES.items():
        x_T = sde.prior_sampling((16, 2), generator=torch.Generator().manual_seed(7),
                                 dtype=torch.float64)
        out[name] = (gm, x_T, _reference_solution(sde, gm, x_T))
    return out


# Step counts in the asymptotic range (the largest errors stay >= 1e-7, the reference's ~1e-9).
ORDER_STEPS = {1: [32, 64, 128, 256], 2: [64, 128, 256, 512], 3: [64, 128, 256, 512]}


ORDER_DEFAULT = ["ddim", "edm_heun", "dpm_solver_2", "dpm_solver_3"]


def _convergence_order(name, sde_name, order_problem):
    """Fitted slope of log error against log NFE within 0.3 of the declared order."""
    cls = SAMPLERS.get(name)
    gm, x_T, x_ref = order_problem[sde_name]
    sde = SDES[sde_name]
    options = {"lower_order_final": False} if name in DPM else {}
    errors, nfes = [], []
    for n_steps in ORDER_STEPS[cls.order]:
        nfe = n_steps * cls.nfe_per_step
        x, _ = sample(sde, gm.score_fn(sde), x_T.clone(), name, nfe=nfe, **options)
        errors.append((x - x_ref).pow(2).sum(1).mean().sqrt().item())
        nfes.append(nfe)
    log_n, log_e = torch.tensor(nfes).log(), torch.tensor(errors).log()
    slope = -(((log_n - log_n.mean()) * (log_e - log_e.mean())).sum()
              / (log_n - log_n.mean()).pow(2).sum()).item()
    assert abs(slope - cls.order) < 0.3, f"{name}/{sde_name}: slope {slope:.2f}, errors {errors}"


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("name", ORDER_DEFAULT)
def test_convergence_order(name, sde_name, order_problem):
    _convergence_order(name, sde_name, order_problem)


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("name", [n for n in DPM if n not in ORDER_DEFAULT])
def test_convergence_order_all_dpm_solvers(name, sde_name, order_problem):
    _convergence_order(name, sde_name, order_problem)


# -- exact formulas -------------------------------------------------------------------------

@pytest.mark.parametrize("z", [-2.0, -0.3, -0.099, -1e-4, 1e-4, 0.099, 0.3, 2.0])
def test_phi_matches_integral(z):
    """phi_k(z) = int_0^1 e^((1-u) z) u^(k-1)/(k-1)! du (Lu et al. 2022, eq. 3.6), by quadrature."""
    u = torch.linspace(0, 1, 20001, dtype=torch.float64)
    for k in (1, 2, 3):
        integrand = torch.exp((1 - u) * z) * u ** (k - 1) / math.factorial(k - 1)
        assert phi(k, z) == pytest.approx(torch.trapezoid(integrand, u).item(), rel=1e-7)


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_exponential_step_is_exact_for_polynomial_predictions(prediction):
    """With f(lambda) a quadratic, the 3-point step equals the variation-of-constants integral."""
    sde = SDES["vp"]
    t_s, t_t = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    (m_s, s_s), (m_t, s_t) = sde.marginal_coeffs(t_s), sde.marginal_coeffs(t_t)
    lam_s, lam_t = 0.5 * sde.log_snr(t_s).item(), 0.5 * sde.log_snr(t_t).item()
    taus = [0.0, -0.4, -0.9]

    def f(lam):
        return 0.3 - 1.2 * (lam - lam_s) + 0.7 * (lam - lam_s) ** 2

    a, b = _weights(prediction, lam_s, lam_t, m_s.item(), s_s.item(), m_t.item(), s_t.item(),
                    taus)
    x_s = 1.7
    step = a * x_s + sum(bj * f(lam_s + tau) for bj, tau in zip(b, taus))
    lam = torch.linspace(lam_s, lam_t, 200001, dtype=torch.float64)
    if prediction == "eps":  # x_t = m_t/m_s x_s - m_t int e^-lam eps dlam (Lu et al. 2022, 3.4)
        exact = m_t / m_s * x_s - m_t * torch.trapezoid(torch.exp(-lam) * f(lam), lam)
    else:  # x_t = s_t/s_s x_s + s_t int e^lam x0 dlam (Lu et al. 2022b, eq. 8)
        exact = s_t / s_s * x_s + s_t * torch.trapezoid(torch.exp(lam) * f(lam), lam)
    assert step == pytest.approx(exact.item(), rel=1e-9)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_ddim_eta1_step_is_the_forward_posterior(sde_name):
    """With point-mass data x_0 = mu, one DDIM(eta=1) step from a fixed x_t draws from
    q(x_u | x_t, x_0), computed here by Gaussian conditioning of the forward Markov kernel
    x_t | x_u ~ N((m_t/m_u) x_u, s_t^2 - (m_t/m_u)^2 s_u^2) on x_u ~ N(m_u mu, s_u^2)."""
    sde = SDES[sde_name]
    mu = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    gm = oracle.GaussianMixture(torch.ones(1), mu, 1e-9)
    n, u = 100000, 0.5
    (m_t, s_t), (m_u, s_u) = (sde.marginal_coeffs(torch.tensor(v, dtype=torch.float64))
                              for v in (sde.T, u))
    x_t = (m_t * mu + s_t * torch.tensor([[0.7, -1.3]], dtype=torch.float64)).expand(n, 2)
    x, _ = sample(sde, gm.score_fn(sde), x_t.clone(), "ddim", nfe=1, eta=1.0, eps=u,
                  generator=torch.Generator().manual_seed(1))
    k = m_t / m_u
    v_tu = s_t**2 - k**2 * s_u**2
    var = 1 / (1 / s_u**2 + k**2 / v_tu)
    mean = var * (m_u * mu / s_u**2 + k * x_t[0] / v_tu)
    # Standard errors: var sqrt(2/n) for the variance, sqrt(var/n) for the mean.
    assert (x.var(0) / var - 1).abs().max() < 5 * math.sqrt(2 / n)
    assert (x.mean(0) - mean).abs().max() < 5 * (var / n).sqrt()


# -- grids ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("grid", TIME_GRIDS.names())
def test_time_grids_decrease_from_T_to_eps(grid, sde_name):
    sde = SDES[sde_name]
    t = get_time_grid(grid, sde, 12, EPS)
    assert t.shape == (13,) and t.dtype == torch.float64
    assert t[0] == sde.T and t[-1] == EPS and (t.diff() < 0).all()


@pytest.mark.parametrize("sde_name", list(SDES))
def test_karras_and_logsnr_grids_closed_forms(sde_name):
    sde = SDES[sde_name]
    n, rho = 10, 7.0
    sigma = lambda t: torch.exp(-0.5 * sde.log_snr(t))  # noqa: E731
    s_max, s_min = sigma(torch.tensor(sde.T, dtype=torch.float64)), sigma(
        torch.tensor(EPS, dtype=torch.float64))
    i = torch.arange(n + 1, dtype=torch.float64)
    expected = (s_max ** (1 / rho) + i / n * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    torch.testing.assert_close(sigma(get_time_grid("karras", sde, n, EPS)), expected, rtol=1e-9,
                               atol=0)
    lam = sde.log_snr(get_time_grid("logsnr", sde, n, EPS))
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(n), rtol=1e-8, atol=1e-10)


# -- contract: NFE, determinism, per-sample seeds, errors -----------------------------------

# The contract tests below run ``adaptive`` on small budgets on purpose (its NFE count, seeds and
# callback must hold when the budget forces the last step too); the forced-step warning itself is
# asserted in test_adaptive_budget_reports_and_warns_forced_samples above.
FORCED_OK = pytest.mark.filterwarnings("ignore:adaptive. the nfe=.* budget ran out:RuntimeWarning")


@FORCED_OK
@pytest.mark.parametrize("name", FAST)
def test_nfe_report_equals_counted_calls(name):
    gm, sde = oracle.GaussianMixture.ring(), SDES["vp"]
    calls = []

    def score_fn(x, t):
        calls.append(1)
        return gm.score(x, t, sde)

    nfe = 12 if name != "adaptive" else 40
    _, info = sample(sde, score_fn, (16, 2), name, nfe=nfe, generator=torch.Generator())
    assert info["nfe"] == len(calls)
    if name == "adaptive":
        assert info["nfe"] <= nfe
    else:
        assert info["nfe"] == nfe


@FORCED_OK
@pytest.mark.parametrize("name", FAST)
def test_same_seed_same_bits(name):
    gm, sde = oracle.GaussianMixture.ring(), SDES["ve"]
    a, _ = _run(name, sde, gm, 32, seed=3, nfe=20)
    b, _ = _run(name, sde, gm, 32, seed=3, nfe=20)
    assert torch.equal(a, b)


@FORCED_OK
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_per_sample_seeds_independent_of_batch(name, sde_name):
    gm, sde = oracle.GaussianMixture.ring(), SDES[sde_name]
    seeds = list(range(100, 164))
    opts = dict(STOCHASTIC[name], nfe=60, dtype=torch.float64)
    batch, _ = sample(sde, gm.score_fn(sde), (64, 2), name, seeds=seeds, **opts)
    for k in (0, 17, 63):
        single, _ = sample(sde, gm.score_fn(sde), (1, 2), name, seeds=[seeds[k]], **opts)
        torch.testing.assert_close(single[0], batch[k], rtol=1e-12, atol=1e-12)
    other, _ = sample(sde, gm.score_fn(sde), (2, 2), name, seeds=[seeds[0], 999], **opts)
    torch.testing.assert_close(other[0], batch[0], rtol=1e-12, atol=1e-12)


def test_errors_name_value_and_choices():
    sde = SDES["vp"]
    score = oracle.GaussianMixture.ring().score_fn(sde)
    with pytest.raises(ValueError, match="Unknown time grid 'foo'; valid: karras, logsnr"):
        sample(sde, score, (2, 2), "ddim", grid="foo")
    with pytest.raises(ValueError, match="nfe must be an integer >= 3"):
        sample(sde, score, (2, 2), "dpm_solver_3", nfe=2)
    with pytest.raises(ValueError, match="eta must be a number in"):
        sample(sde, score, (2, 2), "ddim", eta=-0.5)
    with pytest.raises(ValueError, match="eps=2.0 must be below"):
        sample(sde, score, (2, 2), "edm_heun", eps=2.0)
    with pytest.raises(TypeError, match="unknown options: order"):
        sample(sde, score, (2, 2), "dpm_solver++_2m", order=3)
    with pytest.raises(ValueError, match="nfe must be an integer >= 2"):
        sample(sde, score, (2, 2), "adaptive", nfe=1)
    with pytest.raises(ValueError, match="h_min must be a number in"):
        sample(sde, score, (2, 2), "adaptive", h_min=0.0)


def test_fast_samplers_are_registered_on_import():
    for name in ["ddim", "edm_heun", "adaptive", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3",
                 "dpm_solver_2m", "dpm_solver_3m", "dpm_solver++_1", "dpm_solver++_2s",
                 "dpm_solver++_3s", "dpm_solver++_2m", "dpm_solver++_3m"]:
        assert name in samplers.SAMPLERS


@pytest.mark.parametrize("sde_name", list(SDES))
def test_adaptive_seeds_independent_of_batch_when_running_to_eps(sde_name):
    """With the whole budget the accept/reject path is taken many times: a last-bit difference
    between batched and single-sample arithmetic (e.g. CPU pow in VE's sigma(t)) would change a
    decision and the sample. Bitwise equality, not a tolerance."""
    gm, sde = oracle.GaussianMixture.ring(), SDES[sde_name]
    seeds = list(range(300, 340))  # a batch wide enough for the vectorised kernels
    opts = dict(nfe=4000, rtol=0.05, dtype=torch.float64)
    batch, info = sample(sde, gm.score_fn(sde), (len(seeds), 2), "adaptive", seeds=seeds, **opts)
    assert info["nfe"] < 4000  # every sample reached eps by its own steps
    for k in (0, 7, 19, 26, 39):
        single, _ = sample(sde, gm.score_fn(sde), (1, 2), "adaptive", seeds=[seeds[k]], **opts)
        assert torch.equal(single[0], batch[k]), f"sample {k} depends on the batch"


@FORCED_OK
@pytest.mark.parametrize("name", FAST)
def test_callback_reports_each_state_at_its_own_time(name):
    """One convention for every sampler: after a step, the state x and the time t it belongs to
    (the step's end), so the last call has t = eps and the returned samples."""
    gm, sde = oracle.GaussianMixture.ring(), SDES["vp"]
    seen = []
    x, _ = _run(name, sde, gm, 8, nfe=12,
                callback=lambda i, t, x, x0: seen.append((t.clone(), x.clone())))
    times = torch.stack([t for t, _ in seen])
    assert seen and torch.equal(seen[-1][1], x)
    torch.testing.assert_close(times[-1], torch.full_like(times[-1], EPS))
    assert (times[1:] <= times[:-1]).all()  # decreasing: never the step's start time twice
    if name != "adaptive":  # its per-sample t stays at T for a sample whose first step failed
        assert (times[0] < sde.T).all()


@pytest.mark.parametrize("method", ["dpm_solver_2", "dpm_solver_3m", "dpm_solver++_2s",
                                    "dpm_solver++_3m", "unipc_3"])
def test_samplers_keeping_scores_refuse_a_reused_score_buffer(method):
    # They keep past scores (or predictions formed in them) without copying: a score_fn that
    # reuses one output buffer would overwrite them; it gets a clear error, not wrong samples.
    sde, gm = SDES["vp"], oracle.GaussianMixture.ring()
    exact = gm.score_fn(sde)
    buffer = {}

    def reusing(x, t):
        out = buffer.setdefault("out", torch.empty_like(x))
        return out.copy_(exact(x, t))

    with pytest.raises(RuntimeError, match="reused output buffer"):
        sample(sde, reusing, (16, 2), method, nfe=6, dtype=torch.float64)
    fresh, _ = sample(sde, lambda x, t: reusing(x, t).clone(), (16, 2), method, nfe=6,
                      dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain, _ = sample(sde, exact, (16, 2), method, nfe=6, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(fresh, plain)
