"""DiscreteVPSDE: a DDPM beta table as a continuous-time SDE (tables, continuity, the index/time
map, the exact ODE likelihood of a Gaussian, the DDPM ancestral step, the score adapter)."""

from __future__ import annotations

import math

import ml_collections
import pytest
import torch

import likelihood
import sde_lib
from models.utils import get_score_fn
from samplers.pc import PREDICTORS
from score_sde import oracle
from score_sde.training.sampling import get_sde, sampling_eps

TABLES = {
    "linear": lambda: sde_lib.DiscreteVPSDE(),
    "scaled_linear": lambda: sde_lib.DiscreteVPSDE(schedule="scaled_linear", beta_start=8.5e-4,
                                                   beta_end=0.012),
    "cosine": lambda: sde_lib.DiscreteVPSDE(schedule="squaredcos_cap_v2"),
    "given": lambda: sde_lib.DiscreteVPSDE(torch.linspace(1e-3, 0.2, 37, dtype=torch.float64)),
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_alpha_bar_at_the_table_times_is_the_cumulative_product(name):
    sde = TABLES[name]()
    n = torch.arange(sde.N, dtype=torch.float64)
    t = sde.index_to_time(n)
    m, s = sde.marginal_coeffs(t)
    alpha_bar = torch.cumprod(1 - sde.discrete_betas, 0)
    assert (m**2 - alpha_bar).abs().max() < 1e-12
    assert (s**2 - (1 - alpha_bar)).abs().max() < 1e-12
    assert torch.allclose(sde.time_to_index(t), n, rtol=0, atol=1e-9)
    assert sde.marginal_coeffs(torch.zeros(1, dtype=torch.float64))[0].item() == 1.0


@pytest.mark.parametrize("name", sorted(TABLES))
def test_sigma_and_beta_are_continuous_and_monotone(name):
    sde = TABLES[name]()
    t = torch.linspace(0, 1, 20 * sde.N + 1, dtype=torch.float64)
    s = sde.marginal_std(t)
    assert bool((s.diff() > 0).all())  # strictly increasing
    beta = sde._beta(t)
    assert bool((beta > 0).all())
    # no jump at the knots: the values just left and right of every t_k agree
    knots = torch.arange(1, sde.N, dtype=torch.float64) / sde.N
    for f in (sde.marginal_std, sde._beta):
        left, right = f(knots - 1e-12), f(knots + 1e-12)
        assert (left - right).abs().max() < 1e-8 * f(knots).abs().max()
    # beta is the derivative of -log alpha_bar (the SDE's drift matches its marginals)
    h = 1e-6
    t_in = torch.linspace(0.01, 0.99, 97, dtype=torch.float64)
    log_m2 = lambda u: 2 * torch.log(sde.marginal_mean_coeff(u))  # noqa: E731
    numeric = -(log_m2(t_in + h) - log_m2(t_in - h)) / (2 * h)
    torch.testing.assert_close(numeric, sde._beta(t_in), rtol=1e-5, atol=0)


def test_dit_table_differs_from_the_continuous_vp():
    """The issue's numbers: log alpha_bar(1) = -10.118 for the table, -10.050 for VPSDE(0.1, 20)."""
    one = torch.ones(1, dtype=torch.float64)
    table = 2 * torch.log(sde_lib.DiscreteVPSDE().marginal_mean_coeff(one))
    continuous = 2 * torch.log(sde_lib.VPSDE(0.1, 20.0, 1000).marginal_mean_coeff(one))
    assert table.item() == pytest.approx(-10.1177, abs=1e-4)
    assert continuous.item() == pytest.approx(-10.050, abs=1e-3)


def test_log_snr_inverse_round_trips():
    sde = sde_lib.DiscreteVPSDE()
    t = torch.linspace(0, 1, 5001, dtype=torch.float64)[1:]
    assert (sde.log_snr_inverse(sde.log_snr(t)) - t).abs().max() < 1e-12


def test_beta_tables_and_their_errors():
    lin = sde_lib.beta_table("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    sl = sde_lib.beta_table("scaled_linear", 10, 1e-4, 1e-2)
    torch.testing.assert_close(sl.sqrt(), torch.linspace(1e-2, 1e-1, 10, dtype=torch.float64))
    cos = sde_lib.beta_table("cosine", 1000)
    assert cos.max().item() == pytest.approx(0.999) and bool((cos.diff() >= 0).all())
    with pytest.raises(ValueError, match="Unknown beta schedule 'quadratic'; valid: linear"):
        sde_lib.beta_table("quadratic", 10)
    with pytest.raises(ValueError, match="betas must lie in"):
        sde_lib.DiscreteVPSDE(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        sde_lib.DiscreteVPSDE(beta_start=0.1, beta_end=0.01)


@pytest.mark.parametrize("name", ["linear", "given"])
def test_ode_likelihood_of_a_gaussian_is_the_closed_form(name):
    """The probability-flow ODE under the interpolated schedule transports p_eps to p_T exactly:
    log p_eps(x) = log p_T(z) + delta, within the solver's tolerance (a wrong beta(t), e.g. the
    slope of log m instead of log alpha_bar, is off by O(1) nats)."""
    sde = TABLES[name]()
    gauss = oracle.GaussianMixture(torch.ones(1), torch.full((1, 3), 0.2), 0.3)
    eps = 1.0 / sde.N
    x = gauss.sample_marginal(6, sde, eps, generator=torch.Generator().manual_seed(0)).double()
    _, info = likelihood.log_likelihood(sde, gauss.score_fn(sde), x, divergence="exact",
                                        rtol=1e-6, atol=1e-6, eps=eps)
    ode = gauss.log_prob(info["z"], sde.T, sde) + info["delta_logp"].double()
    exact = gauss.log_prob(x, eps, sde)
    assert ((ode - exact).abs() / 3).max() < 2e-4
    assert info["nfe"] < 400  # no step-size collapse at the table's knots


def test_pc_ancestral_on_the_table_grid_is_the_ddpm_step():
    """On the grid t_n = (n + 1)/N (PC's N-step grid from 1 to eps = 1/N) the ancestral predictor
    is Ho et al. 2020's step: mean (x - beta_n / sqrt(1 - abar_n) eps) / sqrt(alpha_n),
    variance beta~_n = beta_n (1 - abar_{n-1}) / (1 - abar_n)."""
    sde = sde_lib.DiscreteVPSDE()
    n = torch.arange(1, sde.N, dtype=torch.float64)
    t, t_next = sde.index_to_time(n), sde.index_to_time(n - 1)
    a, b, c = PREDICTORS.get("ancestral_sampling")(sde).coefficients(t, t_next)
    beta, abar = sde.discrete_betas[1:], sde.alphas_cumprod
    s_t = torch.sqrt(1 - abar[1:])
    # x_s = a x + b score with score = -eps / s_t: the eps coefficient is -b / s_t
    torch.testing.assert_close(a, 1 / torch.sqrt(1 - beta), rtol=1e-12, atol=0)
    torch.testing.assert_close(b / s_t, beta / s_t / torch.sqrt(1 - beta), rtol=1e-9, atol=0)
    torch.testing.assert_close(c**2, beta * (1 - abar[:-1]) / (1 - abar[1:]), rtol=1e-9, atol=0)


class _Recorder(torch.nn.Module):
    """A 'network' returning fixed eps (and v) halves and recording its time input."""

    def __init__(self, learn_sigma: bool) -> None:
        super().__init__()
        self.learn_sigma = learn_sigma
        self.seen = None

    def forward(self, x, labels, class_labels=None):
        self.seen = labels
        eps = torch.sin(x)
        return torch.cat([eps, torch.cos(x)], dim=1) if self.learn_sigma else eps


def test_the_adapter_feeds_the_original_index_and_splits_learned_variances():
    sde = sde_lib.DiscreteVPSDE()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = sde.index_to_time(torch.tensor([0.0, 499.5, 999.0], dtype=torch.float64))
    for learn_sigma in (False, True):
        net = _Recorder(learn_sigma)
        score_fn = get_score_fn(sde, net, continuous=False)
        score = score_fn(x, t)
        torch.testing.assert_close(net.seen, torch.tensor([0.0, 499.5, 999.0],
                                                          dtype=torch.float64))
        std = sde.marginal_std(t)[:, None, None, None]
        torch.testing.assert_close(score, -torch.sin(x) / std)
        eps, v = score_fn.eps_and_v(x, t)
        torch.testing.assert_close(eps, torch.sin(x))
        assert (v is None) if not learn_sigma else torch.equal(v, torch.cos(x))
    with pytest.raises(ValueError, match="needs a discrete VP SDE"):
        get_score_fn(sde_lib.VPSDE(), _Recorder(True), continuous=True)


def test_config_builds_the_table_and_samples_down_to_its_first_step():
    config = ml_collections.ConfigDict({
        "training": {"sde": "discrete_vpsde"},
        "model": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                  "num_scales": 1000}})
    sde = get_sde(config)
    assert isinstance(sde, sde_lib.DiscreteVPSDE) and sde.schedule == "scaled_linear"
    assert sde.discrete_betas[-1].item() == pytest.approx(0.012)
    assert sampling_eps(config) == pytest.approx(1e-3)
    assert sde.time_to_index(torch.tensor(sampling_eps(config))).item() == pytest.approx(0.0,
                                                                                       abs=1e-6)
    assert math.isclose(sde.index_to_time(999).item(), 1.0)
