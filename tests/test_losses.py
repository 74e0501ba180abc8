"""Losses against the reference fixture, closed forms on Gaussian data, and the step function."""

from __future__ import annotations

import math

import ml_collections
import pytest
import torch
from scipy import integrate
from torch import nn

import sde_lib
from models.ema import ExponentialMovingAverage
from models.utils import get_score_fn
from score_sde import losses
from score_sde.oracle import GaussianMixture

REFERENCE_SDES = {"VPSDE": sde_lib.VPSDE, "subVPSDE": sde_lib.subVPSDE, "VESDE": sde_lib.VESDE}
ALL_SDES = [sde_lib.get_sde(name) for name in sde_lib.SDES.names()]  # every registered SDE
SDE_IDS = [type(s).__name__ for s in ALL_SDES]


class ToyModel(nn.Module):
    """The fixture's closed-form model: out = 0.5 tanh(x) + 1e-3 float(labels)."""

    def forward(self, x, labels):
        return 0.5 * torch.tanh(x) + 1e-3 * labels.float()[:, None, None, None]


def _case_id(case):
    flags = [f"mean={case['reduce_mean']}"]
    if "likelihood_weighting" in case:
        flags.append(f"lik={case['likelihood_weighting']}")
    return f"{case['fn']}-{case['sde']}-{'-'.join(flags)}"


@pytest.fixture(scope="module")
def loss_fixture(sde_values):
    data = sde_values["losses"]
    assert len(data["cases"]) == 16
    return data


def _recompute(case, batch):
    """The fixture loss from its stored draws, through our score/model adapters."""
    sde = REFERENCE_SDES[case["sde"]]()
    model = ToyModel()
    if case["fn"] == "get_sde_loss_fn":
        score_fn = get_score_fn(sde, model, train=case["train"], continuous=case["continuous"])
        per_sample = losses.dsm_loss(score_fn, sde, batch, torch.tensor(case["t"]),
                                     torch.tensor(case["z"]), case["reduce_mean"],
                                     case["likelihood_weighting"])
        wrapper = losses.get_sde_loss_fn(sde, case["train"], case["reduce_mean"], True,
                                         case["likelihood_weighting"], eps=case["eps"])
    elif case["fn"] == "get_smld_loss_fn":
        # The fixture stores z with noise = z * flip(discrete_sigmas)[labels].
        per_sample = losses.smld_loss(model, sde, batch, torch.tensor(case["labels"]),
                                      torch.tensor(case["z"]), case["reduce_mean"])
        wrapper = losses.get_smld_loss_fn(sde, case["train"], case["reduce_mean"])
    else:
        per_sample = losses.ddpm_loss(model, sde, batch, torch.tensor(case["labels"]),
                                      torch.tensor(case["noise"]), case["reduce_mean"])
        wrapper = losses.get_ddpm_loss_fn(sde, case["train"], case["reduce_mean"])
    return per_sample, wrapper, model


@pytest.mark.parametrize("index", range(16))  # the fixture's 16 cases
def test_reference_losses_from_stored_draws(loss_fixture, index):
    case = loss_fixture["cases"][index]
    batch = torch.tensor(loss_fixture["batch"], dtype=torch.float32)
    per_sample, wrapper, model = _recompute(case, batch)
    assert per_sample.shape == (batch.shape[0],)
    ref = case["loss"]
    assert abs(per_sample.mean().item() - ref) <= 1e-5 * abs(ref), _case_id(case)
    # The CPU generator seeded like the reference's global RNG replays its draws in its order
    # (t then z; labels then z), so the wrapper reproduces the loss end to end.
    loss = wrapper(model, batch, generator=torch.Generator().manual_seed(case["seed"]))
    assert abs(loss.item() - ref) <= 1e-5 * abs(ref), _case_id(case)


def _tiny_vector_model(dim=4, seed=0):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(dim + 1, dim)

        def forward(self, x, labels):
            flat = x.reshape(x.shape[0], -1)
            h = torch.cat([flat, labels.float()[:, None] / 1000.0], dim=1)
            return torch.tanh(self.lin(h)).reshape(x.shape)

    torch.manual_seed(seed)
    return Tiny()


@pytest.mark.parametrize("make_loss", [
    lambda: losses.get_sde_loss_fn(sde_lib.VPSDE(), True),
    lambda: losses.get_sde_loss_fn(sde_lib.subVPSDE(), True, likelihood_weighting=True,
                                   importance_weighting=True),
    lambda: losses.get_ssm_loss_fn(sde_lib.VESDE(), True, num_probes=2),
    lambda: losses.get_smld_loss_fn(sde_lib.VESDE(), True),
    lambda: losses.get_ddpm_loss_fn(sde_lib.VPSDE(), True),
], ids=["dsm", "dsm_importance", "ssm", "smld", "ddpm"])
def test_same_seed_gives_bitwise_equal_losses(make_loss):
    loss_fn, model = make_loss(), _tiny_vector_model()
    batch = torch.rand(8, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a = loss_fn(model, batch, generator=torch.Generator().manual_seed(7))
    b = loss_fn(model, batch, generator=torch.Generator().manual_seed(7))
    c = loss_fn(model, batch, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -- closed forms on Gaussian data ---------------------------------------------------------------
# Data N(mu, sigma0^2 I) in D dims: at time t the marginal is N(m mu, v I), v = m^2 sigma0^2 + s^2,
# and a score c * (exact score) gives, per dim, E|s score + z|^2 = c^2 s^2 a / v^2 + (1 - c s^2/v)^2
# with a = m^2 sigma0^2 (c = 1: 1 - s^2 / v).

SIGMA0 = 0.5
MU = [0.3, -0.2, 0.1, 0.5]
D = len(MU)
GAUSSIAN = GaussianMixture([1.0], [MU], SIGMA0)


def _per_dim_residual(sde, t, c=1.0):
    m, s = sde.marginal_coeffs(torch.tensor(t, dtype=torch.float64))
    a = m**2 * SIGMA0**2
    v = a + s**2
    return float(c**2 * s**2 * a / v**2 + (1 - c * s**2 / v) ** 2)


def _gaussian_draws(n, t, seed, shape=(D,)):
    g = torch.Generator().manual_seed(seed)
    x0 = GAUSSIAN.sample(n, generator=g, dtype=torch.float64).reshape(n, *shape)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, torch.full((n,), t, dtype=torch.float64), z


def _mean_se(values):
    return values.mean().item(), values.std().item() / math.sqrt(values.numel())


@pytest.mark.parametrize("sde", ALL_SDES, ids=SDE_IDS)
@pytest.mark.parametrize("t", [0.05, 0.4, 0.9])
@pytest.mark.parametrize("reduce_mean", [False, True])
@pytest.mark.parametrize("likelihood_weighting", [False, True])
def test_dsm_of_exact_score_equals_closed_form(sde, t, reduce_mean, likelihood_weighting):
    n = 20_000
    x0, tt, z = _gaussian_draws(n, t, seed=11, shape=(1, 2, 2))  # images (B, 1, 2, 2)
    values = losses.dsm_loss(GAUSSIAN.score_fn(sde), sde, x0, tt, z, reduce_mean,
                             likelihood_weighting)
    # lambda = s^2: (D/2)(1 - s^2/v) as a half-sum, (1 - s^2/v) as a mean over dims;
    # likelihood weighting multiplies by g^2 / s^2.
    expected = _per_dim_residual(sde, t) * (1.0 if reduce_mean else D / 2)
    if likelihood_weighting:
        _, diffusion = sde.sde(x0[:1], tt[:1])
        expected *= float(diffusion[0] ** 2 / sde.marginal_std(tt[:1])[0] ** 2)
    mean, se = _mean_se(values)
    assert abs(mean - expected) < 4 * se
    for wrong in (2 * expected, expected / 2):  # a factor-2 error would fail
        assert abs(mean - wrong) > 4 * se


@pytest.mark.parametrize("sde", ALL_SDES, ids=SDE_IDS)
@pytest.mark.parametrize("perturb", [lambda s: 1.1 * s, lambda s: s + 0.1, lambda s: 0.9 * s],
                         ids=["x1.1", "+0.1", "x0.9"])
def test_dsm_of_exact_score_is_below_perturbed_scores(sde, perturb):
    n = 20_000
    exact = GAUSSIAN.score_fn(sde)
    # Where noise and data are comparable, s^2 = m^2 sigma0^2 and s^2 = 4 m^2 sigma0^2: with a small
    # s the lambda = s^2 weight hides score errors, with a large one the data hardly matters.
    for log_snr in (math.log(1 / SIGMA0**2), math.log(1 / (4 * SIGMA0**2))):
        t = float(sde.log_snr_inverse(torch.tensor(log_snr, dtype=torch.float64)))
        x0, tt, z = _gaussian_draws(n, t, seed=12)
        base = losses.dsm_loss(exact, sde, x0, tt, z, False)
        worse = losses.dsm_loss(lambda x, s: perturb(exact(x, s)), sde, x0, tt, z, False)
        gap, se = _mean_se(worse - base)  # common random numbers: paired differences
        assert gap > 4 * se > 0


def _expected_likelihood_loss(sde, eps, c):
    """(1 / (T - eps)) int_eps^T g^2 / s^2 (D / 2) h_c(t) dt by adaptive quadrature."""

    def integrand(t):
        tt = torch.tensor([t], dtype=torch.float64)
        _, diffusion = sde.sde(torch.zeros(1, 1, dtype=torch.float64), tt)
        ratio = float(diffusion[0] ** 2 / sde.marginal_std(tt)[0] ** 2)
        return ratio * D / 2 * _per_dim_residual(sde, t, c)

    # g^2 / s^2 ~ 1 / t near 0: split the range geometrically for the quadrature.
    edges = [eps, 1e-2, 1e-1, 0.5, sde.T]
    total = sum(integrate.quad(integrand, lo, hi, limit=200)[0] for lo, hi in zip(edges, edges[1:]))
    return total / (sde.T - eps)


@pytest.mark.parametrize("sde", [sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.CosineVPSDE()],
                         ids=["VPSDE", "subVPSDE", "CosineVPSDE"])
def test_importance_sampling_is_unbiased_with_lower_variance(sde):
    n, eps, c = 100_000, 1e-3, 1.1
    score_fn = (lambda exact: lambda x, t: c * exact(x, t))(GAUSSIAN.score_fn(sde))
    g = torch.Generator().manual_seed(21)
    x0 = GAUSSIAN.sample(n, generator=g, dtype=torch.float64)
    results = {}
    for importance in (False, True):
        draw = losses.sample_importance_time if importance else losses.sample_time
        t = draw(x0, sde, eps, g)
        z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        values = losses.dsm_loss(score_fn, sde, x0, t, z, False, True, importance, eps)
        results[importance] = (*_mean_se(values), values.var().item())
    (m_u, se_u, var_u), (m_i, se_i, var_i) = results[False], results[True]
    exact = _expected_likelihood_loss(sde, eps, c)
    assert abs(m_u - m_i) < 4 * math.hypot(se_u, se_i)
    assert abs(m_i - exact) < 4 * se_i
    assert abs(m_u - exact) < 4 * se_u
    assert abs(2 * m_i - exact) > 4 * se_i  # the estimate pins the scale
    assert var_i < var_u / 4


@pytest.mark.parametrize("sde", ALL_SDES, ids=SDE_IDS)
def test_importance_density_is_likelihood_weight_over_variance(sde):
    """g^2 / s^2 = -d lambda / dt (what the closed-form inverse CDF uses), and the drawn times
    follow the CDF of g^2 / s^2 integrated numerically from drift and diffusion."""
    eps = 1e-3
    # Geometric towards both ends: g^2 / s^2 ~ 1 / t near 0 for the VP family, and the cosine
    # schedule's beta(t) spikes (to its clip, ~7e3) in the last 3e-4 before T.
    u = torch.linspace(0, 1, 4001, dtype=torch.float64)
    t = torch.cat([eps * (0.5 / eps) ** u, sde.T - (sde.T - 0.5) * (1e-7 / 0.5) ** u[1:],
                   torch.tensor([sde.T], dtype=torch.float64)])
    t.requires_grad_(True)
    (dlam,) = torch.autograd.grad(sde.log_snr(t).sum(), t)
    t = t.detach()
    _, diffusion = sde.sde(torch.zeros(t.shape[0], 1, dtype=torch.float64), t)
    density = diffusion**2 / sde.marginal_std(t) ** 2
    torch.testing.assert_close(-dlam, density, rtol=1e-6, atol=0)
    cdf = torch.cat([t.new_zeros(1), torch.cumsum((density[1:] + density[:-1]) / 2 * t.diff(), 0)])
    cdf = cdf / cdf[-1]
    n = 40_000
    draws = losses.sample_importance_time(torch.zeros(n, 1, dtype=torch.float64), sde, eps,
                                          torch.Generator().manual_seed(5))
    assert draws.min() >= eps and draws.max() <= sde.T
    empirical = torch.searchsorted(torch.sort(draws).values, t).double() / n
    # Kolmogorov-Smirnov: sup|F_n - F| < 1.63 / sqrt(n) at the 1% level.
    assert (empirical - cdf).abs().max() < 1.63 / math.sqrt(n)
    # DiscreteVPSDE's beta(t) jumps at each of its N table times, where the trapezoid is off
    rel = 1e-4 if isinstance(sde, sde_lib.DiscreteVPSDE) else 1e-5
    assert losses.likelihood_normalizer(sde, eps) == pytest.approx(
        float(torch.trapezoid(density, t)), rel=rel)


@pytest.mark.parametrize("objective", ["dsm", "ssm"])
def test_importance_weight_is_the_density_ratio(objective):
    """On the same draws, importance-weighted / likelihood-weighted per-sample losses equal
    p_uniform(t) / p_importance(t) = s^2 Z / ((T - eps) g^2)."""
    sde, eps = sde_lib.subVPSDE(), 1e-3
    x0, _, z = _gaussian_draws(64, 0.0, seed=41)
    t = torch.linspace(eps, 1.0, 64, dtype=torch.float64)
    v = torch.randn((1, *x0.shape), generator=torch.Generator().manual_seed(42),
                    dtype=torch.float64)

    def run(importance):
        if objective == "dsm":
            return losses.dsm_loss(_nonlinear_score, sde, x0, t, z, True, True, importance, eps)
        return losses.ssm_loss(_nonlinear_score, sde, x0, t, z, v, True, True, importance, eps,
                               create_graph=False)

    g2 = sde.sde(x0, t)[1] ** 2
    ratio = sde.marginal_std(t) ** 2 * losses.likelihood_normalizer(sde, eps) / ((1 - eps) * g2)
    torch.testing.assert_close(run(True), run(False) * ratio, rtol=1e-9, atol=1e-12)


# -- sliced score matching -----------------------------------------------------------------------

def _nonlinear_score(x, t):
    return -1.3 * x + 0.4 * torch.tanh(2 * x) * (1 + t.reshape(-1, *[1] * (x.dim() - 1)))


@pytest.mark.parametrize("sde", [sde_lib.VPSDE(), sde_lib.VESDE()], ids=["VPSDE", "VESDE"])
@pytest.mark.parametrize("likelihood_weighting", [False, True])
def test_ssm_is_dsm_minus_a_model_free_constant(sde, likelihood_weighting):
    """E[DSM] - E[SSM] = lambda(t) D / (2 s^2) for any score (Song et al. 2019, Thm. 1 and
    Vincent 2011): D / 2 with lambda = s^2; tested for a nonlinear score and for the exact one."""
    n, t = 20_000, 0.3
    x0, tt, z = _gaussian_draws(n, t, seed=31)
    v = torch.randn((2, *x0.shape), generator=torch.Generator().manual_seed(32),
                    dtype=torch.float64)
    std = float(sde.marginal_std(tt[:1])[0])
    lam = float(sde.sde(x0[:1], tt[:1])[1][0] ** 2) if likelihood_weighting else std**2
    constant = lam * D / (2 * std**2)
    dsm = losses.dsm_loss(_nonlinear_score, sde, x0, tt, z, False, likelihood_weighting)
    ssm = losses.ssm_loss(_nonlinear_score, sde, x0, tt, z, v, False, likelihood_weighting,
                          create_graph=False)
    gap, se = _mean_se(dsm - ssm)
    assert abs(gap - constant) < 4 * se
    assert abs(gap - 2 * constant) > 4 * se and abs(gap - constant / 2) > 4 * se
    # The exact score: E[SSM] = -lambda D / (2 v) per sample.
    ssm_exact = losses.ssm_loss(GAUSSIAN.score_fn(sde), sde, x0, tt, z, v, True,
                                likelihood_weighting, create_graph=False)
    mean, se = _mean_se(ssm_exact)
    m = float(sde.marginal_mean_coeff(tt[:1])[0])
    expected = -lam * D / (2 * (m**2 * SIGMA0**2 + std**2)) * 2 / D  # reduce_mean: 2/D scale
    assert abs(mean - expected) < 4 * se
    assert abs(mean - 2 * expected) > 4 * se


def test_ssm_loss_fn_trains_and_evaluates_under_no_grad():
    sde = sde_lib.VPSDE()
    model = _tiny_vector_model()
    batch = torch.rand(8, 4, generator=torch.Generator().manual_seed(3))
    loss = losses.get_ssm_loss_fn(sde, True)(model, batch, generator=torch.Generator())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        value = losses.get_ssm_loss_fn(sde, False)(model, batch, generator=torch.Generator())
    assert torch.isfinite(value) and not value.requires_grad


# -- validation, optimiser and step function -----------------------------------------------------

def test_bad_arguments_raise_named_errors():
    with pytest.raises(ValueError, match="eps"):
        losses.get_sde_loss_fn(sde_lib.VPSDE(), True, eps=0.0)
    with pytest.raises(ValueError, match="likelihood_weighting"):
        losses.get_sde_loss_fn(sde_lib.VPSDE(), True, importance_weighting=True)
    with pytest.raises(ValueError, match="num_probes"):
        losses.get_ssm_loss_fn(sde_lib.VPSDE(), True, num_probes=0)
    with pytest.raises(ValueError, match="SMLD"):
        losses.get_smld_loss_fn(sde_lib.VPSDE(), True)
    with pytest.raises(ValueError, match="DDPM"):
        losses.get_ddpm_loss_fn(sde_lib.VESDE(), True)
    with pytest.raises(ValueError, match="ve_discrete, vp_discrete"):
        losses.get_step_fn(sde_lib.subVPSDE(), False, continuous=False)
    with pytest.raises(ValueError, match="discrete"):
        losses.get_step_fn(sde_lib.VPSDE(), False, continuous=False, likelihood_weighting=True)
    with pytest.raises(ValueError, match="optimize_fn"):
        losses.get_step_fn(sde_lib.VPSDE(), True)
    model = _tiny_vector_model()
    for make in (lambda: losses.get_sde_loss_fn(sde_lib.VPSDE(), True),
                 lambda: losses.get_ssm_loss_fn(sde_lib.VPSDE(), True),
                 lambda: losses.get_ddpm_loss_fn(sde_lib.VPSDE(), True)):
        with pytest.raises(ValueError, match=r"floating-point .* torch.uint8 of shape \(8, 4\)"):
            make()(model, torch.zeros(8, 4, dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"got torch.float32 of shape \(8,\)"):
            make()(model, torch.zeros(8))


def _config(warmup=10, grad_clip=1.0, optimizer="Adam"):
    config = ml_collections.ConfigDict()
    config.optim = ml_collections.ConfigDict(dict(
        optimizer=optimizer, lr=2e-4, beta1=0.9, eps=1e-8, weight_decay=0.0, warmup=warmup,
        grad_clip=grad_clip))
    return config


def test_get_optimizer_and_unknown_name():
    model = _tiny_vector_model()
    opt = losses.get_optimizer(_config(), model.parameters())
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match="Unknown optimizer 'SGDX'; valid: Adam"):
        losses.get_optimizer(_config(optimizer="SGDX"), model.parameters())
    assert opt.param_groups[0]["amsgrad"] is False
    config = _config()
    config.optim.amsgrad = True  # NCSNv2's configs carry the key
    assert losses.get_optimizer(config, model.parameters()).param_groups[0]["amsgrad"] is True


def test_optimize_fn_warms_up_and_clips():
    model = _tiny_vector_model()
    config = _config(warmup=10, grad_clip=1e-3)
    opt = losses.get_optimizer(config, model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, 5.0)
    losses.optimization_manager(config)(opt, model.parameters(), step=3)
    lr = opt.param_groups[0]["lr"]
    assert type(lr) is float and lr == pytest.approx(2e-4 * 3 / 10)  # weights_only-safe float
    total = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
    assert total == pytest.approx(1e-3, rel=1e-4)


def test_step_fn_trains_and_evaluates_with_ema():
    sde = sde_lib.VPSDE()
    model = _tiny_vector_model()
    config = _config(warmup=0, grad_clip=-1)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.999)
    state = dict(model=model, optimizer=losses.get_optimizer(config, model.parameters()),
                 ema=ema, step=0)
    batch = torch.rand(8, 4, generator=torch.Generator().manual_seed(3))
    train_step = losses.get_step_fn(sde, True, losses.optimization_manager(config))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        loss = train_step(state, batch, generator=torch.Generator().manual_seed(1))
    assert state["step"] == 2 and ema.num_updates == 2 and not loss.requires_grad
    after = [p.detach().clone() for p in model.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(after, before))
    shadow = [p.clone() for p in ema.shadow_params]
    assert all(not torch.equal(s, a) for s, a in zip(shadow, after))
    # Evaluation uses the EMA weights and restores the trained ones.
    eval_step = losses.get_step_fn(sde, False, reduce_mean=False)
    value = eval_step(state, batch, generator=torch.Generator().manual_seed(2))
    for p, a in zip(model.parameters(), after):
        assert torch.equal(p, a)
    with torch.no_grad():
        for p, s in zip(model.parameters(), shadow):
            p.copy_(s)
    direct = losses.get_sde_loss_fn(sde, False, reduce_mean=False)(
        model, batch, generator=torch.Generator().manual_seed(2))
    assert torch.equal(value, direct)


@pytest.mark.parametrize("sde, factory", [(sde_lib.VESDE(), losses.get_smld_loss_fn),
                                          (sde_lib.VPSDE(), losses.get_ddpm_loss_fn)],
                         ids=["smld", "ddpm"])
def test_discrete_step_fn_uses_the_sde_convention(sde, factory):
    model = _tiny_vector_model()
    batch = torch.rand(8, 4, generator=torch.Generator().manual_seed(3))
    step = losses.get_step_fn(sde, False, reduce_mean=True, continuous=False)
    value = step(dict(model=model, step=0), batch, generator=torch.Generator().manual_seed(4))
    direct = factory(sde, False, reduce_mean=True)(model, batch,
                                                   generator=torch.Generator().manual_seed(4))
    assert torch.equal(value, direct)


def test_resume_keeps_the_optimizer_fused_choice_and_amsgrad_is_checked():
    """A state written by an unfused Adam (e.g. the reference's) must not switch fusion off."""
    model = _tiny_vector_model()
    opt = losses.get_optimizer(_config(), model.parameters())
    plain = torch.optim.Adam(_tiny_vector_model().parameters(), lr=2e-4)
    for p in plain.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    plain.step()
    fused = opt.param_groups[0]["fused"]  # True where the build has the kernel (torch >= 2.4)
    assert plain.state_dict()["param_groups"][0]["fused"] is None
    losses.load_optimizer_state(opt, plain.state_dict())
    assert opt.param_groups[0]["fused"] == fused
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the loaded state works with the live settings
    assert int(opt.state[opt.param_groups[0]["params"][0]]["step"]) == 2
    config = _config()
    config.optim.amsgrad = "False"
    with pytest.raises(ValueError, match="optim.amsgrad must be a bool, got 'False'"):
        losses.get_optimizer(config, model.parameters())
