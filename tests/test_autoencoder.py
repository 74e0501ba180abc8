"""The autoencoder interface (models.autoencoders) and the toolkit's own KL autoencoder:
closed-form entropy and KL, the model-space latent map, the loss, and a short digits run."""

from __future__ import annotations

import math

import ml_collections
import pytest
import torch

from models.autoencoders import (
    KLAutoencoder,
    autoencoder_loss,
    create_autoencoder,
    gaussian_entropy,
    gaussian_log_prob,
    kl_to_standard_normal,
)


def _digits(split: str) -> torch.Tensor:
    from score_sde.datasets.digits import load_digits

    config = ml_collections.ConfigDict({"data": {"num_channels": 1, "image_size": 8}})
    return load_digits(config, split).data * 2.0 - 1.0  # (N, 1, 8, 8) in [-1, 1]


def test_entropy_kl_and_log_prob_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    log_std = 0.5 * torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mean, log_std.exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(gaussian_entropy(log_std), q.entropy().flatten(1).sum(1))
    torch.testing.assert_close(kl_to_standard_normal(mean, log_std),
                               torch.distributions.kl_divergence(q, p).flatten(1).sum(1))
    z = mean + log_std.exp() * torch.randn(mean.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gaussian_log_prob(z, mean, log_std), q.log_prob(z).flatten(1).sum(1))


def test_posterior_entropy_and_kl_of_the_model_space_latent():
    """encode applies z_model = (z - shift) * scale once: mean and log-std move, the entropy
    gains D log scale, and the KL is the closed form of the model-space posterior."""
    torch.manual_seed(0)
    ae = KLAutoencoder(1, latent_channels=2, channels=8).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    raw_mean, raw_log_std = ae.encode_raw(x)
    ae.set_latent_scale(2.5, shift=0.3)
    mean, log_std = ae.encode(x)
    torch.testing.assert_close(mean, (raw_mean - 0.3) * 2.5)
    torch.testing.assert_close(log_std, raw_log_std + math.log(2.5))
    D = raw_mean[0].numel()
    torch.testing.assert_close(ae.posterior_entropy(x),
                               gaussian_entropy(raw_log_std) + D * math.log(2.5))
    q = torch.distributions.Normal(mean, log_std.exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(ae.posterior_kl(x),
                               torch.distributions.kl_divergence(q, p).flatten(1).sum(1))
    # decode inverts the map once: decode(encode mean) is the network's decoder at the raw mean
    torch.testing.assert_close(ae.decode(mean), ae.decode_raw(raw_mean))


def test_sample_latent_draws_the_posterior():
    torch.manual_seed(1)
    ae = KLAutoencoder(1, latent_channels=2, channels=8).double()
    x = (torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1).expand(4000, -1, -1, -1)
    mean, log_std = ae.encode(x[:1])
    z = ae.sample_latent(x, generator=torch.Generator().manual_seed(2))
    u = (z - mean) / log_std.exp()  # standard normal if the draw is right
    n = u.shape[0]
    assert u.mean(0).abs().max() < 5 / math.sqrt(n)
    assert (u.var(0) - 1).abs().max() < 5 * math.sqrt(2 / n)
    again = ae.sample_latent(x[:3], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(again, z[:3])  # same seed, same bits


def test_inputs_of_another_dtype_are_cast_in_and_back():
    torch.manual_seed(0)
    ae = KLAutoencoder(1, latent_channels=2, channels=8)  # float32 weights
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    mean, log_std = ae.encode(x)
    assert mean.dtype == log_std.dtype == torch.float64
    torch.testing.assert_close(mean, ae.encode(x.float())[0].double())
    assert ae.decode(mean).dtype == torch.float64
    assert (ae.device, ae.dtype) == (torch.device("cpu"), torch.float32)


def test_shapes_and_validation():
    ae = KLAutoencoder(3, latent_channels=4, channels=8, channel_mult=(1, 2, 2))
    assert ae.downsampling == 4
    assert ae.latent_shape((3, 16, 32)) == (4, 4, 8)
    assert ae.decode(torch.zeros(2, 4, 4, 8)).shape == (2, 3, 16, 32)
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4"):
        ae.latent_shape((3, 10, 16))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        ae.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        ae.encode(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scale_factor must be a positive"):
        ae.set_latent_scale(0.0)
    with pytest.raises(ValueError, match="Unknown reconstruction 'l3'; valid: l1, l2"):
        autoencoder_loss(ae, torch.zeros(1, 3, 16, 16), reconstruction="l3")
    with pytest.raises(ValueError, match="beta must be"):
        autoencoder_loss(ae, torch.zeros(1, 3, 16, 16), beta=-1.0)


def test_registry_builds_from_a_config_section():
    cfg = ml_collections.ConfigDict({"name": "kl", "in_channels": 1, "latent_channels": 2,
                                     "channels": 8, "channel_mult": (1, 2, 2),
                                     "scale_factor": 0.5})
    ae = create_autoencoder(cfg)
    assert isinstance(ae, KLAutoencoder)
    assert (ae.latent_channels, ae.downsampling, ae.scale_factor) == (2, 4, 0.5)
    with pytest.raises(ValueError, match="Unknown autoencoder 'nope'; valid: kl, sd_vae"):
        create_autoencoder(ml_collections.ConfigDict({"name": "nope"}))


def test_decoder_variance_is_fitted_to_the_residual():
    """The decoder_nll term's minimum over log sigma_c is the per-channel mean squared residual
    (its gradient vanishes there, and is positive / negative above / below)."""
    torch.manual_seed(0)
    ae = KLAutoencoder(2, latent_channels=2, channels=8).double()
    x = torch.rand(8, 2, 8, 8, dtype=torch.float64) * 2 - 1
    x_hat = ae.decode_raw(ae.encode_raw(x)[0]).detach()
    best = 0.5 * torch.log((x - x_hat).square().mean(dim=(0, 2, 3)))
    for offset, sign in ((0.0, 0), (0.3, 1), (-0.3, -1)):
        ae.decoder_log_scale.data = best + offset
        ae.zero_grad()
        (-ae.decoder_log_prob(x, x_hat).mean()).backward()
        grad = ae.decoder_log_scale.grad
        if sign == 0:
            assert grad.abs().max() < 1e-9
        else:
            assert bool((torch.sign(grad) == sign).all())


@pytest.mark.parametrize("reconstruction", ["l2", "l1"])
def test_short_training_run_lowers_digit_reconstruction_error(reconstruction):
    """Two seconds of Adam on the 8x8 digits halve the held-out reconstruction error of the
    posterior mean (a broken encoder, decoder or loss sign would not)."""
    torch.manual_seed(0)
    train, test = _digits("train"), _digits("test")[:128]
    ae = KLAutoencoder(1, latent_channels=2, channels=16)
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)

    def test_mse() -> float:
        with torch.no_grad():
            return float((ae.decode(ae.encode(test)[0]) - test).square().mean())

    before = test_mse()
    for _ in range(80):
        batch = train[torch.randint(0, train.shape[0], (64,), generator=g)]
        loss, terms = autoencoder_loss(ae, batch, reconstruction=reconstruction, beta=1e-3,
                                       generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = test_mse()
    assert after < 0.5 * before, (before, after)
    assert math.isfinite(float(terms["kl"])) and float(terms["kl"]) > 0
    # the decoder variance follows the residual (MSE << 1): its log-scale fell from 0
    assert float(ae.decoder_log_scale.detach()) < -0.1


def test_without_diffusers_the_error_names_the_extra(monkeypatch, tmp_path):
    import sys

    from models.autoencoders.diffusers_vae import load_sd_vae
    from models.diffusers_unet import load_diffusers_unet

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    for load in (load_sd_vae, load_diffusers_unet):
        with pytest.raises(ImportError, match=r'pip install -e "\.\[latent\]"'):
            load(tmp_path)
