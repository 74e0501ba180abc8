"""likelihood / divergence: log p_eps against the oracle's closed form, estimator statistics,
bits/dim against exact discretised-Gaussian probabilities, the reference fixture, determinism."""

from __future__ import annotations

import json
import math

import pytest
import torch

import likelihood
import sde_lib
from score_sde import oracle
from score_sde.divergence import DIVERGENCES

EPS = 1e-5
SDES = {
    "vp": lambda: sde_lib.VPSDE(0.1, 20.0, 1000),
    "subvp": lambda: sde_lib.subVPSDE(0.1, 20.0, 1000),
    "ve": lambda: sde_lib.VESDE(0.01, 50.0, 1000),
}
CENTRED = lambda y: (y + 1.0) / 2.0  # noqa: E731  the reference's inverse scaler, centred data
UNCENTRED = lambda y: y  # noqa: E731
# K used in the registry-wide contract tests (hutchpp needs K >= 6; exact takes no probes).
PROBES = {"exact": 1, "hutchpp": 12}


def _problem(kind: str, sde, n: int, seed: int = 1):
    mix = oracle.GaussianMixture.ring() if kind == "ring" else oracle.GaussianMixture.random(
        100, 4, seed=0)
    x = mix.sample_marginal(n, sde, EPS, generator=torch.Generator().manual_seed(seed))
    return mix, x, mix.log_prob(x.double(), EPS, sde)


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("kind,n", [("ring", 64), ("mix100", 6)])
def test_exact_trace_matches_oracle(kind, n, sde_name):
    sde = SDES[sde_name]()
    mix, x, ref = _problem(kind, sde, n)
    D = mix.dim
    logp, info = likelihood.log_likelihood(sde, mix.score_fn(sde), x, divergence="exact",
                                           rtol=1e-5, atol=1e-5)
    assert logp.shape == (n,) and info["nfe"] > 0
    assert torch.equal(info["stderr"], torch.zeros(n))
    torch.testing.assert_close(logp, info["prior_logp"] + info["delta_logp"])
    # The ODE part alone: with the exact p_T at z, eq. 40 gives log p_eps exactly.
    ode = mix.log_prob(info["z"].double(), sde.T, sde) + info["delta_logp"].double()
    assert ((ode - ref).abs() / D).max() < 1e-3
    # The reported value is that of the model whose p_T is the prior: it differs from log p_eps
    # by log prior(z) - log p_T(z), the SDE's own truncation error (VE's sigma_max = 50 does not
    # wash out the ring: 1.6e-3 nats/dim; VP, 100-D: up to 7e-4), not the solver's.
    assert ((logp.double() - ref + _prior_mismatch(sde, mix, info["z"])).abs() / D).max() < 1e-3


@pytest.fixture(scope="module")
def mix100_vp():
    sde = SDES["vp"]()
    mix, x, ref = _problem("mix100", sde, 128)
    return sde, mix, x, ref


# "exact" (128 samples x 100 backward passes per evaluation) under slow: the exact trace in 100-D
# is held to the same 1e-3 nats/dim in test_exact_trace_matches_oracle[mix100-*].
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if DIVERGENCES.get(n).exact else n
    for n in DIVERGENCES.names()])
def test_estimators_unbiased_with_calibrated_stderr(name, mix100_vp):
    sde, mix, x, ref = mix100_vp
    K = PROBES.get(name, 8)
    logp, info = likelihood.log_likelihood(sde, mix.score_fn(sde), x, divergence=name,
                                           num_probes=K, rtol=1e-5, atol=1e-5,
                                           generator=torch.Generator().manual_seed(3))
    err = logp.double() - ref  # solver error here is ~0.03 nats, far below the MC error
    if DIVERGENCES.get(name).exact:
        assert torch.equal(info["stderr"], torch.zeros_like(logp))
        err = err + _prior_mismatch(sde, mix, info["z"])  # (up to 7e-4 nats/dim here)
        assert (err.abs() / mix.dim).max() < 1e-3
        return
    se_mean = err.std() / math.sqrt(len(err))
    assert err.mean().abs() < 4 * se_mean, (err.mean(), se_mean)
    # stderr^2 is an unbiased estimate of the error variance: E[err^2] = E[stderr^2].
    ratio = err.pow(2).mean() / info["stderr"].double().pow(2).mean()
    assert 0.6 < ratio < 1.6, ratio


def test_hutchinson_spread_falls_as_inverse_sqrt_k(mix100_vp):
    sde, mix, x, ref = mix100_vp
    rms = {}
    for K in (1, 16):
        logp, _ = likelihood.log_likelihood(sde, mix.score_fn(sde), x, divergence="rademacher",
                                            num_probes=K, rtol=1e-5, atol=1e-5,
                                            generator=torch.Generator().manual_seed(K))
        err = logp.double() - ref
        assert err.mean().abs() < 4 * err.std() / math.sqrt(len(err))
        rms[K] = err.pow(2).mean().sqrt()
    assert 3.0 < rms[1] / rms[16] < 5.3, rms  # sqrt(16) = 4


def test_hutchpp_beats_rademacher_at_equal_cost(mix100_vp):
    sde, mix, x, ref = mix100_vp
    rms = {}
    for name in ("rademacher", "hutchpp"):
        logp, _ = likelihood.log_likelihood(sde, mix.score_fn(sde), x, divergence=name,
                                            num_probes=12, rtol=1e-5, atol=1e-5,
                                            generator=torch.Generator().manual_seed(5))
        rms[name] = (logp.double() - ref).pow(2).mean().sqrt()
    assert rms["hutchpp"] < 0.7 * rms["rademacher"], rms


def test_antithetic_pair_is_exact_in_2d():
    sde = SDES["vp"]()
    mix, x, ref = _problem("ring", sde, 64)
    logp, info = likelihood.log_likelihood(sde, mix.score_fn(sde), x, divergence="rademacher",
                                           num_probes=2, antithetic=True,
                                           generator=torch.Generator().manual_seed(0))
    assert ((logp.double() - ref).abs() / 2).max() < 1e-3
    assert torch.isnan(info["stderr"]).all()  # one pair: no spread to estimate


def test_same_seed_same_bits():
    sde = SDES["subvp"]()
    mix, x, _ = _problem("mix100", sde, 8)

    def run(seed):
        return likelihood.log_likelihood(sde, mix.score_fn(sde), x, num_probes=4, rtol=1e-3,
                                         atol=1e-3, generator=torch.Generator().manual_seed(seed))

    (a, ia), (b, ib), (c, _) = run(7), run(7), run(8)
    assert torch.equal(a, b) and torch.equal(ia["z"], ib["z"]) and ia["nfe"] == ib["nfe"]
    assert torch.equal(ia["stderr"], ib["stderr"]) and not torch.equal(a, c)
    levels = torch.randint(0, 256, (3, 2, 2, 1), generator=torch.Generator().manual_seed(0))
    gauss = oracle.GaussianMixture(torch.ones(1), torch.zeros(1, 4), 0.3)

    def bpd(seed):
        return likelihood.bits_per_dim(sde, gauss.score_fn(sde), levels, CENTRED,
                                       num_dequant=2, generator=torch.Generator().manual_seed(seed),
                                       rtol=1e-3, atol=1e-3)[0]

    assert torch.equal(bpd(1), bpd(1))


# -- bits/dim ---------------------------------------------------------------------------------


def _discretised_gaussian(scaler, n_bits, n, D=6):
    """Model space N(mu, var) = p_eps of a one-component mixture; data levels k drawn from it."""
    a, c = 1.0 / (scaler(torch.tensor(1.0)) - scaler(torch.tensor(0.0))).item(), 0.0
    c = -a * scaler(torch.tensor(0.0)).item()
    width = 2.0**-n_bits  # one level in [0, 1]
    std01 = 3 * width if n_bits < 8 else 8 * width
    mu01 = 0.5 + 0.1 * torch.linspace(-1, 1, D, dtype=torch.float64)
    data_mix = oracle.GaussianMixture(torch.ones(1), (a * mu01 + c)[None], a * std01)
    g = torch.Generator().manual_seed(11)
    x01 = mu01 + std01 * torch.randn(n, D, generator=g, dtype=torch.float64)
    levels = (x01 * 2**n_bits).floor().clamp(0, 2**n_bits - 1).long()
    return data_mix, levels, a, c


@pytest.mark.parametrize("scaler_name,n_bits", [("centred", 8), ("uncentred", 8), ("centred", 5)])
def test_bits_per_dim_closed_form(scaler_name, n_bits):
    scaler = CENTRED if scaler_name == "centred" else UNCENTRED
    sde = SDES["vp"]()
    data_mix, levels, a, c = _discretised_gaussian(scaler, n_bits, 64)
    n, D = levels.shape
    m, s = sde.marginal_coeffs(torch.tensor(EPS, dtype=torch.float64))
    mean = m * data_mix.means[0]
    var = m**2 * data_mix.stds[0] ** 2 + s**2  # the model: p_eps in model space, per dimension
    kwargs = dict(divergence="exact", rtol=1e-7, atol=1e-7)
    score_fn = data_mix.score_fn(sde)
    data = levels.double() / (2**n_bits - 1)  # the ToTensor convention, float64 end to end
    # 1) One draw: the change of variables at the very points drawn (u ~ U[0,1) from the seed).
    bpd1, info = likelihood.bits_per_dim(sde, score_fn, data, scaler, n_bits=n_bits,
                                         generator=torch.Generator().manual_seed(2), **kwargs)
    u = torch.rand((1, n, D), generator=torch.Generator().manual_seed(2), dtype=torch.float64)[0]
    y = a * (levels + u) / 2**n_bits + c
    log_py = (-0.5 * (y - mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum(1)
    bpd_cf = -(log_py + D * math.log(a) - D * n_bits * math.log(2)) / (D * math.log(2))
    # The ODE model is p_eps times prior(z) / p_T(z) (the prior mismatch of the exact-trace test).
    mismatch1 = _prior_mismatch(sde, data_mix, info["z"][0]) / (D * math.log(2))
    assert (bpd1 - mismatch1 - bpd_cf).abs().max() < 1e-4
    # 2) The exact discrete probability: integrate the Gaussian over each bin.
    normal = torch.distributions.Normal(mean, var.sqrt())
    lo = a * levels / 2**n_bits + c
    hi = a * (levels + 1) / 2**n_bits + c
    log_pk = torch.log(normal.cdf(hi) - normal.cdf(lo)).sum(1)
    bpd_exact = -log_pk / (D * math.log(2))
    # Jensen: E_u[log p] <= log P(k); the mean gap of one draw has a closed form.
    yc = (lo + hi) / 2
    e_log_py = (-0.5 * ((yc - mean) ** 2 + (hi - lo) ** 2 / 12) / var
                - 0.5 * torch.log(2 * math.pi * var)).sum(1)
    width = a / 2**n_bits  # p_v(k + u) = p_y(y) * width^D
    gap1 = (log_pk - e_log_py - D * math.log(width)) / (D * math.log(2))  # E[bpd excess] >= 0
    diff1 = bpd_cf - bpd_exact
    assert (gap1 >= 0).all()
    assert (diff1.mean() - gap1.mean()).abs() < 4 * diff1.std() / math.sqrt(n)
    # 3) The importance-weighted bound with S = 64 draws is tighter: gap ~ gap1 / S.
    S = 64
    bpd64, info64 = likelihood.bits_per_dim(sde, score_fn, data, scaler, n_bits=n_bits,
                                            num_dequant=S,
                                            generator=torch.Generator().manual_seed(3), **kwargs)
    assert info64["log_probs"].shape == (S, n) and "S=64" in info64["bound"]
    bound = torch.logsumexp(info64["log_probs"], dim=0) - math.log(S)
    torch.testing.assert_close(bpd64, -bound / (D * math.log(2)))
    mismatch = _prior_mismatch(sde, data_mix, info64["z"].flatten(0, 1)).reshape(S, n)
    bound = torch.logsumexp(info64["log_probs"] + mismatch, dim=0) - math.log(S)
    diff64 = -bound / (D * math.log(2)) - bpd_exact
    se64 = diff64.std() / math.sqrt(n)
    assert -4 * se64 < diff64.mean() < gap1.mean() / 8 + 4 * se64, (diff64.mean(), gap1.mean())
    assert diff64.std() < diff1.std() / 2  # the S-draw average is far less noisy


def _prior_mismatch(sde, mix, z):
    """log p_T(z) - log prior(z): what the ODE's model density differs from p_eps by."""
    return mix.log_prob(z.double(), sde.T, sde) - sde.prior_logp(z.double())


@pytest.mark.parametrize("scaler,offset", [(CENTRED, 7.0), (UNCENTRED, 8.0)])
def test_reference_likelihood_fn_offset(scaler, offset):
    sde = SDES["vp"]()
    mix, x, _ = _problem("ring", sde, 16)
    fn = likelihood.get_likelihood_fn(sde, scaler, hutchinson_type="exact", rtol=1e-4, atol=1e-4)
    bpd, z, nfe = fn(mix.score_fn(sde), x)
    logp, info = likelihood.log_likelihood(sde, mix.score_fn(sde), x, divergence="exact",
                                           rtol=1e-4, atol=1e-4, method="RK45")
    torch.testing.assert_close(bpd, -logp / (2 * math.log(2)) + offset)  # the reference's hack
    assert torch.equal(z, info["z"]) and nfe == info["nfe"]


def test_nats_per_dim_continuous():
    sde = SDES["vp"]()
    mix, y, ref = _problem("ring", sde, 32)
    x = (y + 1) / 2  # data space of a centred scaler; log p_x = log p_y + D log 2
    npd, _ = likelihood.nats_per_dim(sde, mix.score_fn(sde), x, CENTRED, divergence="exact")
    expected = -(ref + 2 * math.log(2)) / 2
    mismatch = (_[ "prior_logp"].double() - mix.log_prob(_["z"].double(), 1.0, sde)) / 2
    assert (npd.double() - expected + mismatch).abs().max() < 1e-3


def test_error_norm_is_per_sample():
    """One sample's error is not diluted by the batch (RMS over B) or by D (Delta log p column)."""
    B, D, K = 256, 192, 3
    norm = likelihood._per_sample_norm(D)
    err = torch.zeros(B, D + K)
    err[17, D + 1] = 2.0  # one sample's log-density error only
    assert norm(err) == 2.0
    err = torch.zeros(B, D + K)
    err[3, :D] = 0.5  # one sample's state error, RMS over its own D coordinates
    assert norm(err) == 0.5


# -- a real network and the public boundary -----------------------------------------------------


def test_reference_fixture_ddpmpp(reference_dir):
    path = reference_dir / "ddpmpp_vp.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    ml_collections = pytest.importorskip("ml_collections")
    safetensors = pytest.importorskip("safetensors.torch")
    pytest.importorskip("models.ncsnpp", reason="models/ncsnpp.py not available yet")
    from models import utils as mutils

    config = ml_collections.ConfigDict(json.loads(path.read_text())["config"])
    model = mutils.create_model(config)
    state = safetensors.load_file(str(reference_dir / "ddpmpp_vp.safetensors"))
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    sde = sde_lib.VPSDE(0.1, 20, 1000)
    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
    x = safetensors.load_file(str(reference_dir / "ddpmpp_vp_io.safetensors"))["x"][:1]
    fn = likelihood.get_likelihood_fn(sde, CENTRED, rtol=1e-3, atol=1e-3)
    bpd, z, nfe = fn(score_fn, x.clamp(-1, 1), generator=torch.Generator().manual_seed(0))
    assert bpd.shape == (1,) and torch.isfinite(bpd).all() and torch.isfinite(z).all()
    assert isinstance(nfe, int) and nfe > 0
    with pytest.raises(TypeError, match="get_score_fn"):
        fn(model, x)


def test_boundary_errors_name_the_choices():
    sde = SDES["vp"]()
    mix, x, _ = _problem("ring", sde, 2)
    score_fn = mix.score_fn(sde)
    with pytest.raises(ValueError, match="Unknown divergence estimator 'foo'; valid: exact"):
        likelihood.log_likelihood(sde, score_fn, x, divergence="foo")
    with pytest.raises(ValueError, match="Unknown ODE method 'euler'"):
        likelihood.log_likelihood(sde, score_fn, x, method="euler")
    with pytest.raises(ValueError, match="no probes"):
        likelihood.log_likelihood(sde, score_fn, x, divergence="exact", num_probes=4)
    with pytest.raises(ValueError, match="num_probes >= 6"):
        likelihood.log_likelihood(sde, score_fn, x, divergence="hutchpp", num_probes=3)
    with pytest.raises(ValueError, match="even"):
        likelihood.log_likelihood(sde, score_fn, x, num_probes=3, antithetic=True)
    with pytest.raises(ValueError, match="eps"):
        likelihood.log_likelihood(sde, score_fn, x, eps=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        likelihood.log_likelihood(sde, score_fn, x * math.nan)
    with pytest.raises(ValueError, match="affine"):
        likelihood.bits_per_dim(sde, score_fn, torch.zeros(2, 2).long(), torch.sigmoid)
    with pytest.raises(ValueError, match="levels must lie in"):
        likelihood.dequantize(torch.full((2, 2), 40), n_bits=5)
    with pytest.raises(ValueError, match="grid"):
        likelihood.dequantize(torch.full((2, 2), 0.5), n_bits=8)


# The default solver on every SDE at the API's and the CLI's tolerances, and every adaptive
# method at the CLI's.
BOUNDED_CASES = [(name, tol, "dopri5") for name in sorted(SDES) for tol in (1e-5, 1e-3)] + [
    ("vp", 1e-3, method) for method in likelihood.ADAPTIVE_METHODS if method != "dopri5"]


@pytest.mark.parametrize("sde_name,tol,method", BOUNDED_CASES)
def test_score_is_called_only_inside_eps_to_T(sde_name, tol, method):
    """torchdiffeq's overshoot past T and its initial-step probe called the score at t up to
    ~1.3, outside the trained range; now every call is at t in [eps, T], and the log-density
    is still that of eq. 40 at T."""
    sde = SDES[sde_name]()
    mix, x, ref = _problem("ring", sde, 8)
    score_fn, times = mix.score_fn(sde), []

    def recording_score_fn(xt, t):
        times.append(t)
        return score_fn(xt, t)

    logp, info = likelihood.log_likelihood(sde, recording_score_fn, x, divergence="exact",
                                           rtol=tol, atol=tol, method=method, eps=EPS)
    t = torch.cat(times)
    assert len(times) == info["nfe"] and t.dtype == x.dtype
    eps = torch.tensor(EPS, dtype=x.dtype)  # the time grid's eps, rounded to x's dtype
    assert t.min() >= eps and t.max() <= sde.T, (t.min().item(), t.max().item())
    if method != "dopri5":
        return  # fehlberg2's error estimate is poor at 1e-3 (0.07 nats/dim here, as before)
    # Solver error, nats/dim: < 4e-5 at 1e-5, < 0.03 at 1e-3 (|Delta log p| ~ 1.7 (VP) to 9.5
    # (VE) nats, so a wrong factor in the drift or the divergence fails either bound).
    ode = mix.log_prob(info["z"].double(), sde.T, sde) + info["delta_logp"].double()
    assert ((ode - ref).abs() / mix.dim).max() < (1e-3 if tol < 1e-4 else 5e-2)
