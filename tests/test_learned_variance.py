"""Improved-DDPM learned variances (Nichol & Dhariwal 2021): respacing, the reverse step, the VLB
terms and the hybrid loss against the official DiT code's fixture; normal KL and the discretized
decoder against closed forms; the VLB and learned-variance sampling on Gaussian-mixture data with
the exact eps and variance; the ``ddpm`` sampler's contract."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import MISSING_FIXTURES, SHARED_FIXTURES

import likelihood
import samplers
import sde_lib
from score_sde import oracle
from score_sde.discrete_diffusion import (
    RespacedProcess,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    hybrid_loss_terms,
    normal_kl,
    prior_bpd,
    space_timesteps,
    vb_terms_bpd,
)

F64 = torch.float64
DIT_DIR = SHARED_FIXTURES / "dit"
SPACINGS = ("100", "10")


# -- the official code's numbers (fixture) -------------------------------------------------------


@pytest.fixture(scope="module")
def official():
    if not (DIT_DIR / "learned_variance.safetensors").is_file():
        pytest.skip(f"DiT learned-variance {MISSING_FIXTURES} {DIT_DIR} (only in the dev checkout)")
    from safetensors.torch import load_file

    meta = json.loads((DIT_DIR / "dit.json").read_text())["learned_variance"]
    return load_file(DIT_DIR / "learned_variance.safetensors"), meta


def stand_in(x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's closed-form network at ORIGINAL steps k (B,): (eps, v)."""
    k = k.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(0.7 * x + 0.3 * torch.sin(k / 97)), torch.sin(1.3 * x.flip(1) + k / 331)


def _close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_respacing_equals_the_official_timestep_map_and_betas(official, spacing):
    tensors, meta = official
    assert space_timesteps(1000, spacing) == meta[spacing]["timestep_map"]
    process = RespacedProcess.from_sde(sde_lib.DiscreteVPSDE(), spacing)
    assert process.timesteps.tolist() == meta[spacing]["timestep_map"]
    _close(process.betas, tensors[f"s{spacing}_betas"], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_reverse_step_and_vb_terms_equal_the_official_code(official, spacing):
    """At the official float32 table precision every quantity equals the fixture to 1e-10; with
    our exact float64 tables it differs by the official code's rounding (~1e-7 relative)."""
    tensors, meta = official
    x0, xt = tensors["x0"], tensors["xt"]
    exact = RespacedProcess.from_sde(sde_lib.DiscreteVPSDE(), spacing)
    as_official = RespacedProcess.from_sde(sde_lib.DiscreteVPSDE(), spacing,
                                           coefficient_dtype=torch.float32)
    for i in meta[spacing]["indices"]:
        steps = torch.full((3,), i)
        eps, v = stand_in(xt, exact.timesteps[steps])
        expected = [tensors[f"s{spacing}_i{i}_{name}"]
                    for name in ("mean", "log_variance", "pred_xstart", "vb_bpd")]
        for process, rtol, atol in ((as_official, 1e-12, 1e-10), (exact, 1e-5, 1e-6)):
            mean, log_var, x0_hat = process.p_mean_variance(eps, v, xt, steps)
            vb = vb_terms_bpd(process, eps, v, x0, xt, steps)
            for got, want in zip((mean, log_var, x0_hat, vb), expected):
                _close(got, want, rtol, atol)
        # an int step gives the same as a per-sample one
        mean, _, _ = exact.p_mean_variance(eps, v, xt, i)
        _close(mean, exact.p_mean_variance(eps, v, xt, steps)[0], 0, 0)
    _close(prior_bpd(as_official, x0), tensors[f"s{spacing}_prior_bpd"], 1e-12, 1e-10)
    _close(prior_bpd(exact, x0), tensors[f"s{spacing}_prior_bpd"], 1e-4, 1e-9)


def test_hybrid_loss_equals_the_official_code(official):
    tensors, _ = official
    x0, t, noise = tensors["x0"], tensors["hybrid_t"], tensors["hybrid_noise"]
    for process, rtol, atol in (
            (RespacedProcess.from_sde(sde_lib.DiscreteVPSDE(), coefficient_dtype=torch.float32),
             1e-12, 1e-10),
            (RespacedProcess.from_sde(sde_lib.DiscreteVPSDE()), 1e-5, 1e-7)):
        x_t = process.q_sample(x0, t, noise)
        eps, v = stand_in(x_t, t)
        terms = hybrid_loss_terms(process, eps, v, x0, x_t, t, noise)
        for name in ("mse", "vb", "loss"):
            _close(terms[name], tensors[f"hybrid_{name}"], rtol, atol)


def test_the_sampler_step_is_the_official_step(official):
    """The first step of ``ddpm`` from x_T = xt on the '100' grid is spaced step 99: its x0_hat
    and mean + exp(log_var / 2) z are the fixture's (to the official table rounding)."""
    tensors, _ = official
    sde = sde_lib.DiscreteVPSDE()
    xt = tensors["xt"]

    class Network:
        def __call__(self, x, t):
            raise AssertionError("the learned variance calls eps_and_v")

        def eps_and_v(self, x, t):
            return stand_in(x, sde.time_to_index(t))

    seen = []
    samplers.sample(sde, Network(), xt.clone(), "ddpm", spacing="100",
                    generator=torch.Generator().manual_seed(3),
                    callback=lambda step, t, x, x0_hat: seen.append((t, x.clone(), x0_hat)))
    z = samplers.NoiseSource(torch.Generator().manual_seed(3)).randn_like(xt)
    t, x, x0_hat = seen[0]
    expected = tensors["s100_i99_mean"] + torch.exp(0.5 * tensors["s100_i99_log_variance"]) * z
    _close(x0_hat, tensors["s100_i99_pred_xstart"], 1e-6, 1e-6)
    _close(x, expected, 1e-6, 1e-6)
    assert float(t) == pytest.approx(float(sde.index_to_time(989)))
    assert len(seen) == 100 and float(seen[-1][0]) == 0.0


# -- closed forms --------------------------------------------------------------------------------


def test_normal_kl_is_the_closed_form_and_the_integral():
    from scipy import integrate, stats

    m1, lv1, m2, lv2 = (torch.tensor(v, dtype=F64) for v in (0.3, -0.4, -1.1, 0.7))
    s1, s2 = math.exp(0.5 * -0.4), math.exp(0.5 * 0.7)
    closed = math.log(s2 / s1) + (s1**2 + (0.3 + 1.1) ** 2) / (2 * s2**2) - 0.5
    p, q = stats.norm(0.3, s1), stats.norm(-1.1, s2)
    numeric = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -12, 12)[0]
    assert float(normal_kl(m1, lv1, m2, lv2)) == pytest.approx(closed, rel=1e-12)
    assert closed == pytest.approx(numeric, rel=1e-8)
    assert float(normal_kl(m1, lv1, m1, lv1)) == 0.0


@pytest.mark.parametrize("levels", [256, 17])
def test_the_exact_discretized_decoder_is_the_bin_probability(levels):
    """log P(bin) = log(Phi(upper) - Phi(lower)) with open edge bins (scipy), summing to one over
    the levels, stable far in the tails; the tanh variant agrees to the approximation's 3e-4."""
    from scipy import stats

    grid = torch.linspace(-1, 1, levels, dtype=F64)
    half = 1.0 / (levels - 1)
    for mean, log_scale in ((0.1, math.log(0.3)), (-0.95, math.log(0.02)), (0.7, math.log(2.0))):
        m, ls = torch.tensor(mean, dtype=F64), torch.tensor(log_scale, dtype=F64)
        logp = discretized_gaussian_log_likelihood(grid[None], m, ls, levels=levels, cdf="exact")[0]
        s = math.exp(log_scale)
        upper, lower = (grid.numpy() + half - mean) / s, (grid.numpy() - half - mean) / s
        # Phi(u) - Phi(l), as sf(l) - sf(u) above the mean (no cancellation near 1)
        bins = torch.from_numpy(stats.norm.cdf(upper) - stats.norm.cdf(lower)).where(
            grid <= mean, torch.from_numpy(stats.norm.sf(lower) - stats.norm.sf(upper)))
        edges = torch.tensor([stats.norm.cdf(upper[0]), stats.norm.sf(lower[-1])])
        expected = torch.cat([edges[:1], bins[1:-1], edges[1:]])
        keep = expected > 1e-300
        torch.testing.assert_close(logp[keep], torch.log(expected[keep]), rtol=1e-9, atol=1e-12)
        assert float(torch.logsumexp(logp, 0)) == pytest.approx(0.0, abs=1e-12)
        tanh = discretized_gaussian_log_likelihood(grid[None], m, ls, levels=levels)[0]
        assert (tanh.exp() - logp.exp()).abs().max() < 3e-4
    # 30 standard deviations out: the exact variant stays finite and right, in log space
    x = torch.tensor([[0.0]], dtype=F64)
    far = discretized_gaussian_log_likelihood(x, torch.tensor(0.6, dtype=F64),
                                              torch.tensor(math.log(0.02), dtype=F64),
                                              levels=levels, cdf="exact")
    expected = math.log(stats.norm.cdf((half - 0.6) / 0.02) - stats.norm.cdf((-half - 0.6) / 0.02))
    assert float(far) == pytest.approx(expected, rel=1e-9)


def test_the_tanh_cdf_is_the_official_approximation():
    x = torch.linspace(-6, 6, 101, dtype=F64)
    phi = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - phi).abs().max() < 3e-4
    assert float(approx_standard_normal_cdf(torch.zeros((), dtype=F64))) == 0.5


def test_space_timesteps_by_hand_and_its_errors():
    assert space_timesteps(10, "3") == [0, 4, 9]  # stride 4.5: round(4.5) = 4 (half to even)
    assert space_timesteps(10, "2,2") == [0, 4, 5, 9]  # two sections of 5 steps
    assert space_timesteps(11, "1,2") == [0, 6, 10]  # sections of 6 and 5 steps
    assert space_timesteps(10, "ddim5") == [0, 2, 4, 6, 8]
    assert space_timesteps(10, 10) == list(range(10))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    with pytest.raises(ValueError, match="no stride"):
        space_timesteps(10, "ddim7")
    with pytest.raises(ValueError, match="keeps 6 steps of its 5"):
        space_timesteps(10, "6,1")
    with pytest.raises(ValueError, match="valid forms: 'ddimK'"):
        space_timesteps(10, "fast")


def test_a_respaced_process_keeps_the_marginals_and_ho_posterior():
    sde = sde_lib.DiscreteVPSDE()
    process = RespacedProcess.from_sde(sde, "ddim25")
    k = process.timesteps
    torch.testing.assert_close(process.alphas_cumprod, sde.alphas_cumprod[k], rtol=1e-14, atol=0)
    # beta~_i = beta'_i (1 - abar'_{i-1}) / (1 - abar'_i) and the posterior mean weights sum so
    # that a constant-free x_0 = x_i / sqrt(abar) is a fixed point of the mean in expectation
    abar, prev = sde.alphas_cumprod[k], torch.cat([torch.ones(1, dtype=F64),
                                                  sde.alphas_cumprod[k][:-1]])
    beta = 1 - abar / prev
    torch.testing.assert_close(process.posterior_variance, beta * (1 - prev) / (1 - abar))
    # E[x_{i-1}] under the posterior with x_i ~ q(x_i | x_0) is sqrt(abar'_{i-1}) x_0
    x0 = torch.tensor([[0.7, -0.2]], dtype=F64)
    mean, _, _ = process.q_posterior(x0, torch.sqrt(abar[5]) * x0, 5)
    torch.testing.assert_close(mean, torch.sqrt(prev[5]) * x0, rtol=1e-12, atol=1e-14)


# -- Gaussian-mixture data with the exact eps and variance ---------------------------------------


MIX = oracle.GaussianMixture([1.0, 2.0, 1.0], [[-1.5, 0.5], [0.8, -0.6], [1.2, 1.4]],
                             [[0.3, 0.5], [0.4, 0.2], [0.25, 0.35]])


class MixtureNetwork:
    """The exact network of mixture data on a DDPM table: eps = E[eps | x_k] and, for kept step i
    of ``process``, v giving Sigma = c_x0^2 Var[x_0 | x_k] + beta~'_i per element (the exact
    variance of q(x_{i-1} | x_i)), or the constant ``v``."""

    def __init__(self, sde, process, v: float | None = None):
        self.sde, self.process, self.v = sde, process, v

    def _moments(self, x, t):
        """(m, s, E[x0 | x], Var[x0 | x], i) at the table step of time t."""
        n = int(torch.round(self.sde.time_to_index(t[:1].to(F64))))
        abar = float(self.sde.alphas_cumprod[n])
        m, s = math.sqrt(abar), math.sqrt(1 - abar)
        mu, var0 = MIX.means, MIX.stds**2  # (K, D)
        denom = m**2 * var0 + s**2
        diff = x[:, None, :] - m * mu  # (B, K, D)
        log_r = torch.log(MIX.weights) - 0.5 * (diff**2 / denom + torch.log(denom)).sum(-1)
        r = torch.softmax(log_r, dim=1)[:, :, None]
        mean_k = mu + m * var0 * diff / denom
        mean = (r * mean_k).sum(1)
        var = (r * (var0 * s**2 / denom + mean_k**2)).sum(1) - mean**2
        i = int(torch.searchsorted(self.process.timesteps, torch.tensor(n)))
        return m, s, mean, var, i

    def __call__(self, x, t):
        m, s, mean, _, _ = self._moments(x, t)
        return (m * mean - x) / s**2  # Tweedie: E[x0 | x] = (x + s^2 score) / m

    def eps_and_v(self, x, t):
        m, s, mean, var, i = self._moments(x, t)
        eps = (x - m * mean) / s
        if self.v is not None:
            return eps, torch.full_like(x, self.v)
        p = self.process
        target = p.posterior_mean_coef1[i] ** 2 * var + p.posterior_variance[i]
        low, high = p.posterior_log_variance_clipped[i], p.log_betas[i]
        return eps, 2 * (torch.log(target) - low) / (high - low) - 1


def _mixture_moments():
    """Exact E[x] and E[x^2] (D,) of the mixture."""
    w = MIX.weights[:, None]
    return (w * MIX.means).sum(0), (w * (MIX.means**2 + MIX.stds**2)).sum(0)


def test_learned_variance_sampling_with_the_exact_variance_samples_the_mixture():
    """50 respaced steps with the exact eps and the exact per-element variance of each reverse
    step: mean and second moment per coordinate within 3.5 standard errors of the exact ones
    (2,000 samples); Sigma off by a factor 2 either way fails by > 8 standard errors."""
    sde = sde_lib.DiscreteVPSDE()
    process = RespacedProcess.from_sde(sde, "50")
    mean, second = _mixture_moments()

    def z_scores(scale):
        net = MixtureNetwork(sde, process)
        inner = net.eps_and_v
        if scale != 1:  # log Sigma + log scale, written through v
            p = process

            def scaled(x, t):
                eps, v = inner(x, t)
                i = net._moments(x, t)[4]
                return eps, v + 2 * math.log(scale) / (p.log_betas[i]
                                                       - p.posterior_log_variance_clipped[i])

            net.eps_and_v = scaled
        x, info = samplers.sample(sde, net, (2000, 2), "ddpm", nfe=50, variance="learned",
                                  dtype=F64, generator=torch.Generator().manual_seed(0))
        assert info["nfe"] == 50 and info["variance"] == "learned"
        se1, se2 = x.std(0) / math.sqrt(2000), (x**2).std(0) / math.sqrt(2000)
        return torch.cat([(x.mean(0) - mean) / se1, ((x**2).mean(0) - second) / se2]).abs()

    assert z_scores(1.0).max() < 3.5
    assert z_scores(2.0).max() > 8 and z_scores(0.5).max() > 8


@pytest.mark.parametrize("fixed, v", [("large", 1.0), ("small", -1.0)])
def test_v_of_plus_or_minus_one_is_the_fixed_variance(fixed, v):
    """v = +1 / -1 through 'learned' equals the fixed sampler on the plain score (eps = -s
    score, no eps_and_v) to 1e-12 in float64."""
    sde = sde_lib.DiscreteVPSDE()
    process = RespacedProcess.from_sde(sde, "20")
    net = MixtureNetwork(sde, process, v=v)
    learned, _ = samplers.sample(sde, net, (64, 2), "ddpm", nfe=20, variance="learned",
                                 dtype=F64, generator=torch.Generator().manual_seed(1))
    plain = lambda x, t: net(x, t)  # noqa: E731 (a score function without eps_and_v)
    fixed_x, info = samplers.sample(sde, plain, (64, 2), "ddpm", nfe=20, variance=fixed,
                                    dtype=F64, generator=torch.Generator().manual_seed(1))
    assert info["variance"] == fixed
    torch.testing.assert_close(learned, fixed_x, rtol=0, atol=1e-12)
    other, _ = samplers.sample(sde, plain, (64, 2), "ddpm", nfe=20,
                               variance="small" if fixed == "large" else "large", dtype=F64,
                               generator=torch.Generator().manual_seed(1))
    assert (other - fixed_x).abs().max() > 1e-3


def test_the_vlb_bounds_the_exact_nll_and_tightens_with_more_steps():
    """Continuous mixture data, Gaussian decoder, exact eps: the VLB in bits/dim is above the
    exact -log2 p(x) / D within Monte-Carlo error with the exact variance (and close to it: the
    sum of the KL terms is ~6 bits, so a factor 2 or a dropped term would show); with the fixed
    posterior variance its gap shrinks from the '100' to the full 1000-step grid."""
    sde = sde_lib.DiscreteVPSDE()
    B = 500
    x = MIX.sample(B, generator=torch.Generator().manual_seed(3), dtype=F64)
    nll = -MIX.log_prob(x) / (2 * math.log(2))

    def gap(spacing, variance):
        process = RespacedProcess.from_sde(sde, spacing)
        net = MixtureNetwork(sde, process)
        bpd, info = likelihood.vlb_bits_per_dim(sde, net, x, levels=None, spacing=spacing,
                                                variance=variance,
                                                generator=torch.Generator().manual_seed(0))
        assert info["nfe"] == process.n and info["terms"].shape == (B, process.n)
        d = bpd - nll
        return float(d.mean()), float(d.std() / math.sqrt(B))

    exact, se = gap(None, "learned")
    assert -3.5 * se < exact < 3.5 * se + 0.1
    coarse, se_coarse = gap("100", "small")
    fine, se_fine = gap(None, "small")
    assert fine > -3.5 * se_fine and coarse > -3.5 * se_coarse
    assert coarse - fine > 3.5 * math.hypot(se_coarse, se_fine) and coarse > 5 * fine


# -- the sampler's contract ----------------------------------------------------------------------


def test_ddpm_counts_one_nfe_per_step_and_is_reproducible():
    sde = sde_lib.DiscreteVPSDE()
    process = RespacedProcess.from_sde(sde, "ddim10")
    net = MixtureNetwork(sde, process)
    calls = []
    inner = net.eps_and_v
    net.eps_and_v = lambda x, t: calls.append(1) or inner(x, t)
    a, info = samplers.sample(sde, net, (8, 2), "ddpm", spacing="ddim10", dtype=F64, seeds=range(8))
    assert info["nfe"] == len(calls) == 10 and info["timesteps"] == process.timesteps.tolist()
    assert info["variance"] == "learned" and info["spacing"] == "ddim10"
    b, _ = samplers.sample(sde, net, (3, 2), "ddpm", spacing="ddim10", dtype=F64, seeds=[5, 6, 7])
    torch.testing.assert_close(a[5:], b, rtol=0, atol=0)  # sample k depends on its seed alone
    small = sde_lib.DiscreteVPSDE(N=100, beta_end=0.2)
    full, info = samplers.sample(small, MIX.score_fn(small), (2, 2), "ddpm", dtype=F64,
                                 generator=torch.Generator().manual_seed(0))
    assert info["nfe"] == 100 and info["variance"] == "large"  # no v: the fixed default


def test_ddpm_refuses_bad_options_naming_the_valid_ones():
    sde = sde_lib.DiscreteVPSDE(N=100)
    score = MIX.score_fn(sde)
    with pytest.raises(ValueError, match="valid: learned, large, small"):
        samplers.sample(sde, score, (2, 2), "ddpm", variance="fixed")
    with pytest.raises(ValueError, match="learn_sigma"):
        samplers.sample(sde, score, (2, 2), "ddpm", nfe=5, variance="learned")
    with pytest.raises(ValueError, match="keeps 10 steps of 100, but nfe=5"):
        samplers.sample(sde, score, (2, 2), "ddpm", nfe=5, spacing="10")
    with pytest.raises(ValueError, match="valid forms"):
        samplers.sample(sde, score, (2, 2), "ddpm", spacing="fast")
    with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
        samplers.sample(sde, score, (2, 2), "ddpm", nfe=0)
    ve = sde_lib.VESDE(N=10)
    with pytest.raises(ValueError, match="VESDE has no DDPM table"):
        samplers.sample(ve, MIX.score_fn(ve), (2, 2), "ddpm")
    with pytest.raises(ValueError, match="betas outside"):
        samplers.sample(sde_lib.VPSDE(N=10), score, (2, 2), "ddpm")


@pytest.mark.parametrize("sde", [sde_lib.DiscreteVPSDE(N=200, beta_end=0.1), sde_lib.VPSDE(N=200)],
                         ids=["discrete_vpsde", "vpsde"])
def test_a_network_sees_the_original_steps_through_its_adapter(sde):
    """Through ``models.utils.get_score_fn`` (discrete training) the network is called at the
    kept ORIGINAL steps k_i, highest first, once per step, with its v used as the variance."""
    from models.utils import get_score_fn

    labels = []

    def model_fn(x, n):  # eps = 0, v = 1: the 'large' variance
        labels.append(n[0].item())
        return torch.cat([torch.zeros_like(x), torch.ones_like(x)], dim=1)

    score_fn = get_score_fn(sde, model_fn, continuous=False, learned_variance=True)
    x, info = samplers.sample(sde, score_fn, (4, 3, 2, 2), "ddpm", spacing="ddim20", dtype=F64,
                              generator=torch.Generator().manual_seed(0))
    assert info["nfe"] == 20 and info["variance"] == "learned"
    assert labels == pytest.approx(list(range(190, -1, -10)), abs=1e-9)
    # eps = 0: x0_hat = x_i / sqrt(abar), a pure shrinkage chain with Sigma = beta' noise
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("a, c", [(1.0, 0.0), (2.0, -1.0), (4.0, -3.0)])
def test_the_decoder_partitions_the_data_range_in_any_model_space(a, c):
    """L_0 of every level u of the data, seen in model space y = a u + c (``data_affine``):
    the bin probabilities 2^-L_0 sum to one (the bins tile the line in data coordinates)."""
    process = RespacedProcess.from_sde(sde_lib.DiscreteVPSDE(N=100, beta_end=0.2), "10")
    u = torch.linspace(0, 1, 17, dtype=F64)[:, None]  # (17, 1): one level per sample
    y = a * u + c
    x_t = torch.full_like(y, 0.3 * a + c)
    eps = torch.full_like(y, 0.2)
    affine = None if (a, c) == (2.0, -1.0) else (a, c)
    for cdf in ("exact", "tanh"):
        nll = vb_terms_bpd(process, eps, 0.5, y, x_t, 0, levels=17, cdf=cdf, data_affine=affine)
        total = float(torch.exp2(-nll).sum())
        assert total == pytest.approx(1.0, abs=1e-12 if cdf == "exact" else 2e-3)
