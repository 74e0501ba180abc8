"""Predictor-corrector samplers against the exact Gaussian-mixture oracle, and the contract every
registered predictor, corrector and sampler obeys (parametrised over the registries).

Error model of the distribution checks: the mean exact log-density of n sampler draws and of
n_e exact draws differ by less than 4 standard errors sqrt(var/n + var_e/n_e); mode weights
(each draw assigned to its most likely component) pass a chi-square test at level 1e-4 against
the exact weights. A wrong sign, a missing factor 2 or swapped m(t), s(t) moves the mean
log-density by many nats (tens in 100-D), far beyond either bound. Step counts are chosen so the
first-order discretisation bias (about 1/N) stays below 2 standard errors: N = 500 with n = 1000
on the 2-D ring, N = 1000 (2000 for probability-flow steps) with n = 100 in 100-D (the bias
grows with D; fewer draws keep the cost N n down while the bias / error ratio falls as
sqrt(n) / N).

The ``langevin`` corrector's default step rule is the reference's batch rule (one step for the
batch). Its per-sample rule (``step_rule='sample'``, used with per-sample seeds) follows each
sample's own score norm, eps(x) ~ 1 / ||score||^2; its Langevin chain then targets
p_t / eps(x) ~ p_t ||score||^2 instead of p_t, which lowers the mean log-density of any Gaussian
by exactly 1 nat at full mixing (E||u||^2 goes from D to D + 2 for u ~ N(0, I) tilted by a
quadratic form). Where it mixes (the 2-D ring), checks of that rule allow the closed-form shift
of 1 nat downwards (``LANGEVIN_BIAS``) on top of the 4 standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import default_subset, latin_square
from scipy.stats import chi2

import sde_lib
from samplers import SAMPLERS, sample
from samplers.base import NoiseSource
from samplers.ode import ode_flow
from samplers.pc import (
    CORRECTORS,
    PREDICTORS,
    SMALL_D,
    Corrector,
    PCSampler,
    _row_sq_norms,
    pc_time_grid,
)
from samplers.reference import get_pc_sampler, get_sampling_fn
from score_sde.oracle import GaussianMixture

F64 = torch.float64
SDE_NAMES = ["vp", "subvp", "ve"]
PREDICTOR_NAMES = [n for n in PREDICTORS if PREDICTORS.get(n).nfe_per_step > 0]
CORRECTOR_NAMES = list(CORRECTORS)


def make_sde(name: str, N: int = 1000) -> sde_lib.SDE:
    return {"vp": sde_lib.VPSDE, "subvp": sde_lib.subVPSDE, "ve": sde_lib.VESDE}[name](N=N)


RING = GaussianMixture.ring()
MIX100 = GaussianMixture.random(100, 4, seed=0)
#: Sharp data (component stds 0.01-0.03, like images at the scale of one grey level): the score's
#: Lipschitz constant near t = 0 is ~1 / s(t)^2.
SHARP = GaussianMixture.random(64, 4, std_range=(0.01, 0.03), seed=0)
#: The stationary shift of mean log p under the langevin corrector (nats, see module docstring).
LANGEVIN_BIAS = 1.0
_EXACT: dict[tuple, torch.Tensor] = {}


def exact_draws(gm: GaussianMixture, sde: sde_lib.SDE | None = None, n: int = 20000):
    """Exact draws of the data, or of the SDE's t = 0 marginal (cached per mixture and SDE)."""
    key = (id(gm), repr(sde))
    if key not in _EXACT:
        g = torch.Generator().manual_seed(123)
        _EXACT[key] = (gm.sample(n, generator=g, dtype=F64) if sde is None
                       else gm.sample_marginal(n, sde, 0.0, generator=g, dtype=F64))
    return _EXACT[key]


def assert_matches_exact(gm: GaussianMixture, x: torch.Tensor, n_se: float = 4.0,
                         sde: sde_lib.SDE | None = None, bias: float = 0.0) -> None:
    """Mean exact log p_0 and mode weights of x agree with exact draws (see module docstring).

    With ``sde``, p_0 is its t = 0 marginal (VE keeps sigma_min of noise, which matters for sharp
    data); ``bias`` (nats) widens the bound downwards by a known shift of the sampler.
    """
    assert torch.isfinite(x).all(), "non-finite samples"
    exact = exact_draws(gm, sde)
    t = None if sde is None else 0.0
    lp, lp_e = gm.log_prob(x, t, sde), gm.log_prob(exact, t, sde)
    se = math.sqrt(lp.var().item() / len(lp) + lp_e.var().item() / len(lp_e))
    diff = lp.mean().item() - lp_e.mean().item()
    assert -bias - n_se * se < diff < n_se * se, (
        f"mean log p off by {diff:+.3f} nats = {diff / se:+.1f} SE (allowed bias -{bias})")
    K = gm.n_modes
    if K == 1:
        return
    counts = torch.bincount(gm.component_log_prob(x).argmax(1), minlength=K).to(F64)
    p = torch.bincount(gm.component_log_prob(exact).argmax(1), minlength=K).to(F64) / len(exact)
    stat = ((counts - len(x) * p) ** 2 / (len(x) * p)).sum().item()
    assert stat < chi2.ppf(1 - 1e-4, K - 1), f"mode weights {counts.tolist()} vs {p.tolist()}"


def run_pc(gm, sde, n, seed=0, **options):
    return sample(sde, gm.score_fn(sde), (n, gm.dim), "pc", dtype=F64,
                  generator=torch.Generator().manual_seed(seed), **options)


# -- distribution checks -------------------------------------------------------------------------


# Grids: the default suite runs a representative subset (every predictor, corrector and SDE, and
# on the ring every pair of them, in a Latin square); ``-m slow`` runs the rest of each grid.
_DIAGONAL = {(p, s) for p, s in zip(PREDICTOR_NAMES, SDE_NAMES)}
_SHIFTED = {(p, s) for p, s in zip(PREDICTOR_NAMES, SDE_NAMES[1:] + SDE_NAMES[:1])}


@pytest.mark.parametrize("predictor,corrector,sde_name", default_subset(
    (PREDICTOR_NAMES, CORRECTOR_NAMES, SDE_NAMES),
    keep=latin_square(PREDICTOR_NAMES, CORRECTOR_NAMES, SDE_NAMES)))
def test_ring_every_combination(predictor, corrector, sde_name):
    sde = make_sde(sde_name)
    x, _ = run_pc(RING, sde, 1000, predictor=predictor, corrector=corrector, N=500, snr=0.05)
    assert_matches_exact(RING, x)


@pytest.mark.parametrize("predictor,sde_name", default_subset(
    (PREDICTOR_NAMES, SDE_NAMES), keep=_DIAGONAL))
def test_ring_probability_flow(predictor, sde_name):
    sde = make_sde(sde_name)
    x, _ = run_pc(RING, sde, 1000, predictor=predictor, corrector="none", N=500,
                  probability_flow=True)
    assert_matches_exact(RING, x)


@pytest.mark.parametrize("predictor,sde_name", default_subset(
    (PREDICTOR_NAMES, SDE_NAMES), keep=_SHIFTED))
def test_mixture_100d_predictors(predictor, sde_name):
    sde = make_sde(sde_name)
    x, _ = run_pc(MIX100, sde, 100, predictor=predictor, corrector="none", N=1000)
    assert_matches_exact(MIX100, x)


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("predictor", PREDICTOR_NAMES)
def test_mixture_100d_probability_flow(predictor, sde_name):
    """First-order ODE steps need N = 2000 in 100-D (about -2.4 nats at N = 1000 for
    reverse diffusion)."""
    sde = make_sde(sde_name)
    x, _ = run_pc(MIX100, sde, 100, predictor=predictor, corrector="none", N=2000,
                  probability_flow=True)
    assert_matches_exact(MIX100, x)


@pytest.mark.parametrize("corrector,sde_name", default_subset(
    ([c for c in CORRECTOR_NAMES if c != "none"], SDE_NAMES),
    keep={("ald", "ve"), ("langevin", "vp")}))  # SMLD's annealed Langevin; the VP corrector
def test_mixture_100d_correctors(corrector, sde_name):
    sde = make_sde(sde_name)
    x, _ = run_pc(MIX100, sde, 100, predictor="reverse_diffusion", corrector=corrector, N=1000,
                  snr=0.03)
    assert_matches_exact(MIX100, x)


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("probability_flow", [False, True])
@pytest.mark.parametrize("corrector", [c for c in CORRECTOR_NAMES if c != "none"])
@pytest.mark.parametrize("predictor", PREDICTOR_NAMES)
def test_mixture_100d_every_combination(predictor, corrector, probability_flow, sde_name):
    sde = make_sde(sde_name)
    x, _ = run_pc(MIX100, sde, 200, predictor=predictor, corrector=corrector, N=2000, snr=0.03,
                  probability_flow=probability_flow)
    assert_matches_exact(MIX100, x)


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("corrector", [c for c in CORRECTOR_NAMES if c != "none"])
@pytest.mark.parametrize("predictor", PREDICTOR_NAMES)
def test_ring_probability_flow_with_corrector(predictor, corrector, sde_name):
    sde = make_sde(sde_name)
    x, _ = run_pc(RING, sde, 1000, predictor=predictor, corrector=corrector, N=500, snr=0.05,
                  probability_flow=True)
    assert_matches_exact(RING, x)


class UnitVarianceLangevin(Corrector):
    """The former langevin step eps = 2 alpha r^2 (m^2 + s^2): t only, sized for unit-variance
    data, so far too large for sharp data near t = 0."""

    def step_sizes(self, t, alpha):
        m, s = self.sde.marginal_coeffs(t)
        return 2.0 * alpha * self.snr**2 * (m**2 + s**2)


@pytest.mark.parametrize("rule,sde_name", default_subset(  # each rule on one SDE by default
    (["batch", "sample", "former t-only step"], ["vp", "ve"]),
    keep={("batch", "ve"), ("sample", "vp"), ("former t-only step", "vp")}))
def test_langevin_at_the_reference_snr_on_sharp_data(rule, sde_name):
    """Regression: at the reference's default snr 0.16 on sharp 64-D data both langevin step
    rules follow the score's magnitude and sample p_0 (the former t-only step diverges: NaN
    under VE, mean log p ~ -1e39 under VP). p_0 is the SDE's t = 0 marginal, which under VE keeps
    sigma_min = 0.01 of noise."""
    sde = make_sde(sde_name)
    if rule == "former t-only step":
        options = dict(corrector=UnitVarianceLangevin)
    else:
        options = dict(corrector="langevin", step_rule=rule)
    x, _ = run_pc(SHARP, sde, 100, N=500, snr=0.16, **options)
    if rule != "former t-only step":
        assert_matches_exact(SHARP, x, sde=sde, bias=LANGEVIN_BIAS)
    else:
        with pytest.raises(AssertionError):
            assert_matches_exact(SHARP, x, sde=sde, bias=LANGEVIN_BIAS)


def _ring_default_langevin(sde_name, **options):
    """The reference's setting: reverse diffusion + one langevin step, snr 0.16, N = 250."""
    return run_pc(RING, make_sde(sde_name), 2000, N=250, snr=0.16, **options)


@pytest.mark.parametrize("sde_name", [
    pytest.param("vp", marks=pytest.mark.slow), pytest.param("subvp", marks=pytest.mark.slow),
    "ve"])
def test_langevin_default_rule_is_unbiased_on_the_ring(sde_name):
    """The default (batch) rule: mean log p within 3.5 standard errors of exact draws with 2000
    samples. The per-sample rule's x-dependent step is ~1 nat low here (~18 SE under VE: fails
    the same check); a missing factor 2 in the step's noise breaks it too."""
    x, info = _ring_default_langevin(sde_name)
    assert info["step_rule"] == "batch" and info["corrector"] == "langevin"
    assert_matches_exact(RING, x, n_se=3.5)
    if sde_name == "ve":
        x, info = _ring_default_langevin(sde_name, step_rule="sample")
        assert info["step_rule"] == "sample"
        with pytest.raises(AssertionError, match="mean log p off"):
            assert_matches_exact(RING, x, n_se=3.5)


def _reference_langevin_update(score_fn, x, t, alpha, snr, n_steps, generator):
    """yang-song/score_sde_pytorch ``sampling.LangevinCorrector.update_fn``, transcribed (its
    torch.randn_like drawn from ``generator``; alpha given: ours is r_i^2, see Corrector)."""
    for _ in range(n_steps):
        grad = score_fn(x, t)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
        noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
        step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
        x_mean = x + step_size * grad
        x = x_mean + torch.sqrt(step_size * 2) * noise
    return x


@pytest.mark.parametrize("shape", [(50, 2), (6, 3, 4, 4)])
@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_langevin_batch_rule_is_the_reference_update(sde_name, shape):
    """step_rule='batch' is the reference's step 2 alpha (r mean||z|| / mean||score||)^2 with
    batch means of the per-sample norms, in 2-D and for (B, C, H, W); the per-sample rule is
    not (so the comparison can fail)."""
    sde = make_sde(sde_name, N=20)
    gm = GaussianMixture.random(math.prod(shape[1:]), 3, seed=1)

    def score_fn(x, t):
        return gm.score_fn(sde)(x.reshape(len(x), -1), t).reshape(x.shape)

    grid = pc_time_grid(sde, 20, 1e-3)
    i = 7
    t = grid[i].expand(shape[0]).to(F64)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    results = {}
    for rule in ("batch", "sample"):
        corrector = CORRECTORS.get("langevin")(sde, 0.16, 3, step_rule=rule)
        corrector.prepare(grid)
        noise = NoiseSource(torch.Generator().manual_seed(2))
        results[rule] = corrector.correct(score_fn, x.clone(), t, i, noise, torch.empty_like(x))
    alpha = corrector._alpha[i]
    assert alpha == (1.0 if sde_name == "ve" else pytest.approx(
        (sde.marginal_mean_coeff(grid[i]) / sde.marginal_mean_coeff(grid[i + 1])).item() ** 2))
    ref = _reference_langevin_update(score_fn, x.clone(), t, alpha, 0.16, 3,
                                     torch.Generator().manual_seed(2))
    torch.testing.assert_close(results["batch"], ref, rtol=1e-12, atol=1e-12)
    assert (results["sample"] - ref).abs().max() > 1e-3


def test_reference_entry_points_and_sample_use_the_batch_rule():
    """get_pc_sampler, get_sampling_fn (a config, as main.py) and samplers.sample default to the
    batch rule: the same bits as step_rule='batch', other bits than step_rule='sample'."""
    ml_collections = pytest.importorskip("ml_collections")
    sde = make_sde("ve", N=30)
    score = RING.score_fn(sde)

    def run(**options):
        return sample(sde, score, (64, 2), "pc", generator=torch.Generator().manual_seed(0),
                      **options)

    batch, info = run(step_rule="batch")
    default, default_info = run()
    per_sample, _ = run(step_rule="sample")
    assert default_info["step_rule"] == info["step_rule"] == "batch"
    assert torch.equal(default, batch) and not torch.allclose(per_sample, batch)
    pc = get_pc_sampler(sde, (64, 2), "reverse_diffusion", "langevin", lambda x: x, snr=0.16)
    assert torch.equal(pc(score, generator=torch.Generator().manual_seed(0))[0], batch)
    config = ml_collections.ConfigDict()
    config.training = ml_collections.ConfigDict({"continuous": True})
    config.sampling = ml_collections.ConfigDict(dict(
        method="pc", predictor="reverse_diffusion", corrector="langevin", snr=0.16,
        n_steps_each=1, probability_flow=False, noise_removal=True))
    fn = get_sampling_fn(config, sde, (64, 2), lambda x: x, eps=1e-3)
    assert torch.equal(fn(score, generator=torch.Generator().manual_seed(0))[0], batch)


def test_seeds_use_the_per_sample_rule():
    """With seeds= (sample k depends on seeds[k] alone) the per-sample rule is used and recorded;
    asking for the batch rule with them, or for a rule of a corrector with one, is an error."""
    sde = make_sde("vp", N=10)
    score, seeds = RING.score_fn(sde), list(range(20, 36))
    x, info = sample(sde, score, (16, 2), seeds=seeds, dtype=F64)
    assert info["step_rule"] == "sample"
    y, _ = sample(sde, score, (16, 2), seeds=seeds, dtype=F64, step_rule="sample")
    assert torch.equal(x, y)
    with pytest.raises(ValueError, match="step_rule='batch' ties each sample's step"):
        sample(sde, score, (16, 2), seeds=seeds, step_rule="batch")
    with pytest.raises(ValueError, match="not a step rule of corrector 'ald'"):
        sample(sde, score, (16, 2), corrector="ald", step_rule="sample")
    with pytest.raises(ValueError, match="valid: batch, sample"):
        sample(sde, score, (16, 2), step_rule="mean")
    _, info = sample(sde, score, (16, 2), corrector="ald", seeds=seeds)
    assert info["step_rule"] is None


@pytest.mark.parametrize("error", ["score x 2", "score of sub-VP under VP"])
def test_the_check_has_power(error):
    """A missing factor 2 or the wrong s(t) in the score breaks the distribution check."""
    sde = make_sde("vp")
    exact = RING.score_fn(sde)
    other = RING.score_fn(make_sde("subvp"))
    wrong = (lambda x, t: 2 * exact(x, t)) if error == "score x 2" else other
    x, _ = sample(sde, wrong, (1000, 2), "pc", dtype=F64, corrector="none", N=500,
                  generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError):
        assert_matches_exact(RING, x)


# -- closed-form coefficients --------------------------------------------------------------------


def test_ancestral_matches_smld_and_ddpm_posteriors():
    """VE: x + (s_t^2 - s_s^2) score + sqrt(s_s^2 (s_t^2 - s_s^2) / s_t^2) z (Song et al. 2021,
    eq. 47); VP: (x + beta score) / sqrt(1 - beta) with the DDPM posterior variance
    beta (1 - abar_s) / (1 - abar_t) (Ho et al. 2020, eq. 7)."""
    t = torch.tensor([0.9, 0.5, 0.1], dtype=F64)
    t_next = t - 0.05
    ve = make_sde("ve")
    a, b, c = PREDICTORS.get("ancestral_sampling")(ve).coefficients(t, t_next)
    s_t, s_s = ve.marginal_std(t), ve.marginal_std(t_next)
    torch.testing.assert_close(a, torch.ones_like(t))
    torch.testing.assert_close(b, s_t**2 - s_s**2)
    torch.testing.assert_close(c, torch.sqrt(s_s**2 * (s_t**2 - s_s**2) / s_t**2))
    vp = make_sde("vp")
    a, b, c = PREDICTORS.get("ancestral_sampling")(vp).coefficients(t, t_next)
    abar_t, abar_s = vp.marginal_mean_coeff(t) ** 2, vp.marginal_mean_coeff(t_next) ** 2
    beta = 1 - abar_t / abar_s
    torch.testing.assert_close(a, 1 / torch.sqrt(1 - beta))
    torch.testing.assert_close(b, beta / torch.sqrt(1 - beta))
    torch.testing.assert_close(c**2, beta * (1 - abar_s) / (1 - abar_t))


def test_euler_maruyama_and_reverse_diffusion_agree_to_first_order():
    """Both discretise eq. 6: away from t = 0 their coefficients differ by O(dt / t)."""
    for name in SDE_NAMES:
        sde = make_sde(name)
        grid = pc_time_grid(sde, 4000, 1e-3)[:-1]
        t, t_next = grid[:-1], grid[1:]
        t, t_next = t[t > 0.01], t_next[t > 0.01]
        em = PREDICTORS.get("euler_maruyama")(sde).coefficients(t, t_next)
        rd = PREDICTORS.get("reverse_diffusion")(sde).coefficients(t, t_next)
        for u, v in zip(em, rd):
            assert torch.allclose(u, v, rtol=0.02, atol=1e-6), name


_PF_REFERENCE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


@pytest.mark.parametrize("predictor,sde_name", default_subset(
    (PREDICTOR_NAMES, SDE_NAMES), keep=_DIAGONAL))
def test_probability_flow_predictors_have_their_declared_order(predictor, sde_name):
    """From the same x_T, the error against a tight dopri5 solution of eq. 13 (T -> 0) falls
    as N^-order (fitted slope within 0.3 of the declared order)."""
    sde = make_sde(sde_name)
    if sde_name not in _PF_REFERENCE:
        x_T = sde.prior_sampling((16, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
        ref, _ = ode_flow(sde, RING.score_fn(sde), x_T, sde.T, 0.0, rtol=1e-10, atol=1e-10)
        _PF_REFERENCE[sde_name] = x_T, ref
    x_T, ref = _PF_REFERENCE[sde_name]
    steps = [100, 200, 400]
    errors = []
    for N in steps:
        x, _ = sample(sde, RING.score_fn(sde), x_T, predictor=predictor, corrector="none",
                      probability_flow=True, N=N)
        errors.append((x - ref).abs().max().item())
    slope = -(math.log(errors[-1]) - math.log(errors[0])) / math.log(steps[-1] / steps[0])
    assert abs(slope - PREDICTORS.get(predictor).order) < 0.3, (errors, slope)


# -- contract ------------------------------------------------------------------------------------


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        assert t.shape == (x.shape[0],)
        return self.fn(x, t)


COMBOS = [
    (p, c) for p in PREDICTORS for c in CORRECTORS
    if PREDICTORS.get(p).nfe_per_step + CORRECTORS.get(c).nfe_per_step > 0
]


@pytest.mark.parametrize("denoise", [True, False])
@pytest.mark.parametrize("predictor,corrector", COMBOS)
def test_nfe_is_exact(predictor, corrector, denoise):
    sde = make_sde("subvp", N=7)
    score = Counter(RING.score_fn(sde))
    _, info = sample(sde, score, (3, 2), predictor=predictor, corrector=corrector, n_steps=2,
                     denoise=denoise, generator=torch.Generator().manual_seed(0))
    assert info["nfe"] == score.calls
    pred, corr = PREDICTORS.get(predictor), CORRECTORS.get(corrector)
    tweedie = int(denoise and pred.nfe_per_step == 0)
    assert score.calls == 7 * (pred.nfe_per_step + 2 * corr.nfe_per_step) + tweedie


@pytest.mark.parametrize("predictor,corrector", COMBOS)
def test_same_seed_same_bits_and_per_sample_seeds(predictor, corrector):
    sde = make_sde("ve", N=6)
    kw = dict(predictor=predictor, corrector=corrector, dtype=F64)
    x1, _ = sample(sde, RING.score_fn(sde), (5, 2), generator=torch.Generator().manual_seed(3),
                   **kw)
    x2, _ = sample(sde, RING.score_fn(sde), (5, 2), generator=torch.Generator().manual_seed(3),
                   **kw)
    assert torch.equal(x1, x2)
    seeds = list(range(100, 164))
    big, _ = sample(sde, RING.score_fn(sde), (64, 2), seeds=seeds, **kw)
    for k in (0, 17, 63):
        one, _ = sample(sde, RING.score_fn(sde), (1, 2), seeds=[seeds[k]], **kw)
        torch.testing.assert_close(one[0], big[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("predictor", list(PREDICTORS))
def test_probability_flow_without_corrector_is_deterministic(predictor):
    """No noise after x_T: two generators give the same samples from the same x_T."""
    if predictor == "none":
        pytest.skip("predictor 'none' needs a corrector")
    sde = make_sde("vp", N=5)
    x_T = torch.randn(4, 2, dtype=F64)
    xs = [sample(sde, RING.score_fn(sde), x_T, predictor=predictor, corrector="none",
                 probability_flow=True, generator=torch.Generator().manual_seed(s))[0]
          for s in (0, 1)]
    assert torch.equal(*xs)


@pytest.mark.parametrize("predictor", PREDICTOR_NAMES)
def test_denoise_draws_no_noise_on_the_last_step(predictor):
    """With N = 1 the only step is the last: with denoise it is deterministic given x_T."""
    sde = make_sde("vp", N=1)
    x_T = torch.randn(4, 2, dtype=F64)
    xs = [sample(sde, RING.score_fn(sde), x_T, predictor=predictor, corrector="none",
                 generator=torch.Generator().manual_seed(s))[0] for s in (0, 1)]
    assert torch.equal(*xs)


def test_unknown_names_list_the_valid_ones():
    sde = make_sde("vp", N=3)
    with pytest.raises(ValueError, match="Unknown predictor 'foo'; valid: " +
                       ", ".join(PREDICTORS.names())):
        sample(sde, RING.score_fn(sde), (2, 2), predictor="foo")
    with pytest.raises(ValueError, match="Unknown corrector 'bar'; valid: " +
                       ", ".join(CORRECTORS.names())):
        sample(sde, RING.score_fn(sde), (2, 2), corrector="bar")
    with pytest.raises(ValueError, match="Unknown sampler 'baz'; valid: .*pc"):
        sample(sde, RING.score_fn(sde), (2, 2), "baz")
    with pytest.raises(TypeError, match="unknown options: n_step"):
        sample(sde, RING.score_fn(sde), (2, 2), n_step=3)


def test_impossible_combinations_explain_why():
    with pytest.raises(ValueError, match="never calls the score"):
        PCSampler(predictor="none", corrector="none")
    for bad in (dict(snr=0.0), dict(n_steps=0), dict(N=0), dict(eps=-1.0), dict(snr=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PCSampler(**bad)
    sde = make_sde("vp", N=3)
    with pytest.raises(ValueError, match="eps must lie in"):
        sample(sde, RING.score_fn(sde), (2, 2), eps=1.5)


# -- every registered sampler --------------------------------------------------------------------


@pytest.mark.parametrize("method", list(SAMPLERS))
def test_every_sampler_counts_nfe_and_is_reproducible(method):
    """The contract of samplers.base for every registered sampler with its default options."""
    sde = make_sde("vp", N=25)  # beta_max / N < 1: a valid DDPM table (for the ddpm sampler)
    score = Counter(RING.score_fn(sde))
    x1, info = sample(sde, score, (6, 2), method, generator=torch.Generator().manual_seed(0),
                      dtype=F64)
    assert info["nfe"] == score.calls > 0
    x2, _ = sample(sde, RING.score_fn(sde), (6, 2), method,
                   generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(x1, x2) and torch.isfinite(x1).all()
    seeds = list(range(64))
    big, _ = sample(sde, RING.score_fn(sde), (64, 2), method, seeds=seeds, dtype=F64)
    one, _ = sample(sde, RING.score_fn(sde), (1, 2), method, seeds=[seeds[5]], dtype=F64)
    # Adaptive solvers pick steps from a batch-wide error norm: equal up to their tolerance.
    torch.testing.assert_close(one[0], big[5], rtol=1e-3, atol=1e-3)


# -- the reference's entry points ----------------------------------------------------------------


def test_get_pc_sampler_with_reference_arguments():
    sde = make_sde("vp", N=20)
    built = []

    def to_score_fn(model, continuous):
        built.append(continuous)
        return model

    sampling_fn = get_pc_sampler(sde, (8, 2), PREDICTORS.get("reverse_diffusion"),
                                 CORRECTORS.get("none"), lambda x: x + 1, snr=0.16,
                                 continuous=True, to_score_fn=to_score_fn)
    score = Counter(RING.score_fn(sde))
    x, nfe = sampling_fn(score, generator=torch.Generator().manual_seed(0))
    assert x.shape == (8, 2) and nfe == score.calls == 20 and built == [True]


def test_get_sampling_fn_reads_the_config():
    ml_collections = pytest.importorskip("ml_collections")
    config = ml_collections.ConfigDict()
    config.device = "cpu"
    config.training = ml_collections.ConfigDict({"continuous": True})
    config.sampling = ml_collections.ConfigDict(dict(
        method="pc", predictor="euler_maruyama", corrector="langevin", snr=0.16,
        n_steps_each=2, probability_flow=False, noise_removal=True))
    sde = make_sde("subvp", N=10)
    sampling_fn = get_sampling_fn(config, sde, (4, 2), lambda x: x, eps=1e-3)
    x, nfe = sampling_fn(RING.score_fn(sde), generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 2) and nfe == 10 * 3  # the reference's count, exact here
    config.sampling.method = "ode"
    x, nfe = get_sampling_fn(config, sde, (4, 2), lambda x: x, eps=1e-3)(RING.score_fn(sde))
    assert x.shape == (4, 2) and nfe > 0
    config.sampling.method = "foo"
    with pytest.raises(ValueError, match="valid: ode, pc"):
        get_sampling_fn(config, sde, (4, 2), lambda x: x, eps=1e-3)


@pytest.mark.parametrize("D", [1, 2, SMALL_D, SMALL_D + 1, 100])
def test_row_squared_norms_on_both_paths(D):
    """The Langevin step's per-sample ||score||^2: column by column up to SMALL_D entries, fused
    above; both equal the plain sum of squares."""
    flat = torch.randn(37, D, dtype=torch.float64, generator=torch.Generator().manual_seed(D))
    torch.testing.assert_close(_row_sq_norms(flat), flat.square().sum(dim=1), rtol=1e-12, atol=0)
