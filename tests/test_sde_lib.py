"""sde_lib against the reference fixture and against closed forms (moments, moment ODE, scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import sde_lib

REFERENCE_SDES = {"VPSDE": sde_lib.VPSDE, "subVPSDE": sde_lib.subVPSDE, "VESDE": sde_lib.VESDE}
REGISTERED = sde_lib.SDES.names()


def _build(name):
    """Each registered SDE with its default (reference) constants."""
    return sde_lib.get_sde(name)


def _ref_score(x, t):
    """The fixture's analytic score -(x - 0.25) / (1 + t)."""
    return -(x - 0.25) / (1 + t.reshape(-1, *[1] * (x.dim() - 1)))


def _assert_matches(ours, ref, what):
    """The fixture README's bound: atol = 1e-5 max(1, max|ref|), rtol = 1e-5."""
    ref = torch.as_tensor(np.asarray(ref, dtype=np.float64))
    ours = torch.as_tensor(ours).to(torch.float64)
    if ref.dim() == 0:  # the reference's probability-flow diffusion is the float 0.0
        ref = ref.expand_as(ours)
    atol = 1e-5 * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(ours, ref, atol=atol, rtol=1e-5, msg=lambda m: f"{what}: {m}")


# -- reference fixture ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(REFERENCE_SDES))
def reference_case(request, sde_values):
    name = request.param
    values = sde_values["sdes"][name]
    constants = {k: v for k, v in values["constants"].items() if k != "T"}
    sde = REFERENCE_SDES[name](**constants)
    assert sde.T == values["constants"]["T"]
    x = torch.tensor(sde_values["x"], dtype=torch.float32)  # (8, 2, 2, 2)
    t = torch.tensor(sde_values["t"], dtype=torch.float32)  # (8,)
    return name, sde, values, x, t


def test_reference_sde_and_marginals(reference_case):
    name, sde, values, x, t = reference_case
    drift, diffusion = sde.sde(x, t)
    _assert_matches(drift, values["sde"]["drift"], f"{name} drift")
    _assert_matches(diffusion, values["sde"]["diffusion"], f"{name} diffusion")
    mean, std = sde.marginal_prob(x, t)
    _assert_matches(mean, values["marginal_prob"]["mean"], f"{name} mean")
    _assert_matches(std, values["marginal_prob"]["std"], f"{name} std")
    f, G = sde.discretize(x, t)
    _assert_matches(f, values["discretize"]["f"], f"{name} discretize f")
    _assert_matches(G, values["discretize"]["G"], f"{name} discretize G")
    logp = sde.prior_logp(x)
    ref = torch.tensor(values["prior_logp"], dtype=torch.float64)
    torch.testing.assert_close(logp.double(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("probability_flow", [False, True], ids=["reverse", "probability_flow"])
def test_reference_reverse(reference_case, probability_flow):
    name, sde, values, x, t = reference_case
    key = "reverse_probability_flow" if probability_flow else "reverse"
    rsde = sde.reverse(_ref_score, probability_flow=probability_flow)
    drift, diffusion = rsde.sde(x, t)
    _assert_matches(drift, values[key]["sde"]["drift"], f"{name} {key} drift")
    _assert_matches(diffusion, values[key]["sde"]["diffusion"], f"{name} {key} diffusion")
    f, G = rsde.discretize(x, t)
    _assert_matches(f, values[key]["discretize"]["f"], f"{name} {key} f")
    _assert_matches(G, values[key]["discretize"]["G"], f"{name} {key} G")


def test_reference_discrete_tables(reference_case):
    name, sde, values, _, _ = reference_case
    for key, ref in values.get("discrete", {}).items():
        _assert_matches(getattr(sde, key), ref, f"{name} {key}")
    if name != "subVPSDE":
        assert values.get("discrete"), f"fixture lacks the {name} tables"


def test_vp_std_at_small_t_is_the_exact_value(sde_values):
    """The README's remark: the reference's float32 cancellation puts VP std(1e-5) at 0.0010066;
    the exact value is 0.0010005, which we compute (expm1), within the fixture's atol either way."""
    sde = sde_lib.VPSDE()
    t = torch.tensor([1e-5, 1e-3], dtype=torch.float32)
    b0, b1 = 0.1, 20.0
    exact = [math.sqrt(-math.expm1(-0.5 * s**2 * (b1 - b0) - s * b0)) for s in t.double().tolist()]
    exact = torch.tensor(exact, dtype=torch.float64)
    torch.testing.assert_close(sde.marginal_std(t).double(), exact, rtol=1e-6, atol=0)


# -- closed forms --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", REGISTERED)
def test_moments_match_euler_maruyama_simulation(name):
    """Mean m(t) x0 and variance s(t)^2 against a fine Euler-Maruyama simulation of the forward SDE
    (within 4 standard errors), started at x(0) ~ N(m(0) x0, s(0)^2) (VE's sigma_min)."""
    sde = _build(name)
    n, steps_per_unit, x0 = 20_000, 2000, 3.0
    g = torch.Generator().manual_seed(0)
    m0, s0 = sde.marginal_coeffs(torch.tensor(0.0, dtype=torch.float64))
    x = m0 * x0 + s0 * torch.randn(n, 1, generator=g, dtype=torch.float64)  # (n, 1)
    dt = 1.0 / steps_per_unit
    t_now = 0.0
    for t_check in (0.3, 0.6, 0.9):
        while t_now < t_check - 1e-12:
            drift, diffusion = sde.sde(x, torch.full((n,), t_now, dtype=torch.float64))
            x = x + drift * dt + diffusion[:, None] * math.sqrt(dt) * torch.randn(
                x.shape, generator=g, dtype=torch.float64)
            t_now += dt
        m, s = (float(c) for c in sde.marginal_coeffs(torch.tensor(t_check, dtype=torch.float64)))
        mean, var = x.mean().item(), x.var().item()
        se_mean, se_var = s / math.sqrt(n), s**2 * math.sqrt(2 / (n - 1))
        assert abs(mean - m * x0) < 4 * se_mean, (t_check, mean, m * x0)
        assert abs(var - s**2) < 4 * se_var, (t_check, var, s**2)
        assert abs(var - 2 * s**2) > 4 * se_var and abs(var - s**2 / 2) > 4 * se_var


@pytest.mark.parametrize("name", REGISTERED)
def test_marginals_solve_the_moment_odes(name):
    """dm/dt = f m and d s^2/dt = 2 f s^2 + g^2 with f = drift / x (the moment ODEs of a linear
    SDE; Song et al. 2021, eqs. 31-32 in App. B), by autograd in float64."""
    sde = _build(name)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64).requires_grad_(True)
    m, s = sde.marginal_coeffs(t)
    # VE's m = 1 does not depend on t (no graph)
    dm = torch.autograd.grad(m.sum(), t, retain_graph=True)[0] if m.requires_grad else 0 * m
    dvar = torch.autograd.grad((s**2).sum(), t)[0]
    t = t.detach()
    drift, diffusion = sde.sde(torch.ones(t.shape[0], 1, dtype=torch.float64), t)
    f = drift[:, 0]
    m, s = m.detach(), s.detach()
    torch.testing.assert_close(dm, f * m, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(dvar, 2 * f * s**2 + diffusion**2, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", REGISTERED)
@pytest.mark.parametrize("shape", [(5, 3), (5, 2, 3, 3)], ids=["vectors", "images"])
def test_prior_logp_matches_scipy(name, shape):
    sde = _build(name)
    z = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # VE's prior is N(0, sigma_max^2 I); the VP family's N(0, I) (their s(T) is 1 only nearly).
    scale = getattr(sde, "sigma_max", 1.0)
    ref = stats.norm.logpdf(z.numpy(), loc=0.0, scale=scale).reshape(shape[0], -1).sum(axis=1)
    torch.testing.assert_close(sde.prior_logp(z), torch.from_numpy(ref), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("name", REGISTERED)
def test_prior_sampling_generator_device_dtype(name):
    sde = _build(name)
    a = sde.prior_sampling((4000, 2), generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64, device="cpu")
    b = sde.prior_sampling((4000, 2), generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64, device="cpu")
    assert a.dtype == torch.float64 and a.shape == (4000, 2) and torch.equal(a, b)
    scale = getattr(sde, "sigma_max", 1.0)
    assert abs(a.std().item() / scale - 1) < 4 * math.sqrt(1 / (2 * a.numel()))


@pytest.mark.parametrize("name", REGISTERED)
def test_log_snr_inverse_inverts_log_snr(name):
    sde = _build(name)
    t = torch.linspace(1e-4, 1.0, 500, dtype=torch.float64)
    lam = sde.log_snr(t)
    assert torch.all(lam[1:] < lam[:-1]), "log-SNR must decrease in t"
    torch.testing.assert_close(sde.log_snr_inverse(lam), t, rtol=0, atol=1e-9)
    m, s = sde.marginal_coeffs(t)
    torch.testing.assert_close(lam, torch.log(m**2 / s**2), rtol=1e-10, atol=1e-10)


def test_ddpm_chain_converges_to_vp_marginals():
    """prod_{k<=n}(1 - beta_k) -> m(t)^2 at t = (n + 1) / N with error O(1/N) (Song et al. 2021,
    App. B): the fitted log-log slope of the error against N is -1."""
    Ns = [250, 500, 1000, 2000, 4000]
    errors = []
    for N in Ns:
        sde = sde_lib.VPSDE(N=N)
        t = torch.tensor([0.1, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
        n = (t * N).round().long() - 1
        m, s = sde.marginal_coeffs(t)
        err_m = (sde.sqrt_alphas_cumprod[n].double() - m).abs().max()
        err_s = (sde.sqrt_1m_alphas_cumprod[n].double() - s).abs().max()
        errors.append(max(err_m.item(), err_s.item()))
    slope = np.polyfit(np.log(Ns), np.log(errors), 1)[0]
    assert -1.2 < slope < -0.8, (slope, errors)
    assert errors[-1] < 5e-3


def test_cosine_schedule_matches_improved_ddpm():
    """m(t)^2 = f(t) / f(0), f(t) = cos^2(pi/2 (t + s)/(1 + s)) before the clip (Nichol &
    Dhariwal 2021, eq. 17); its DDPM table is 1 - alpha_bar(t_{n+1}) / alpha_bar(t_n) clipped at
    0.999, and the clip is reached."""
    sde = sde_lib.CosineVPSDE()
    s = sde.s

    def f(t):
        return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    t = torch.linspace(0, sde._t_clip, 200, dtype=torch.float64)
    alpha_bar = f(t) / f(torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(sde.marginal_mean_coeff(t) ** 2, alpha_bar, rtol=1e-10, atol=1e-12)
    assert 0.99 < sde._t_clip < 1.0
    grid = torch.linspace(0, 1, sde.N + 1, dtype=torch.float64)
    betas = 1 - f(grid[1:]) / f(grid[:-1])
    table = sde.discrete_betas.double()
    assert table.max().item() == pytest.approx(0.999, abs=1e-6)
    torch.testing.assert_close(table, betas.clamp(max=0.999), rtol=1e-6, atol=1e-7)
    assert betas[-1] > 0.999  # the clip acts on the last step
    assert torch.isfinite(sde.marginal_coeffs(torch.tensor(1.0))[0])


@pytest.mark.parametrize("make, match", [
    (lambda: sde_lib.VPSDE(beta_min=20.0, beta_max=0.1), "beta_min=20.0"),
    (lambda: sde_lib.VPSDE(beta_min=1.0, beta_max=1.0), "beta_min=1.0"),
    (lambda: sde_lib.VPSDE(beta_min=-0.1), "beta_min.*-0.1"),
    (lambda: sde_lib.subVPSDE(beta_min=5.0, beta_max=2.0), "beta_min=5.0"),
    (lambda: sde_lib.VPSDE(N=0), "N .*0"),
    (lambda: sde_lib.VESDE(N=10.5), "N .*10.5"),
    (lambda: sde_lib.VESDE(sigma_min=0.0), "sigma_min.*0.0"),
    (lambda: sde_lib.VESDE(sigma_max=-3.0), "sigma_max.*-3.0"),
    (lambda: sde_lib.VESDE(sigma_min=50.0, sigma_max=0.01), "sigma_min=50.0"),
    (lambda: sde_lib.CosineVPSDE(N=0), "N .*0"),
    (lambda: sde_lib.CosineVPSDE(s=-0.008), "s .*-0.008"),
])
def test_bad_constructor_values_raise_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", REGISTERED)
def test_any_data_rank_gives_the_same_values(name):
    """Vectors (B, D) and images (B, C, H, W) of the same numbers give the same results."""
    sde = _build(name)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(4, 2, 3, 3, generator=g)
    vectors = images.reshape(4, -1)
    t = torch.tensor([0.01, 0.3, 0.6, 0.95])
    for method in (sde.sde, sde.marginal_prob, sde.discretize,
                   sde.reverse(_ref_score).sde, sde.reverse(_ref_score, True).discretize):
        a, b = method(images, t), method(vectors, t)
        assert a[0].shape == images.shape and b[0].shape == vectors.shape
        torch.testing.assert_close(a[0].reshape(4, -1), b[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-6)
        assert a[1].shape == (4,)
    torch.testing.assert_close(sde.prior_logp(images), sde.prior_logp(vectors))
    # a scalar time broadcasts over the batch
    torch.testing.assert_close(sde.marginal_prob(vectors, 0.3)[1], sde.marginal_prob(
        vectors, torch.full((4,), 0.3))[1])


@pytest.mark.parametrize("name", REGISTERED)
def test_probability_flow_has_zero_diffusion_and_half_the_score_term(name):
    """Reverse SDE drift f - g^2 score (eq. 6); probability flow f - g^2 score / 2 (eq. 13)."""
    sde = _build(name)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9], dtype=torch.float64)
    drift, diffusion = sde.sde(x, t)
    score_term = diffusion[:, None] ** 2 * _ref_score(x, t)
    rev_drift, rev_diffusion = sde.reverse(_ref_score).sde(x, t)
    ode_drift, ode_diffusion = sde.reverse(_ref_score, probability_flow=True).sde(x, t)
    torch.testing.assert_close(rev_drift, drift - score_term)
    torch.testing.assert_close(ode_drift, drift - 0.5 * score_term)
    torch.testing.assert_close(rev_diffusion, diffusion)
    assert torch.equal(ode_diffusion, torch.zeros_like(ode_diffusion))
    f, G = sde.discretize(x, t)
    rev_f, rev_G = sde.reverse(_ref_score, probability_flow=True).discretize(x, t)
    torch.testing.assert_close(rev_f, f - 0.5 * G[:, None] ** 2 * _ref_score(x, t))
    assert torch.equal(rev_G, torch.zeros_like(G))


def test_unknown_sde_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown SDE 'foo'; valid: .*vesde.*vpsde"):
        sde_lib.get_sde("foo")
    for name in ("vpsde", "subvpsde", "vesde"):
        assert name in REGISTERED
    assert isinstance(sde_lib.get_sde("vesde", sigma_max=10.0), sde_lib.VESDE)


@pytest.mark.parametrize("name, table", [("vpsde", "sqrt_1m_alphas_cumprod"),
                                         ("vesde", "discrete_sigmas")])
def test_discrete_tables_are_copied_to_a_device_once(name, table):
    """Step loops index the tables on the input's device: one copy per device, not per call
    (the meta device stands in for an accelerator)."""
    sde = _build(name)
    assert sde.discrete_table(table, "cpu") is getattr(sde, table)
    on_meta = sde.discrete_table(table, "meta")
    assert on_meta.device.type == "meta" and on_meta.shape == (sde.N,)
    assert sde.discrete_table(table, torch.device("meta")) is on_meta
    x = torch.empty(3, 2, device="meta")
    f, G = sde.discretize(x, torch.empty(3, device="meta"))
    assert f.device.type == G.device.type == "meta" and G.shape == (3,)
    setattr(sde, table, getattr(sde, table) * 2)  # a replaced table is copied again
    assert sde.discrete_table(table, "meta") is not on_meta


def test_constructor_accepts_any_real_number_but_not_bool():
    """numpy scalars (e.g. from a config computed with numpy) are numbers; True is not."""
    sde = sde_lib.VPSDE(beta_min=np.float32(0.5), beta_max=np.float64(10.0), N=10)
    assert (sde.beta_0, sde.beta_1) == (0.5, 10.0)
    with pytest.raises(ValueError, match="sigma_min.*True"):
        sde_lib.VESDE(sigma_min=True)


# -- discrete steps in float64 ---------------------------------------------------------------------

# Indices n = floor(t (N - 1) / T) with t a quarter step past n (safe from rounding), and t = T.
STEP_INDICES = [0, 1, 2, 10, 500, 998]
N_STEPS = 1000


def _step_times(dtype):
    t = [(n + 0.25) / (N_STEPS - 1) for n in STEP_INDICES] + [1.0]
    return torch.tensor(t, dtype=dtype), [*STEP_INDICES, N_STEPS - 1]


def _step_state(dtype):
    x = torch.tensor([0.3, -1.7, 2.5, 1.0, -0.4, 0.9, -2.2], dtype=torch.float64)
    return x.reshape(-1, 1).expand(-1, 2).mul(torch.tensor([1.0, -0.5], dtype=torch.float64)
                                               ).to(dtype)  # (7, 2)


def _closed_form_step(name, t, n, x):
    """(f, G) of one forward step at times t (list) and indices n (list), state x (B, 2) numpy
    float64, from the schedule formulas with math (no torch, no tables)."""
    if name == "vesde":  # SMLD: sigma_n = s_min (s_max / s_min)^(n / (N - 1)), sigma_{-1} = 0
        s_min, s_max = 0.01, 50.0
        spacing = math.log(s_max / s_min) / (N_STEPS - 1)
        sigma = [s_min * math.exp(k * spacing) for k in n]
        # sigma_n^2 - sigma_{n-1}^2 = sigma_n^2 (1 - exp(-2 spacing)): no cancellation.
        G = [s if k == 0 else s * math.sqrt(-math.expm1(-2 * spacing)) for s, k in zip(sigma, n)]
        return np.zeros_like(x), np.array(G)
    b0, b1 = 0.1, 20.0
    if name == "vpsde":  # DDPM: beta_n = b0 / N + n (b1 - b0) / (N (N - 1))
        beta = [b0 / N_STEPS + k * (b1 - b0) / (N_STEPS * (N_STEPS - 1)) for k in n]
        # sqrt(1 - beta) - 1 = expm1(log1p(-beta) / 2)
        f = [math.expm1(0.5 * math.log1p(-b)) for b in beta]
        return np.array(f)[:, None] * x, np.sqrt(np.array(beta))
    # sub-VP, Euler-Maruyama with dt = 1 / N: f = -beta(t) x dt / 2, G = g(t) sqrt(dt) (eq. 12)
    dt = 1.0 / N_STEPS
    beta = [b0 + s * (b1 - b0) for s in t]
    integral = [b0 * s + 0.5 * s * s * (b1 - b0) for s in t]
    g = [math.sqrt(b * -math.expm1(-2 * i)) for b, i in zip(beta, integral)]
    return -0.5 * dt * np.array(beta)[:, None] * x, np.array(g) * math.sqrt(dt)


def _assert_relative(ours, ref, rtol, what):
    ref = torch.as_tensor(ref, dtype=torch.float64)
    scale = ref.abs().clamp(min=1e-300)
    err = ((ours.double() - ref).abs() / scale).max().item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("name", ["vesde", "vpsde", "subvpsde"])
def test_discrete_steps_are_exact_in_float64(name):
    """Forward discretisation (SMLD eq. 8 / DDPM eq. 2 / Euler-Maruyama) and the reverse-diffusion
    step f - G^2 score (eq. 46) in float64 to 1e-12 of the closed forms. The float32 tables gave
    1e-6 (VE, cancellation in sigma_n^2 - sigma_{n-1}^2) and 1e-3 (DDPM drift
    sqrt(alpha_n) x - x near n = 0) relative errors."""
    sde = _build(name)
    assert sde.N == N_STEPS
    t, n = _step_times(torch.float64)
    x = _step_state(torch.float64)
    f_ref, G_ref = _closed_form_step(name, t.tolist(), n, x.numpy())
    f, G = sde.discretize(x, t)
    assert f.dtype == G.dtype == torch.float64
    if name == "vesde":
        assert torch.equal(f, torch.zeros_like(x))
    else:
        _assert_relative(f, f_ref, 1e-12, f"{name} f")
    _assert_relative(G, G_ref, 1e-12, f"{name} G")
    score = _ref_score(x, t)
    rev_f, rev_G = sde.reverse(_ref_score).discretize(x, t)
    rev_f_ref = f_ref - G_ref[:, None] ** 2 * score.numpy()
    _assert_relative(rev_f, rev_f_ref, 1e-12, f"{name} reverse f")
    _assert_relative(rev_G, G_ref, 1e-12, f"{name} reverse G")
    # float32 in, float32 out, within float32 accuracy (VE: the entries' rounding, amplified).
    f32, G32 = sde.discretize(x.float(), t.float())
    assert f32.dtype == G32.dtype == torch.float32
    _assert_relative(G32, G_ref, 1e-4 if name == "vesde" else 1e-6, f"{name} float32 G")
    if name != "vesde":
        _assert_relative(f32, f_ref, 1e-6, f"{name} float32 f")


def test_discrete_tables_are_float64_and_cast_on_use():
    """Tables are kept in float64; a float32 request gets the table rounded once, cached per
    (device, dtype), so a device without float64 (MPS) never receives a float64 buffer."""
    for sde, name in ((sde_lib.VPSDE(), "sqrt_1m_alphas_cumprod"),
                      (sde_lib.CosineVPSDE(), "discrete_betas"),
                      (sde_lib.VESDE(), "discrete_sigmas")):
        table = getattr(sde, name)
        assert table.dtype == torch.float64
        as32 = sde.discrete_table(name, "cpu", torch.float32)
        assert as32.dtype == torch.float32 and torch.equal(as32, table.float())
        assert sde.discrete_table(name, "cpu", torch.float32) is as32
        assert sde.discrete_table(name, "meta", torch.float32).dtype == torch.float32
