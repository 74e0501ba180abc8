"""Controllable generation: inpainting, colorization, classifier and classifier-free guidance,
checked against exact conditionals of Gaussian (mixture) data."""

from __future__ import annotations

import math

import pytest
import torch
from test_samplers_pc import RING, SDE_NAMES, Counter, assert_matches_exact, make_sde

from samplers import sample
from samplers.controllable import (
    COLOR_TRANSFORM,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    colorize,
    couple,
    decouple,
    inpaint,
)
from samplers.reference import get_pc_colorizer, get_pc_inpainter
from score_sde.oracle import GaussianMixture

F64 = torch.float64
#: Independent coordinates: a one-component mixture with distinct means and stds.
GAUSS = GaussianMixture(torch.ones(1), torch.tensor([[1.0, -2.0, 0.5, 3.0]]),
                        torch.tensor([[0.3, 0.5, 0.8, 0.4]]))
#: PC with ``ald``: its step depends on t only. The ``langevin`` step follows each sample's score
#: norm and so inflates variances in low D (4-15 % here in 4-D; see LangevinCorrector).
METHODS = [
    ("pc", dict(predictor="reverse_diffusion", corrector="ald", snr=0.05, N=500)),
    ("ode", dict()),
]


def assert_gaussian(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Per coordinate: sample mean within 4 SE (std / sqrt(n)) and sample variance within 4 SE
    (var sqrt(2 / (n - 1))) of the exact values; a factor 2 in either fails."""
    n = x.shape[0]
    z_mean = (x.mean(0) - mean) / (std / math.sqrt(n))
    z_var = (x.var(0) - std**2) / (std**2 * math.sqrt(2 / (n - 1)))
    assert z_mean.abs().max() < 4, z_mean
    assert z_var.abs().max() < 4, z_var


# The ODE on every SDE; the PC sampler (500 steps of predictor and corrector) on VP by default,
# on sub-VP and VE under slow.
@pytest.mark.parametrize("method,options,sde_name", [
    pytest.param(method, options, sde_name, id=f"{method}-{sde_name}",
                 marks=pytest.mark.slow if method == "pc" and sde_name != "vp" else ())
    for method, options in METHODS for sde_name in SDE_NAMES])
def test_inpainting_keeps_known_entries_and_samples_the_exact_marginal(method, options,
                                                                       sde_name):
    sde = make_sde(sde_name)
    n = 2000
    data = GAUSS.sample(n, generator=torch.Generator().manual_seed(0), dtype=F64)
    mask = torch.tensor([True, False, True, False]).expand(n, 4)
    x, info = inpaint(sde, GAUSS.score_fn(sde), data, mask, method, dtype=F64,
                      generator=torch.Generator().manual_seed(1), **options)
    assert torch.equal(x[mask], data[mask])
    assert_gaussian(x[:, ~mask[0]], GAUSS.means[0, ~mask[0]], GAUSS.stds[0, ~mask[0]])
    assert info["nfe"] > 0


@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
def test_inpainting_with_nothing_known_is_unconditional_sampling(method, options):
    """Same x_T, same loop, same denoising: bitwise the unconditional samples."""
    sde = make_sde("vp", N=50)
    options = {**options, "N": 50} if method == "pc" else options
    data = torch.zeros(8, 2, dtype=F64)
    mask = torch.zeros(8, 2, dtype=torch.bool)
    x, _ = inpaint(sde, RING.score_fn(sde), data, mask, method, seeds=range(8), **options)
    y, _ = sample(sde, RING.score_fn(sde), (8, 2), method, seeds=range(8), dtype=F64, **options)
    assert torch.equal(x, y)


def test_inpainting_ignores_unknown_entries_and_checks_the_mask():
    sde = make_sde("ve", N=20)
    data = torch.tensor([[1.0, float("nan")]], dtype=F64)
    x, _ = inpaint(sde, RING.score_fn(sde), data, torch.tensor([True, False]), "pc", N=20)
    assert x[0, 0] == 1.0 and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="does not broadcast"):
        inpaint(sde, RING.score_fn(sde), data, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        inpaint(sde, RING.score_fn(sde), data, torch.tensor([0.5, 1.0]))


def test_colour_transform_is_the_references_orthonormal_matrix():
    M = COLOR_TRANSFORM
    torch.testing.assert_close(M.T @ M, torch.eye(3, dtype=F64), atol=1e-6, rtol=0)
    torch.testing.assert_close(M[:, 0], torch.full((3,), 1 / math.sqrt(3), dtype=F64),
                               atol=1e-6, rtol=0)
    x = torch.randn(2, 3, 4, 5, dtype=F64)
    torch.testing.assert_close(couple(decouple(x)), x)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_colorization_keeps_grey_and_samples_the_exact_chroma(sde_name):
    """Isotropic per-pixel colour noise is independent in any orthonormal colour basis, so the
    chroma channels of the result follow their exact marginal."""
    sde = make_sde(sde_name)
    n, H, W = 1000, 1, 2
    means = torch.tensor([0.5, -0.3, 0.1, 0.8, 0.0, -0.6], dtype=F64)  # (C, H, W) flattened
    stds = torch.tensor([0.4, 0.3, 0.4, 0.3, 0.4, 0.3], dtype=F64)  # equal across channels
    gm = GaussianMixture(torch.ones(1), means[None], stds[None])
    images = gm.sample(n, generator=torch.Generator().manual_seed(0), dtype=F64)
    images = images.reshape(n, 3, H, W)
    gray = couple(decouple(images) * torch.tensor([1.0, 0, 0], dtype=F64)[None, :, None, None])
    x, _ = colorize(sde, gm.score_fn(sde), gray, "pc", predictor="reverse_diffusion",
                    corrector="none", N=500, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(decouple(x)[:, 0], decouple(gray)[:, 0], rtol=0, atol=1e-12)
    chroma = decouple(x)[:, 1:].reshape(n, -1)
    exact_mean = decouple(means.reshape(1, 3, H, W))[:, 1:].reshape(-1)
    assert_gaussian(chroma, exact_mean, stds.reshape(3, H * W)[1:].reshape(-1))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        colorize(sde, gm.score_fn(sde), gray[:, :2])


def ring_classifier(sde):
    """The ring's exact time-t classifier log p_t(y | x) (B,)."""
    return lambda x, t, y: RING.class_log_posterior(x, t, sde).gather(1, y[:, None])[:, 0]


@pytest.mark.parametrize("sde_name", [  # VP by default, sub-VP and VE under slow
    n if n == "vp" else pytest.param(n, marks=pytest.mark.slow) for n in SDE_NAMES])
def test_classifier_guidance_at_scale_one_samples_the_class(sde_name):
    sde = make_sde(sde_name)
    score = ClassifierGuidance(RING.score_fn(sde), ring_classifier(sde), y=3, scale=1.0)
    x, _ = sample(sde, score, (500, 2), "pc", predictor="reverse_diffusion", corrector="none",
                  N=500, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert_matches_exact(RING.component(3), x)
    assert (RING.component_log_prob(x).argmax(1) == 3).double().mean() > 0.99


@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_classifier_free_guidance_at_weight_zero_samples_the_class(sde_name):
    sde = make_sde(sde_name)
    cfg = ClassifierFreeGuidance(RING.score_fn(sde, label=5), RING.score_fn(sde), w=0.0)
    counter = Counter(cfg)
    counter.nfe_per_call = cfg.nfe_per_call
    x, info = sample(sde, counter, (500, 2), "ode", dtype=F64,
                     generator=torch.Generator().manual_seed(0))
    assert info["nfe"] == counter.calls
    assert_matches_exact(RING.component(5), x)
    assert (RING.component_log_prob(x).argmax(1) == 5).double().mean() > 0.99


def test_classifier_free_guidance_is_classifier_guidance_with_exact_scores():
    """(1 + w) grad log p_t(x|y) - w grad log p_t(x) = grad log p_t(x|y) + w grad log p_t(y|x):
    an identity for exact scores, so CFG at w equals classifier guidance at scale 1 + w."""
    sde = make_sde("vp")
    x = 4 * torch.randn(16, 2, dtype=F64)
    t = torch.rand(16, dtype=F64) * 0.9 + 0.05
    for w in (0.0, 0.5, 3.0):
        cfg = ClassifierFreeGuidance(RING.score_fn(sde, label=2), RING.score_fn(sde), w=w)
        cg = ClassifierGuidance(RING.score_fn(sde), ring_classifier(sde), y=2, scale=1 + w)
        torch.testing.assert_close(cfg(x, t), cg(x, t), rtol=1e-9, atol=1e-9)


def test_reference_inpainter_and_colorizer():
    sde = make_sde("vp", N=20)
    data = torch.randn(4, 3, 2, 2, dtype=F64)
    mask = torch.zeros_like(data, dtype=torch.bool)
    mask[..., 0] = True
    score_fn = GaussianMixture(torch.ones(1), torch.zeros(1, 12), 0.5).score_fn(sde)
    inpainter = get_pc_inpainter(sde, "reverse_diffusion", "langevin", lambda x: x, snr=0.16,
                                 to_score_fn=lambda model, continuous: model)
    x = inpainter(score_fn, data, mask)
    assert torch.equal(x[mask], data[mask])
    gray = data.mean(1, keepdim=True).expand(4, 3, 2, 2)
    colorizer = get_pc_colorizer(sde, "euler_maruyama", "none", lambda x: x, snr=0.16)
    x = colorizer(score_fn, gray)
    torch.testing.assert_close(x.mean(1), gray.mean(1))


def test_classifier_free_guidance_counts_two_evaluations():
    sde = make_sde("vp", N=10)
    cfg = ClassifierFreeGuidance(RING.score_fn(sde, label=0), RING.score_fn(sde), w=2.0)
    _, info = sample(sde, cfg, (4, 2), "pc", corrector="none")
    assert info["nfe"] == 2 * 10
