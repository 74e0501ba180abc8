"""Autoencoders of the latent score SDEs: the interface (:mod:`.base`), the toolkit's own KL
autoencoder (:mod:`.kl`) and pretrained SD VAEs through diffusers (:mod:`.diffusers_vae`)."""

from models.autoencoders.base import (
    AUTOENCODERS,
    Autoencoder,
    create_autoencoder,
    gaussian_entropy,
    gaussian_log_prob,
    get_autoencoder,
    kl_to_standard_normal,
    register_autoencoder,
)
from models.autoencoders.kl import KLAutoencoder, autoencoder_loss

__all__ = [
    "AUTOENCODERS",
    "Autoencoder",
    "KLAutoencoder",
    "autoencoder_loss",
    "create_autoencoder",
    "gaussian_entropy",
    "gaussian_log_prob",
    "get_autoencoder",
    "kl_to_standard_normal",
    "register_autoencoder",
]
