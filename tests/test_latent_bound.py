"""The LSGM bound in data bits/dim (score_sde.training.latent_bound) against closed forms.

A linear Gaussian "autoencoder" (affine encoder with a fixed posterior std, affine decoder with a
known per-channel Gaussian variance) on Gaussian data: the latent marginal is Gaussian (its exact
score from score_sde.oracle), and log p(x), the bound and its gap KL(q(z | x) || p(z | x)) are
closed forms (Bishop 2006, eqs. 2.113-2.117). Everything runs in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

import sde_lib
from models.autoencoders import Autoencoder
from score_sde.oracle import FullGaussianMixture
from score_sde.training import latent_bound
from score_sde.training.latent_bound import (
    DecoderLikelihood,
    fit_decoder_variance,
    latent_bits_per_dim,
)

C, H, W = 2, 2, 2  # images (2, 2, 2): D = 8
D = C * H * W
DZ = 4  # latents (1, 2, 2)
SCALE, SHIFT = 0.5, 0.3  # z_model = (z - shift) * scale: its entropy carries DZ log 0.5


class LinearGaussianAE(Autoencoder):
    """q(z | y) = N(W y + b, e^(2 log_std) I), decode(z) = A z + d, p(y | z) = N(decode(z),
    sigma_c^2) with sigma_c = exp(decoder_log_scale[c]); y flattened row-major (C, H, W)."""

    in_channels, latent_channels, downsampling = C, 1, 1

    def __init__(self, seed: int = 0) -> None:
        super().__init__(SCALE, SHIFT)
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        A = 0.8 * torch.randn(D, DZ, generator=g, dtype=f64)
        d = 0.1 * torch.randn(D, generator=g, dtype=f64)
        W = torch.linalg.pinv(A) + 0.1 * torch.randn(DZ, D, generator=g, dtype=f64)  # ~ A^+
        self.A, self.d = torch.nn.Parameter(A, False), torch.nn.Parameter(d, False)
        self.W, self.b = torch.nn.Parameter(W, False), torch.nn.Parameter(-W @ d, False)
        self.log_std = math.log(0.1)
        self.decoder_log_scale = torch.nn.Parameter(
            torch.tensor([math.log(0.5), math.log(0.7)], dtype=f64), False)

    def encode_raw(self, y):
        mean = (y.flatten(1) @ self.W.T + self.b).reshape(-1, 1, H, W)
        return mean, torch.full_like(mean, self.log_std)

    def decode_raw(self, z):
        return (z.flatten(1) @ self.A.T + self.d).reshape(-1, C, H, W)

    # -- the closed forms, in z_model space ---------------------------------------------------

    def decoder_affine(self):
        """decode(z_model) = A' z_model + d' (A' = A / scale, d' = A shift + d)."""
        return self.A / SCALE, self.A @ torch.full((DZ,), SHIFT, dtype=torch.float64) + self.d

    def noise_cov(self):
        return torch.diag(torch.exp(2 * self.decoder_log_scale).repeat_interleave(H * W))


def _gaussian_data(n: int, seed: int = 1):
    """y ~ N(mu_y, Sigma_y) in model space [-1, 1]-ish; returns y (n, C, H, W), mu_y, Sigma_y."""
    g = torch.Generator().manual_seed(seed)
    mu = 0.2 * torch.randn(D, generator=g, dtype=torch.float64)
    L = 0.3 * torch.randn(D, D, generator=g, dtype=torch.float64)
    cov = L @ L.T + 0.05 * torch.eye(D, dtype=torch.float64)
    y = mu + torch.randn(n, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return y.reshape(n, C, H, W), mu, cov


def _latent_prior(ae: LinearGaussianAE, mu_y, cov_y) -> FullGaussianMixture:
    """The law of z_model = scale (W y + b + std e - shift) for y ~ N(mu_y, Sigma_y): Gaussian."""
    mean = SCALE * (ae.W @ mu_y + ae.b - SHIFT)
    cov = SCALE**2 * (ae.W @ cov_y @ ae.W.T + math.exp(2 * ae.log_std) * torch.eye(DZ))
    return FullGaussianMixture(torch.ones(1), mean[None], cov[None])


def _gauss_logpdf(x, mean, cov):
    """log N(x; mean, cov) per row of x (N, d)."""
    diff = x - mean
    sol = torch.linalg.solve(cov, diff.T).T
    return -0.5 * ((diff * sol).sum(1) + torch.logdet(cov) + x.shape[1] * math.log(2 * math.pi))


def _closed_forms(ae: LinearGaussianAE, prior: FullGaussianMixture, y: torch.Tensor):
    """Per image: log p(x) (data space x = (y + 1) / 2), the bound (closed-form expectations)
    and KL(q(z | x) || p(z | x)) from the oracle's exact posterior, all in nats."""
    A, d = ae.decoder_affine()
    R = ae.noise_cov()
    mu_z, cov_z = prior.means[0, 0], prior.covs[0]
    yf = y.flatten(1)
    log_det = D * math.log(2.0)  # x -> y = 2 x - 1
    log_px = _gauss_logpdf(yf, A @ mu_z + d, A @ cov_z @ A.T + R) + log_det
    mean_q, log_std_q = ae.encode(y)
    mean_q, var_q = mean_q.flatten(1), torch.exp(2 * log_std_q.flatten(1))  # (N, DZ)
    # E_q log N(y; A z + d, R) = log N(y; A m + d, R) - tr(R^-1 A S A^T) / 2, and alike
    e_dec = (_gauss_logpdf(yf, mean_q @ A.T + d, R)
             - 0.5 * torch.einsum("ij,nj,ij->n", torch.linalg.inv(R) @ A, var_q, A))
    e_prior = (_gauss_logpdf(mean_q, mu_z, cov_z)
               - 0.5 * (torch.diagonal(torch.linalg.inv(cov_z)) * var_q).sum(1))
    entropy = (0.5 * torch.log(2 * math.pi * math.e * var_q)).sum(1)
    bound = e_dec + log_det + e_prior + entropy
    post = prior.condition(A, yf - d, noise_cov=R)  # p(z | y): N rows, one component
    kl = []
    for n in range(len(yf)):
        mp, cp = post.means[n, 0], post.covs[0] if post.covs.dim() == 3 else post.covs[n, 0]
        cp_inv = torch.linalg.inv(cp)
        diff = mp - mean_q[n]
        kl.append(0.5 * ((torch.diagonal(cp_inv) * var_q[n]).sum() + diff @ cp_inv @ diff - DZ
                         + torch.logdet(cp) - torch.log(var_q[n]).sum()))
    return log_px, bound, torch.stack(kl), entropy


def _run_bound(ae, prior, y, num_draws=48):
    sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    x = (y + 1.0) / 2.0
    return latent_bits_per_dim(
        sde, prior.score_fn(sde), ae, x, DecoderLikelihood.learned(ae),
        lambda v: (v + 1.0) / 2.0, levels=None, num_draws=num_draws,
        generator=torch.Generator().manual_seed(3), divergence="exact", rtol=1e-7, atol=1e-7)


@pytest.fixture(scope="module")
def problem():
    ae = LinearGaussianAE()
    y, mu_y, cov_y = _gaussian_data(6)
    prior = _latent_prior(ae, mu_y, cov_y)
    return ae, prior, y, _closed_forms(ae, prior, y)


def _z_score(bpd, info, target_bpd):
    """(mean over images of bpd - target) / its Monte-Carlo standard error (over the draws)."""
    n = len(bpd)
    se = info["stderr"].square().sum().sqrt() / n
    return float((bpd - target_bpd).mean() / se), float(se)


def test_bound_and_gap_match_the_closed_forms(problem):
    ae, prior, y, (log_px, bound, kl, entropy) = problem
    to_bpd = -1.0 / (D * math.log(2))
    bpd, info = _run_bound(ae, prior, y)
    z, se = _z_score(bpd, info, to_bpd * bound)
    assert abs(z) < 4.0, (z, se)
    # the gap to the exact -log2 p(x) / D is KL(q || p(z | x)) / (D log 2) > 0
    gap = bpd - to_bpd * log_px
    z_gap = float((gap + to_bpd * kl).mean() / se)
    assert abs(z_gap) < 4.0 and bool((kl > 0.05).all())
    # the error model resolves a wrong entropy sign and a missing log-det many times over
    assert 4 * se < 0.1 * min(float((2 * entropy * -to_bpd).abs().min()), 1.0)
    # the terms add up, and the entropy term is exact
    terms = info["terms"]
    torch.testing.assert_close(terms["decoder"] + terms["latent_prior"] + terms["entropy"], bpd)
    torch.testing.assert_close(terms["entropy"], to_bpd * entropy)
    assert info["dtype"] == "float64" and info["num_draws"] == 48 and info["nfe"] > 0
    assert info["log_det_bpd"] == pytest.approx(-1.0)  # -D log 2 / (D log 2)


@pytest.mark.parametrize("bug", ["entropy_sign", "no_log_det", "no_latent_scale"])
def test_negative_controls_fail_the_closed_form_check(problem, monkeypatch, bug):
    """A wrong entropy sign, a missing log-det or a missing latent-scale term in the entropy are
    each caught by the check of the test above."""
    ae, prior, y, (_, bound, _, _) = problem
    if bug == "entropy_sign":
        original = latent_bound.gaussian_entropy
        monkeypatch.setattr(latent_bound, "gaussian_entropy", lambda s: -original(s))
    elif bug == "no_log_det":
        monkeypatch.setattr(latent_bound, "_log_det", lambda a, n: 0.0)
    else:  # the entropy of the raw latent z, without the log-det DZ log scale of z_model
        original = latent_bound.gaussian_entropy
        monkeypatch.setattr(latent_bound, "gaussian_entropy",
                            lambda s: original(s - math.log(SCALE)))
    bpd, info = _run_bound(ae, prior, y, num_draws=16)
    z, _ = _z_score(bpd, info, -bound / (D * math.log(2)))
    assert abs(z) > 8.0, z


@pytest.mark.parametrize("levels, tol", [(256, 1e-4), (4097, 1e-6)])
def test_discrete_bound_is_the_continuous_one_plus_the_bin_offset(problem, levels, tol):
    """Narrow bins: P(k | z) = p_x(x | z) / (L - 1)^D to second order in bin / sigma, so the
    discretised bound is the continuous one (with its log-det D log 2) plus log2(L - 1) bits per
    dimension: the data scaling, log-det and offset agree with the pixel convention. (A wrong
    bin width, e.g. log2 L, is off by log2(L / (L - 1)) >= 3.5e-4 bits here.)"""
    ae, prior, y, _ = problem
    x = torch.round((y.clamp(-0.9, 0.9) + 1) / 2 * (levels - 1)) / (levels - 1)
    sde = sde_lib.VPSDE()
    bpd = {}
    for lv in (levels, None):
        bpd[lv], _ = latent_bits_per_dim(
            sde, prior.score_fn(sde), ae, x, DecoderLikelihood.learned(ae), lambda v: (v + 1) / 2,
            levels=lv, num_draws=4, generator=torch.Generator().manual_seed(0),
            divergence="exact", rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bpd[levels], bpd[None] + math.log2(levels - 1), rtol=0, atol=tol)


def _direct_discretized(y, mean, sigma, levels, a, c):
    """log P(bin of y) by the definition: Phi differences at the bin edges in data space."""
    def phi(v):
        return 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))
    step = a / (levels - 1)  # the levels' spacing in model space
    k = round((y - c) / step)
    lo = -math.inf if k == 0 else (y - step / 2 - mean) / sigma
    hi = math.inf if k == levels - 1 else (y + step / 2 - mean) / sigma
    return math.log((1.0 if hi == math.inf else phi(hi)) - (0.0 if lo == -math.inf else phi(lo)))


@pytest.mark.parametrize("a, c", [(2.0, -1.0), (1.0, 0.0)])
def test_discretized_decoder_term_against_a_direct_computation(a, c):
    levels = 17
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, levels, (3, C, H, W), generator=g)
    k[0, 0, 0, 0], k[0, 1, 0, 0] = 0, levels - 1  # both open edge bins
    y = a * k.double() / (levels - 1) + c
    mean = y + 0.15 * a * torch.randn(y.shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.04, 0.1], dtype=torch.float64) * a
    dec = DecoderLikelihood(torch.log(sigma), "fitted")
    got = dec.log_prob(y, mean, levels=levels, scaling=(a, c))
    want = torch.tensor([sum(_direct_discretized(float(y[n, ch, i, j]), float(mean[n, ch, i, j]),
                                                 float(sigma[ch]), levels, a, c)
                             for ch in range(C) for i in range(H) for j in range(W))
                         for n in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # the bins of one pixel partition the line: their probabilities sum to 1
    grid = (a * torch.arange(levels, dtype=torch.float64) / (levels - 1) + c)
    one = grid.reshape(levels, 1, 1, 1).expand(levels, C, 1, 1).contiguous()
    for ch in range(C):
        single = DecoderLikelihood(torch.log(sigma[ch:ch + 1]), "fitted")
        q = torch.exp(single.log_prob(one[:, ch:ch + 1], torch.full_like(one[:, :1], c + 0.37 * a),
                                      levels=levels, scaling=(a, c)))
        assert float(q.sum()) == pytest.approx(1.0, abs=1e-12)


def test_variance_fit_equals_the_empirical_residual_variance(problem):
    ae, _, y, _ = problem
    x = (y + 1.0) / 2.0
    inverse = lambda v: (v + 1.0) / 2.0  # noqa: E731
    batches = [x[:4], x[4:]]
    fitted = fit_decoder_variance(ae, batches, inverse, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    residuals = [b * 2 - 1 - ae.decode(ae.sample_latent(b * 2 - 1, generator=g)) for b in batches]
    r = torch.cat(residuals)  # (N, C, H, W)
    want = r.square().mean(dim=(0, 2, 3))
    torch.testing.assert_close(torch.exp(2 * fitted.log_scale), want)
    record = fitted.describe()
    assert record["source"] == "fitted" and record["fit_images"] == len(x)
    assert record["sigma"] == pytest.approx(want.sqrt().tolist())
    # and in expectation the closed form E (y - A' z - d')^2 over data and q, per channel
    big, mu_y, cov_y = _gaussian_data(4000, seed=7)
    fitted = fit_decoder_variance(ae, [(big + 1) / 2], inverse,
                                  generator=torch.Generator().manual_seed(6))
    A, d = ae.decoder_affine()
    M = torch.eye(D, dtype=torch.float64) - A @ (SCALE * ae.W)  # y - A' E_q[z]: M y - const
    const = d + A @ (SCALE * (ae.b - SHIFT))
    mean_r = M @ mu_y - const
    second = M @ cov_y @ M.T + torch.outer(mean_r, mean_r) \
        + math.exp(2 * ae.log_std) * SCALE**2 * A @ A.T
    want = torch.diagonal(second).reshape(C, H * W).mean(1)
    torch.testing.assert_close(torch.exp(2 * fitted.log_scale), want, rtol=0.08, atol=0)


def test_learned_decoder_and_record_contents(problem):
    ae, prior, y, _ = problem
    dec = DecoderLikelihood.learned(ae)
    assert dec.source == "learned"
    assert dec.describe()["sigma"] == pytest.approx([0.5, 0.7])
    bpd, info = _run_bound(ae, prior, y[:2], num_draws=2)
    assert set(info["terms"]) == {"decoder", "latent_prior", "entropy"}
    assert info["stderr"].shape == bpd.shape == (2,) and info["draws"].shape == (2, 2)
    assert info["decoder"]["source"] == "learned" and "LSGM" in info["bound"]
    assert "-log2 p(x) / D" in info["bound"]


def test_errors_name_the_bad_value(problem):
    ae, prior, y, _ = problem
    sde = sde_lib.VPSDE()
    x = (y + 1) / 2
    with pytest.raises(ValueError, match="num_draws"):
        latent_bits_per_dim(sde, prior.score_fn(sde), ae, x, DecoderLikelihood.learned(ae),
                            levels=None, num_draws=0)
    with pytest.raises(ValueError, match="grid k / 255"):
        latent_bits_per_dim(sde, prior.score_fn(sde), ae, x, DecoderLikelihood.learned(ae))
    with pytest.raises(ValueError, match="channel variances"):
        latent_bits_per_dim(sde, prior.score_fn(sde), ae, x,
                            DecoderLikelihood(torch.zeros(3), "fitted"), levels=None)

    with pytest.raises(ValueError, match="fit_decoder_variance"):
        DecoderLikelihood.learned(torch.nn.Identity())


def _latent_digits_run(tmp_path, decoder_variance):
    """A digits config in the latent space of an untrained own autoencoder (1 x 4 x 4 latents),
    its score model saved as one safetensors file (random weights: the record is what counts)."""
    import importlib

    from safetensors.torch import save_file

    from models.autoencoders import KLAutoencoder
    from models.utils import create_model

    config = importlib.import_module("configs.digits").get_config()
    config.device = "cpu"
    config.model.nf = 8
    config.eval.batch_size = 4
    ae_cfg = config.data.autoencoder
    ae_cfg.name, ae_cfg.latent_channels, ae_cfg.channels = "kl", 1, 8
    ae_cfg.decoder_variance, ae_cfg.decoder_fit_images, ae_cfg.bound_draws = \
        decoder_variance, 12, 2
    torch.manual_seed(0)
    ae = KLAutoencoder(1, 1, 8, (1, 2))
    with torch.no_grad():
        ae.decoder_log_scale.fill_(math.log(0.2))
    torch.save({"model": ae.state_dict(), "latent_scale": {"scale_factor": 0.7, "shift": 0.0}},
               tmp_path / "ae.pth")
    ae_cfg.checkpoint = str(tmp_path / "ae.pth")
    model = create_model(config)
    weights = tmp_path / "ema.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return config, str(weights)


@pytest.mark.parametrize("decoder_variance", ["auto", "fitted"])
def test_mode_likelihood_on_a_latent_config_records_the_bound(tmp_path, decoder_variance):
    import json

    import numpy as np

    from score_sde.training.inference import run_likelihood

    config, checkpoint = _latent_digits_run(tmp_path, decoder_variance)
    path = run_likelihood(config, tmp_path, "eval", checkpoint=checkpoint, max_images=4,
                          progress=False)
    record = json.loads(path.read_text())
    arrays = np.load(path.with_suffix(".npz"))
    assert record["bpd_method"] == "latent_bound" and record["num_images"] == 4
    assert record["bpd"] == pytest.approx(arrays["bpd"].mean())
    assert sum(record["terms_bpd"].values()) == pytest.approx(record["bpd"])
    assert record["terms_bpd"]["decoder"] > 0  # -log2 of a probability (discretised, 17 levels)
    assert record["levels"] == 17 and record["num_draws"] == 2 and record["nfe"] > 0
    assert record["precision"] == "float32" and math.isfinite(record["bpd_mc_stderr"])
    assert "bits per data dimension" in record["bound"] and "17 levels" in record["bound"]
    assert record["autoencoder"]["scale_factor"] == pytest.approx(0.7)
    dec = record["decoder"]
    if decoder_variance == "auto":  # the own autoencoder's learned variance
        assert dec["source"] == "learned" and dec["sigma"] == pytest.approx([0.2])
    else:
        assert dec["source"] == "fitted" and dec["fit_images"] == 12
        assert dec["fit_split"] == "train" and dec["sigma"][0] > 0
    np.testing.assert_allclose(arrays["decoder"] + arrays["latent_prior"] + arrays["entropy"],
                               arrays["bpd"], rtol=1e-6)


def test_bound_settings_are_checked_at_the_door(tmp_path):
    from score_sde.training.latent_likelihood import bound_settings, decoder_likelihood

    config, _ = _latent_digits_run(tmp_path, "gaussian")
    with pytest.raises(ValueError, match="valid: auto, learned, fitted"):
        bound_settings(config, "test")
    config.data.autoencoder.decoder_variance = "fitted"
    config.data.autoencoder.decoder_fit_split = "test"
    with pytest.raises(ValueError, match="held-out"):
        decoder_likelihood(config, None, bound_settings(config, "test"))


def test_the_bound_scales_images_as_the_autoencoders_do():
    """--mode likelihood maps images to [-1, 1] exactly as latent training encodes them."""
    from score_sde.training.latent_data import to_autoencoder_input
    from score_sde.training.latent_likelihood import from_autoencoder_input

    v = torch.linspace(0, 1, 17, dtype=torch.float64)
    torch.testing.assert_close(from_autoencoder_input(to_autoencoder_input(v)), v)


@pytest.mark.slow
def test_digits_latent_likelihood_from_the_command_line(tmp_path):
    """digits_ae -> digits_latent -> --mode likelihood, tiny: the record is the data bound."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    def run(*args):
        result = subprocess.run([sys.executable, str(REPO / "main.py"), "--noprogress", *args],
                                cwd=REPO, capture_output=True, text=True, timeout=600,
                                env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]

    ae, latent = tmp_path / "ae", tmp_path / "latent"
    common = ["--config.data.autoencoder.channels=8"]
    run("--config=digits_ae", "--mode=train_autoencoder", f"--workdir={ae}", *common,
        "--config.training.n_iters=4", "--config.training.snapshot_freq=4",
        "--config.training.snapshot_freq_for_preemption=4", "--config.training.batch_size=16")
    latent_flags = [*common, f"--config.data.autoencoder.checkpoint={ae}",
                    "--config.model.nf=8", "--config.data.cache=none"]
    run("--config=digits_latent", "--mode=train", f"--workdir={latent}", *latent_flags,
        "--config.training.n_iters=2", "--config.training.snapshot_freq=2",
        "--config.training.snapshot_freq_for_preemption=2", "--config.training.batch_size=8",
        "--config.training.snapshot_sampling=False")
    run("--config=digits_latent", "--mode=likelihood", f"--workdir={latent}", *latent_flags,
        "--max_images=4", "--config.eval.batch_size=4", "--config.data.autoencoder.bound_draws=2")
    record = json.loads((latent / "eval" / "likelihood_test_step_2.json").read_text())
    assert record["bpd_method"] == "latent_bound" and record["num_draws"] == 2
    assert record["decoder"]["source"] == "learned" and record["levels"] == 17
    assert sum(record["terms_bpd"].values()) == pytest.approx(record["bpd"])


def test_auto_fits_the_variance_of_an_autoencoder_without_one(tmp_path):
    """'auto' on an autoencoder with no decoder variance (as the SD VAEs) fits it on the
    held-out split and records that."""
    from models.autoencoders import KLAutoencoder
    from score_sde.training.latent_likelihood import bound_settings, decoder_likelihood

    config, _ = _latent_digits_run(tmp_path, "auto")
    ae = KLAutoencoder(1, 1, 8, (1, 2)).eval()
    del ae.decoder_log_scale
    dec = decoder_likelihood(config, ae, bound_settings(config, "test"))
    assert dec.source == "fitted" and dec.details["fit_images"] == 12
    assert dec.details["fit_split"] == "train" and dec.log_scale.shape == (1,)


def test_bound_with_a_diffusers_vae_and_a_fitted_variance():
    """An SD-VAE-like diffusers AutoencoderKL (tiny, random): the fitted variance is the
    residual's, and the bound of 8-bit images runs with it (finite, terms adding up)."""
    diffusers = pytest.importorskip(
        "diffusers", reason='diffusers is an optional extra (pip install -e ".[latent]")')
    from models.autoencoders.diffusers_vae import DiffusersVAE

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=16, scaling_factor=0.3).eval()
    ae = DiffusersVAE(vae)
    g = torch.Generator().manual_seed(0)
    held_out = torch.randint(0, 256, (3, 3, 8, 8), generator=g) / 255.0
    x = torch.randint(0, 256, (2, 3, 8, 8), generator=g) / 255.0
    to_unit = lambda y: (y + 1) / 2  # noqa: E731
    dec = fit_decoder_variance(ae, [held_out], to_unit, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = held_out * 2 - 1
        r = y - ae.decode(ae.sample_latent(y, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(torch.exp(2 * dec.log_scale),
                               r.double().square().mean(dim=(0, 2, 3)), rtol=1e-5, atol=0)
    bpd, info = latent_bits_per_dim(sde_lib.VPSDE(), lambda z, t: -z, ae, x, dec, to_unit,
                                    levels=256, num_draws=2, rtol=1e-2, atol=1e-2,
                                    generator=torch.Generator().manual_seed(2))
    assert bool(torch.isfinite(bpd).all()) and info["decoder"]["source"] == "fitted"
    torch.testing.assert_close(sum(info["terms"].values()), bpd)
