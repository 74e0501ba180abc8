"""Super-resolution and cascades (samplers/cascade.py) against the exact full-covariance oracle.

The data are 4x4 one-channel "images", a Gaussian mixture in D = 16 with full covariances whose
means differ mostly in the null space of the 2x area downsampling A (the low-resolution y = A x
leaves the mode ambiguous, so x | y is multimodal). The oracle (score_sde/oracle/full.py) is
checked against the diagonal one, autograd and Bayes' rule on the joint Gaussians; samplers are
checked against exact draws: mean exact log-density within 4.5 standard errors, sliced W2^2
within 5 standard deviations of its null distribution (estimated from pairs of exact draw sets),
and the data term A x = y up to the noise left at the sampler's end time.
"""

from __future__ import annotations

import math

import pytest
import torch

import sde_lib
from samplers import SAMPLERS, Cascade, Stage, super_resolve
from samplers import sample as samplers_sample
from samplers.cascade import truncation_time
from score_sde.oracle import FullGaussianMixture, GaussianMixture, area_downsampling_matrix

D, K, N_SAMPLES = 16, 3, 2000
SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.subVPSDE(), "ve": sde_lib.VESDE()}
A = area_downsampling_matrix(1, 4, 4, 2)  # (4, 16)
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def data() -> FullGaussianMixture:
    g = _gen(0)
    null = torch.eye(D, dtype=F64) - torch.linalg.pinv(A) @ A  # projector on null(A)
    L = 0.2 * torch.randn(K, D, D, generator=g, dtype=F64)
    covs = L @ L.transpose(-1, -2) + 0.04 * torch.eye(D, dtype=F64)
    means = 0.5 * torch.randn(1, D, generator=g, dtype=F64) \
        + 2.0 * torch.randn(K, D, generator=g, dtype=F64) @ null
    return FullGaussianMixture([0.2, 0.3, 0.5], means, covs)


@pytest.fixture(scope="module")
def y(data) -> torch.Tensor:
    """One low-resolution observation (4,) of a data draw."""
    return (data.sample(1, generator=_gen(1), dtype=F64) @ A.T)[0]


def oracle_factory(data: FullGaussianMixture, sde: sde_lib.SDE, aug_sde: sde_lib.SDE | None,
                   seen: list | None = None, A: torch.Tensor = A):
    """The exact conditional score as a stage's score factory: x | y_s under augmentation at the
    (fixed) level, one posterior per row of y_s, for y = A x."""

    def factory(y_s, level):
        if seen is not None:
            seen.append((y_s.clone(), level.clone()))
        s = float(level[0])
        assert bool((level == s).all())
        post = data.condition_augmented(A, y_s.reshape(y_s.shape[0], -1), aug_sde, s)
        return post.score_fn(sde)

    return factory


def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_dirs: int = 64) -> float:
    """Sliced W2^2 between equal-size sample sets (n, D): mean over random directions of the
    squared differences of sorted projections."""
    d = torch.randn(a.shape[1], n_dirs, generator=_gen(11), dtype=a.dtype)
    d = d / d.norm(dim=0)
    return float(((a @ d).sort(0).values - (b @ d).sort(0).values).pow(2).mean())


def assert_matches(dist, x, exact_draws, what: str) -> None:
    """x (n, D) against ``exact_draws(seed)`` (n, D) of the same law: mean log-density under
    ``dist`` (the data density on its support) within 4.5 SE, the sharp check (a doubled
    covariance is 30 SE off); sliced W2^2 within 5 standard deviations of its null distribution
    (12 pairs of independent exact sets), a coarse one: its null spread is dominated by the
    fluctuation of the mode weights across the wide gaps between modes, but a wrong observation
    or wrong weights are far beyond it."""
    ref = exact_draws(1000)
    lp_x, lp_r = dist.log_prob(x), dist.log_prob(ref)
    se = math.sqrt(lp_x.var().item() / len(lp_x) + lp_r.var().item() / len(lp_r))
    z = (lp_x.mean() - lp_r.mean()).item() / se
    assert abs(z) < 4.5, f"{what}: mean log-density off by {z:.1f} SE"
    null = torch.tensor([sliced_w2(exact_draws(1001 + i), ref) for i in range(12)])
    bound = float(null.mean() + 5 * null.std())
    sw = sliced_w2(x, ref)
    assert sw < bound, f"{what}: sliced W2^2 {sw:.4f} above the null bound {bound:.4f}"


def end_time(info) -> float:
    """The time a sampler's samples are drawn at: its eps, or 0 for PC."""
    return float(info["options"]["eps"]) if SAMPLERS.get(info["method"]).stops_at_eps else 0.0


# -- the oracle ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_name", list(SDES))
def test_full_mixture_with_diagonal_covariances_equals_the_diagonal_one(sde_name):
    gm = GaussianMixture.random(6, 3, seed=1)
    fm = FullGaussianMixture.from_diagonal(gm)
    sde = SDES[sde_name]
    x = gm.sample_marginal(7, sde, 0.2, generator=_gen(2), dtype=F64)
    torch.testing.assert_close(fm.log_prob(x), gm.log_prob(x), rtol=1e-12, atol=1e-12)
    for t in (1e-3, 0.3, 1.0):
        torch.testing.assert_close(fm.log_prob(x, t, sde), gm.log_prob(x, t, sde), rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(fm.score(x, t, sde), gm.score(x, t, sde), rtol=1e-10,
                                   atol=1e-10)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_score_is_the_gradient_of_the_log_density(data, sde_name):
    sde = SDES[sde_name]
    x = data.sample(6, generator=_gen(3), dtype=F64).reshape(6, 1, 4, 4)
    for t in (0.01, 0.5):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(data.log_prob(xg, t, sde).sum(), xg)
        torch.testing.assert_close(data.score(x, t, sde), grad, rtol=1e-9, atol=1e-9)


def _joint(data: FullGaussianMixture, R: torch.Tensor) -> FullGaussianMixture:
    """The mixture of the joint Gaussians of (x, y = A x + n), n ~ N(0, R), built directly."""
    Sigma, mu = data.covs, data.means[0]
    top = torch.cat([Sigma, Sigma @ A.T], dim=2)
    bottom = torch.cat([A @ Sigma, A @ Sigma @ A.T + R], dim=2)
    return FullGaussianMixture(data.weights, torch.cat([mu, mu @ A.T], 1),
                               torch.cat([top, bottom], 1))


@pytest.mark.parametrize("noise", ["scalar", "matrix"])
def test_posterior_is_bayes_rule_on_the_joint_gaussians(data, noise):
    """log p(x | y) = log p(x, y) - log p(y) at arbitrary x, for a batch of observations."""
    R = 0.3 * torch.eye(4, dtype=F64)
    if noise == "matrix":
        L = torch.randn(4, 4, generator=_gen(4), dtype=F64)
        R = 0.1 * L @ L.T + 0.05 * torch.eye(4, dtype=F64)
    joint = _joint(data, R)
    select_y = torch.cat([torch.zeros(4, D, dtype=F64), torch.eye(4, dtype=F64)], 1)
    ys = joint.sample(5, generator=_gen(5), dtype=F64)[:, D:]  # (5, 4)
    post = data.condition(A, ys, noise_cov=0.3 if noise == "scalar" else R)
    assert post.batch_size == 5
    x = 2.0 * torch.randn(5, D, generator=_gen(6), dtype=F64)
    expected = joint.log_prob(torch.cat([x, ys], 1)) - joint.linear_map(select_y).log_prob(ys)
    torch.testing.assert_close(post.log_prob(x), expected, rtol=1e-9, atol=1e-9)
    one = data.condition(A, ys[2], noise_cov=0.3 if noise == "scalar" else R)
    torch.testing.assert_close(one.log_prob(x[2:3]), expected[2:3], rtol=1e-9, atol=1e-9)


def test_noise_free_posterior_lives_on_the_observation_and_is_the_limit(data, y):
    post = data.condition(A, y)
    near = data.condition(A, y, noise_cov=1e-12)
    torch.testing.assert_close(post.means, near.means, rtol=0, atol=1e-5)
    torch.testing.assert_close(post.weights, near.weights, rtol=0, atol=1e-5)
    torch.testing.assert_close(post.covs, near.covs, rtol=0, atol=1e-5)
    torch.testing.assert_close(post.covs @ A.T, torch.zeros(K, D, 4, dtype=F64), rtol=0,
                               atol=1e-12)  # null space range(A^T): a degenerate Gaussian
    assert bool((post.eigvals > 0).sum(-1).eq(D - 4).all())
    x = post.sample(50, generator=_gen(7), dtype=F64)
    torch.testing.assert_close(x @ A.T, y.expand(50, 4), rtol=0, atol=1e-10)
    # the density on {A x = y} (coarea formula): p(x | y) = p(x) / (p_Y(y) sqrt(det A A^T))
    expected = data.log_prob(x) - data.linear_map(A).log_prob(y[None]) \
        - 0.5 * torch.logdet(A @ A.T)
    torch.testing.assert_close(post.log_prob(x), expected, rtol=1e-9, atol=1e-9)


def test_augmented_posterior_is_the_scaled_noisy_observation(data, y):
    sde, s = SDES["vp"], 0.3
    m, sigma = sde.marginal_coeffs(torch.tensor(s, dtype=F64))
    post = data.condition_augmented(A, y, sde, s)
    direct = data.condition(float(m) * A, y, noise_cov=float(sigma) ** 2)
    x = data.sample(4, generator=_gen(8), dtype=F64)
    torch.testing.assert_close(post.log_prob(x), direct.log_prob(x), rtol=1e-12, atol=1e-12)
    assert data.condition_augmented(A, y, sde, 0.0).eigvals.eq(0).sum() == 4 * K


def test_the_checks_detect_a_wrong_posterior(data, y):
    """Negative controls, with exact draws: the conditional with doubled covariances, the one of
    another observation and the unconditional data fail :func:`assert_matches`."""
    post = data.condition(A, y)

    def draws(seed):
        return post.sample(N_SAMPLES, generator=_gen(seed), dtype=F64)

    assert_matches(post, draws(5), draws, "exact")
    wide = FullGaussianMixture._from_parts(post.log_weights[0], post.means[0], 2 * post.eigvals,
                                           post.eigvecs)
    other = data.condition(A, -y)
    for wrong in (wide, other):
        with pytest.raises(AssertionError):
            assert_matches(post, wrong.sample(N_SAMPLES, generator=_gen(5), dtype=F64), draws,
                           "wrong")
    with pytest.raises(AssertionError):
        x = data.sample(N_SAMPLES, generator=_gen(5), dtype=F64)
        assert_matches(post, x - (x @ A.T - y) @ torch.linalg.pinv(A).T, draws, "unconditional")


# -- super-resolution through super_resolve ------------------------------------------------------

# (sampler, options, sde): the adaptive probability-flow ODE, predictor-corrector (ends at t = 0,
# denoised) and a fast multistep solver on every SDE.
SR_CASES = [("ode", {"rtol": 1e-4, "atol": 1e-4}, "vp"), ("pc", {"N": 200}, "vp"),
            ("dpm_solver++_3m", {"nfe": 48}, "vp"), ("dpm_solver++_3m", {"nfe": 48}, "subvp"),
            ("dpm_solver++_3m", {"nfe": 48}, "ve")]


@pytest.mark.parametrize("method, options, sde_name", SR_CASES)
def test_super_resolution_matches_the_exact_posterior(data, y, method, options, sde_name):
    sde = SDES[sde_name]
    stage = Stage(sde, (1, 4, 4), score_factory=oracle_factory(data, sde, None), method=method,
                  options=options)
    y_low = y.reshape(1, 1, 2, 2).expand(N_SAMPLES, 1, 2, 2)
    x, info = super_resolve(stage, y_low, generator=_gen(2))
    assert x.shape == (N_SAMPLES, 1, 4, 4) and info["conditioning"] == "clean"
    assert info["aug_level"] == 0.0 and info["nfe"] > 0 and info["method"] == method
    x = x.reshape(N_SAMPLES, D)
    post, t_end = data.condition(A, y), end_time(info)
    assert_matches(post, x, lambda seed: post.sample_marginal(
        N_SAMPLES, sde, t_end, generator=_gen(seed), dtype=F64), f"{method} on {sde_name}")
    # the data term: A x_t = m(t) y + s(t) A z, so its residual has rms s(t) / 2 per entry
    m, s = sde.marginal_coeffs(torch.tensor(t_end, dtype=F64))
    rms = float((x @ A.T - m * y).pow(2).mean().sqrt())
    assert rms < 1.2 * float(s) / 2 + 1e-4, f"A x misses y by rms {rms:.2e} (s/2={s / 2:.2e})"


@pytest.mark.parametrize("method, sde_name, level", [("ode", "vp", 0.3),
                                                     ("dpm_solver++_3m", "ve", 0.4)])
def test_super_resolution_from_an_augmented_observation(data, y, method, sde_name, level):
    """Given y_s at level s, samples match the closed-form x | y_s."""
    sde = SDES[sde_name]
    m, sigma = sde.marginal_coeffs(torch.tensor(level, dtype=F64))
    y_s = m * y + sigma * torch.randn(4, generator=_gen(9), dtype=F64)
    stage = Stage(sde, (1, 4, 4), score_factory=oracle_factory(data, sde, sde), method=method,
                  options={"nfe": 48} if method != "ode" else {}, aug_sde=sde, aug_level=level)
    x, info = super_resolve(stage, y_s.reshape(1, 1, 2, 2).expand(N_SAMPLES, 1, 2, 2),
                            noised=True, generator=_gen(2))
    assert info["conditioning"] == "given" and info["aug_level"] == level
    post = data.condition_augmented(A, y_s, sde, level)
    assert_matches(post, x.reshape(N_SAMPLES, D), lambda seed: post.sample_marginal(
        N_SAMPLES, sde, end_time(info), generator=_gen(seed), dtype=F64), f"{method} at {level}")


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_augmentation_draws_the_noised_observation_at_the_level(data, y, sde_name):
    sde, level, n = SDES[sde_name], 0.4, 4000
    seen: list = []
    stage = Stage(sde, (1, 4, 4), score_factory=oracle_factory(data, sde, sde, seen),
                  method="ddim", options={"nfe": 1}, aug_sde=sde, aug_level=level)
    _, info = super_resolve(stage, y.reshape(1, 1, 2, 2).expand(n, 1, 2, 2), generator=_gen(3))
    y_s, s = seen[-1]
    assert info["conditioning"] == "noised" and info["aug_level"] == level
    torch.testing.assert_close(s, torch.full((n,), level, dtype=F64))
    m, sigma = sde.marginal_coeffs(torch.tensor(level, dtype=F64))
    eps = (y_s.reshape(n, 4) - m * y) / sigma
    assert float(eps.mean(0).abs().max()) < 5 / math.sqrt(n)
    assert float((eps.std(0) - 1).abs().max()) < 5 / math.sqrt(2 * n)
    super_resolve(stage, y.reshape(1, 1, 2, 2), level=0.0, generator=_gen(3))
    assert torch.equal(seen[-1][0], y.reshape(1, 1, 2, 2))  # level 0: y itself, whatever s(0)
    # per-sample levels: row 0 clean, row 1 noised (a factory that takes mixed levels)
    stage.score_factory = lambda y_s, s: seen.append((y_s, s)) or (lambda x, t: -x)
    _, info = super_resolve(stage, y.reshape(1, 1, 2, 2).expand(2, 1, 2, 2),
                            level=torch.tensor([0.0, level], dtype=F64), generator=_gen(3))
    y_s, s = seen[-1]
    assert torch.equal(y_s[0], y.reshape(1, 2, 2)) and not torch.equal(y_s[1], y.reshape(1, 2, 2))
    assert info["aug_level"] == [0.0, level] and s.tolist() == [0.0, level]


# -- cascades -------------------------------------------------------------------------------------

CASCADE_CASES = [("vp", 0.0, False), ("vp", 0.3, False), ("vp", 0.3, True), ("ve", 0.4, True)]


@pytest.mark.parametrize("sde_name, level, truncate", CASCADE_CASES)
def test_cascade_of_oracle_stages_samples_the_data(data, sde_name, level, truncate):
    """Base: the exact law of y = A x; SR: the exact x | y_s. The joint output is the data."""
    sde = SDES[sde_name]
    base = Stage(sde, (1, 2, 2), score_fn=data.linear_map(A).score_fn(sde),
                 method="dpm_solver++_3m", options={"nfe": 48})
    sr = Stage(sde, (1, 4, 4), score_factory=oracle_factory(data, sde, sde),
               method="dpm_solver++_3m", options={"nfe": 48}, aug_sde=sde, aug_level=level,
               truncate=truncate)
    outputs, infos = Cascade([base, sr]).sample(N_SAMPLES, generator=_gen(9), dtype=F64)
    assert [o.shape for o in outputs] == [(N_SAMPLES, 1, 2, 2), (N_SAMPLES, 1, 4, 4)]
    assert [i["nfe"] for i in infos] == [48, 48]
    assert infos[0]["truncated"] == (truncate and level > 0)
    if truncate:
        t_star = truncation_time(sde, sde, level)
        assert abs(t_star - level) < 1e-9  # the same SDE: the same time
        assert infos[0]["end_time"] == infos[0]["options"]["eps"] == t_star
        assert infos[1]["conditioning"] == "given"
    else:
        assert infos[0]["end_time"] == 1e-3
        assert infos[1]["conditioning"] == ("noised" if level else "clean")
    x = outputs[1].reshape(N_SAMPLES, D)
    assert_matches(data, x, lambda seed: data.sample_marginal(
        N_SAMPLES, sde, infos[1]["end_time"], generator=_gen(seed), dtype=F64),
        f"cascade {sde_name} level {level} truncate {truncate}")


def test_three_stage_cascade_with_a_stage_both_conditioned_and_truncated(data):
    """1x1 -> 2x2 -> 4x4: the middle stage samples y1 | y2_s (noised) and stops early at the
    third stage's level (truncated); the last output is the data, the middle one p_t*(y1)."""
    sde = SDES["vp"]
    A2 = area_downsampling_matrix(1, 2, 2, 2)  # (1, 4): 2x2 -> 1x1
    mid = data.linear_map(A)  # the law of y1 = A x
    base = Stage(sde, (1, 1, 1), score_fn=data.linear_map(A2 @ A).score_fn(sde),
                 method="dpm_solver++_3m", options={"nfe": 48})
    middle = Stage(sde, (1, 2, 2), score_factory=oracle_factory(mid, sde, sde, A=A2),
                   method="dpm_solver++_3m", options={"nfe": 48}, aug_sde=sde, aug_level=0.2)
    top = Stage(sde, (1, 4, 4), score_factory=oracle_factory(data, sde, sde),
                method="dpm_solver++_3m", options={"nfe": 48}, aug_sde=sde, aug_level=0.3,
                truncate=True)
    outputs, infos = Cascade([base, middle, top]).sample(N_SAMPLES, generator=_gen(4),
                                                         dtype=F64)
    assert [i["conditioning"] for i in infos] == ["none", "noised", "given"]
    assert [i["truncated"] for i in infos] == [False, True, False]
    t_star = infos[1]["end_time"]
    assert abs(t_star - 0.3) < 1e-9
    y1 = outputs[1].reshape(N_SAMPLES, 4)
    assert_matches(mid, y1, lambda seed: mid.sample_marginal(
        N_SAMPLES, sde, t_star, generator=_gen(seed), dtype=F64), "middle stage at t*")
    x = outputs[2].reshape(N_SAMPLES, D)
    assert_matches(data, x, lambda seed: data.sample_marginal(
        N_SAMPLES, sde, 1e-3, generator=_gen(seed), dtype=F64), "three-stage cascade")


def test_cascade_from_given_low_resolution_images(data, y):
    sde = SDES["vp"]
    base = Stage(sde, (1, 2, 2), score_fn=data.linear_map(A).score_fn(sde), method="pc")
    sr = Stage(sde, (1, 4, 4), score_factory=oracle_factory(data, sde, sde), method="ddim",
               options={"nfe": 20}, aug_sde=sde, aug_level=0.2, truncate=True)
    with pytest.raises(ValueError, match="ends at t = 0"):
        Cascade([base, sr])  # truncation stops the base, which pc cannot
    sr.truncate = False
    low = y.reshape(1, 1, 2, 2).expand(3, 1, 2, 2).clone()
    outputs, infos = Cascade([base, sr]).sample(3, low_res=low, seeds=[1, 2, 3])
    assert outputs[0] is low and infos[0]["nfe"] == 0 and infos[1]["nfe"] == 20
    again, _ = Cascade([base, sr]).sample(1, low_res=low[:1], seeds=[1])
    torch.testing.assert_close(again[1], outputs[1][:1], rtol=0, atol=1e-12)  # same draws


# -- validation at the boundary -------------------------------------------------------------------


@pytest.mark.parametrize("method", [n for n in SAMPLERS.names() if SAMPLERS.get(n).stops_at_eps])
def test_samplers_declaring_stops_at_eps_return_draws_of_p_eps(method):
    """What truncation relies on: with eps = 0.5, N(0, 0.04 I) data come back with the variance
    of p_0.5, m^2 0.04 + s^2 (0.92 on VP), not the data's 0.04."""
    sde, n, eps = SDES["vp"], 4000, 0.5
    gm = GaussianMixture(torch.ones(1), torch.zeros(1, 2), 0.2)
    x, info = samplers_sample(sde, gm.score_fn(sde), (n, 2), method, eps=eps, generator=_gen(0),
                              dtype=F64)
    m, s = sde.marginal_coeffs(torch.tensor(eps, dtype=F64))
    var = float(m**2 * 0.04 + s**2)
    assert abs(float(x.var(0).mean()) / var - 1) < 0.1, f"{method}: var {float(x.var(0).mean())}"


def test_truncation_refuses_different_marginals():
    base = Stage(SDES["ve"], (1, 2, 2), score_fn=lambda x, t: -x, method="ode")
    sr = Stage(SDES["vp"], (1, 4, 4), score_factory=lambda y, s: (lambda x, t: -x),
               aug_sde=SDES["vp"], aug_level=0.3, truncate=True)
    with pytest.raises(ValueError, match="marginal of the augmentation SDE"):
        Cascade([base, sr])
    with pytest.raises(ValueError, match="marginal"):
        truncation_time(SDES["subvp"], SDES["vp"], 0.3)


def test_stage_and_inputs_are_validated():
    sde = SDES["vp"]

    def factory(y, s):
        return lambda x, t: -x

    with pytest.raises(ValueError, match=r"Unknown sampler 'nope'; valid: .*ode"):
        Stage(sde, (1, 4, 4), score_factory=factory, method="nope")
    with pytest.raises(ValueError, match="shape must be"):
        Stage(sde, (4, 4), score_factory=factory)
    with pytest.raises(ValueError, match="aug_level must lie in"):
        Stage(sde, (1, 4, 4), score_factory=factory, aug_sde=sde, aug_level=1.5)
    with pytest.raises(ValueError, match="needs an aug_sde"):
        Stage(sde, (1, 4, 4), score_factory=factory, aug_level=0.2)
    with pytest.raises(ValueError, match="exactly one"):
        Stage(sde, (1, 4, 4))
    stage = Stage(sde, (1, 4, 4), score_factory=factory)
    with pytest.raises(ValueError, match=r"y_low must have shape \(B, 1, h, w\)"):
        super_resolve(stage, torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="levels must lie in"):
        super_resolve(stage, torch.zeros(2, 1, 2, 2), level=torch.tensor([0.0, 0.5]))
    base = Stage(sde, (1, 2, 2), score_fn=lambda x, t: -x)
    with pytest.raises(ValueError, match="plain score_fn"):
        Cascade([base, base])
    with pytest.raises(ValueError, match="low_res must be a floating-point tensor of shape"):
        Cascade([base, stage]).sample(2, low_res=torch.zeros(2, 1, 4, 4))
