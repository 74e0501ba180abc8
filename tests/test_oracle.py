"""The analytic Gaussian-mixture oracle against autograd, sampling moments and its definition."""

from __future__ import annotations

import math

import pytest
import torch

import sde_lib
from score_sde.oracle import GaussianMixture

SDES = [sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.VESDE(), sde_lib.CosineVPSDE()]


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("mixture", [GaussianMixture.ring(), GaussianMixture.random(12, 3)],
                         ids=["ring", "random12"])
def test_score_is_gradient_of_log_density(sde, mixture):
    g = torch.Generator().manual_seed(0)
    for t_val in (1e-3, 0.3, 0.9):
        x = mixture.sample_marginal(16, sde, t_val, generator=g, dtype=torch.float64)
        x.requires_grad_(True)
        t = torch.full((16,), t_val, dtype=torch.float64)
        (grad,) = torch.autograd.grad(mixture.log_prob(x, t, sde).sum(), x)
        torch.testing.assert_close(mixture.score(x, t, sde), grad, rtol=1e-10, atol=1e-10)


def test_log_prob_integrates_to_one_on_a_grid():
    mixture = GaussianMixture.ring(n_modes=3, radius=1.5, std=0.4)
    sde = sde_lib.VPSDE()
    lin = torch.linspace(-4, 4, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(lin, lin, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    t = torch.full((pts.shape[0],), 0.2, dtype=torch.float64)
    mass = mixture.log_prob(pts, t, sde).exp().sum() * (lin[1] - lin[0]) ** 2
    assert abs(mass.item() - 1.0) < 1e-4


def test_samples_match_mixture_moments():
    mixture = GaussianMixture([1.0, 3.0], [[-2.0, 0.0], [2.0, 1.0]], [[0.5, 0.5], [1.0, 0.2]])
    n = 200_000
    x, labels = mixture.sample(n, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64, return_labels=True)
    frac = labels.double().mean().item()
    assert abs(frac - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)
    mean = (mixture.weights[:, None] * mixture.means).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=4 * 2.5 / math.sqrt(n))


def test_class_posterior_and_conditional_score():
    mixture = GaussianMixture.ring()
    sde = sde_lib.VESDE()
    x = mixture.sample_marginal(8, sde, 0.5, generator=torch.Generator().manual_seed(2),
                                dtype=torch.float64)
    t = torch.full((8,), 0.5, dtype=torch.float64)
    post = mixture.class_log_posterior(x, t, sde).exp()
    torch.testing.assert_close(post.sum(1), torch.ones(8, dtype=torch.float64))
    # Bayes: score of p(x) + grad log p(y|x) = score of p(x|y).
    y = torch.full((8,), 3)
    xr = x.clone().requires_grad_(True)
    (grad_cls,) = torch.autograd.grad(
        mixture.class_log_posterior(xr, t, sde)[:, 3].sum(), xr
    )
    torch.testing.assert_close(mixture.score(x, t, sde) + grad_cls,
                               mixture.score(x, t, sde, label=y))
    # The one-component mixture's score is the conditional score.
    torch.testing.assert_close(mixture.component(3).score(x, t, sde),
                               mixture.score(x, t, sde, label=y))


def test_image_shaped_input_and_bad_shapes():
    mixture = GaussianMixture.random(12, 2)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    s = mixture.score(x, torch.full((4,), 0.5, dtype=torch.float64), sde_lib.VPSDE())
    assert s.shape == x.shape
    with pytest.raises(ValueError, match="D=12"):
        mixture.log_prob(torch.randn(4, 5))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([1.0, -1.0], [[0.0], [1.0]], 1.0)


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_log_density_solves_the_fokker_planck_equation(sde):
    """p_t of the oracle solves the forward Kolmogorov equation of the SDE (Song et al. 2021,
    App. D), independently of how the oracle derives its marginals. For a linear drift
    f = a(t) x, in log form L = log p_t:
    dL/dt = -D a - a x . grad L + g^2 / 2 (lap L + |grad L|^2). Autograd in float64."""
    mixture = GaussianMixture.random(3, 3, seed=4)
    D = mixture.dim
    x0 = mixture.sample_marginal(12, sde, 0.4, generator=torch.Generator().manual_seed(5),
                                 dtype=torch.float64)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95] * 2, dtype=torch.float64)
    x, t = x0.clone().requires_grad_(True), t.clone().requires_grad_(True)
    L = mixture.log_prob(x, t, sde)  # (B,)
    grad_x, dL_dt = torch.autograd.grad(L.sum(), (x, t), create_graph=True)
    lap = sum(torch.autograd.grad(grad_x[:, i].sum(), x, retain_graph=True)[0][:, i]
              for i in range(D))
    drift, diffusion = sde.sde(torch.ones_like(x0), t.detach())
    a = drift[:, 0]  # f = a(t) x
    rhs = -D * a - a * (x * grad_x).sum(1) + 0.5 * diffusion**2 * (lap + grad_x.square().sum(1))
    torch.testing.assert_close(dL_dt, rhs, rtol=1e-8, atol=1e-8)
    doubled_g2 = rhs + 0.5 * diffusion**2 * (lap + grad_x.square().sum(1))
    assert (dL_dt - doubled_g2).abs().max() > 1e-2  # a factor-2 error is far outside rtol
