"""The one autoencoder interface of the latent score SDEs (Rombach et al. 2022; LSGM, Vahdat,
Kreis & Kautz 2021), its diagonal Gaussian posterior and the registry of implementations.

An :class:`Autoencoder` maps images x (B, C, H, W) in the data's scaling to a diagonal Gaussian
posterior q(z | x) = N(mean, diag(exp(2 log_std))) over latents (B, c, h, w) and maps latents back
to images. Subclasses implement the raw network maps :meth:`Autoencoder.encode_raw` and
:meth:`Autoencoder.decode_raw`; everything downstream calls the public methods.

**Where the latent scale is applied.** The score model works in the *model space*

    z_model = (z - shift) * scale_factor,

(z the raw latent of the network; ``scale_factor`` 0.18215 for the SD VAEs). The map is applied
exactly once, here: :meth:`Autoencoder.encode` returns the posterior of z_model (mean shifted and
scaled, log_std + log scale_factor) and :meth:`Autoencoder.decode` takes z_model and inverts the
map before the network's decoder. Callers never scale latents themselves. Densities of z_model
(entropy, KL, the latent ODE likelihood) are therefore all in the same space.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from score_sde.utils import Registry, sum_except_batch

AUTOENCODERS = Registry("autoencoder")
register_autoencoder = AUTOENCODERS.register

_LOG_2PI = math.log(2 * math.pi)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy of N(mean, diag(exp(2 log_std))) per sample, in nats:
    H = sum_i (log_std_i + (1 + log 2 pi) / 2).

    Args:
        log_std: (B, *D) log standard deviations.
    Returns:
        (B,) entropies.
    """
    return sum_except_batch(log_std + 0.5 * (1.0 + _LOG_2PI))


def kl_to_standard_normal(mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(std^2)) || N(0, I)) per sample, in nats (Kingma & Welling 2014, App. B):
    sum_i (mean_i^2 + std_i^2 - 1) / 2 - log_std_i.

    Args:
        mean, log_std: (B, *D).
    Returns:
        (B,) divergences.
    """
    return sum_except_batch(0.5 * (mean.square() + torch.exp(2.0 * log_std) - 1.0) - log_std)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(2 log_std))) per sample (B,), for z, mean, log_std (B, *D)."""
    u = (z - mean) * torch.exp(-log_std)
    return sum_except_batch(-0.5 * u.square() - log_std - 0.5 * _LOG_2PI)


def _check_scale(scale_factor, shift) -> tuple[float, float]:
    ok = isinstance(scale_factor, (int, float)) and not isinstance(scale_factor, bool)
    if not ok or not math.isfinite(scale_factor) or scale_factor <= 0:
        raise ValueError(f"scale_factor must be a positive finite number, got {scale_factor!r}")
    ok = isinstance(shift, (int, float)) and not isinstance(shift, bool)
    if not ok or not math.isfinite(shift):
        raise ValueError(f"shift must be a finite number, got {shift!r}")
    return float(scale_factor), float(shift)


class Autoencoder(nn.Module):
    """A Gaussian-posterior autoencoder with the latent scale of :mod:`models.autoencoders.base`.

    Subclasses set ``in_channels``, ``latent_channels`` and ``downsampling`` (the spatial factor
    between image and latent) and implement :meth:`encode_raw` / :meth:`decode_raw`.

    Args:
        scale_factor: z_model = (z - shift) * scale_factor; > 0.
        shift: see ``scale_factor``.
    """

    in_channels: int
    latent_channels: int
    downsampling: int

    def __init__(self, scale_factor: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        self.set_latent_scale(scale_factor, shift)

    def set_latent_scale(self, scale_factor: float, shift: float = 0.0) -> None:
        """Set the model-space map z_model = (z - shift) * scale_factor (validated)."""
        self.scale_factor, self.shift = _check_scale(scale_factor, shift)

    # -- what a subclass implements ------------------------------------------------------------

    def encode_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's posterior of the raw latent z: (mean, log_std), each (B, c, h, w)."""
        raise NotImplementedError

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """The network's decoder output (B, C, H, W) for raw latents z (B, c, h, w)."""
        raise NotImplementedError

    # -- the interface ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device of the weights (inputs are moved there, outputs moved back)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights (inputs are cast to it, outputs cast back)."""
        return next(self.parameters()).dtype

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The latent (c, h, w) of an image (C, H, W) (or (B, C, H, W): the batch is dropped).

        Raises:
            ValueError: a wrong channel count, or sides not divisible by ``downsampling``.
        """
        shape = tuple(int(s) for s in image_shape)[-3:]
        if len(shape) != 3 or shape[0] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: image shape must be ({self.in_channels}, "
                             f"H, W), got {tuple(image_shape)}")
        _, H, W = shape
        f = self.downsampling
        if H % f or W % f:
            raise ValueError(f"{type(self).__name__}: image sides {H}x{W} must be divisible by "
                             f"the downsampling factor {f}")
        return self.latent_channels, H // f, W // f

    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}: images must be a floating tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: images must be (B, {self.in_channels}, "
                             f"H, W), got {tuple(x.shape)}")
        self.latent_shape(x.shape)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior q(z_model | x) = N(mean, diag(exp(2 log_std))) in model space
        (z_model = (z - shift) * scale_factor, the only place it is applied on the way in).

        Args:
            x: (B, C, H, W) images in the data's scaling ([-1, 1] for the SD VAEs); any device
                and floating dtype: moved to the autoencoder's, results moved back.
        Returns:
            (mean, log_std), each (B, c, h, w) on ``x``'s device, in its dtype.
        """
        self._check_images(x)
        mean, log_std = self.encode_raw(x.to(device=self.device, dtype=self.dtype))
        mean = (mean - self.shift) * self.scale_factor
        log_std = log_std + math.log(self.scale_factor)
        return mean.to(device=x.device, dtype=x.dtype), log_std.to(device=x.device, dtype=x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) for model-space latents z_model (B, c, h, w): the decoder at
        z = z_model / scale_factor + shift (the only place the map is inverted); on z's device,
        in its dtype."""
        if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.dim() != 4 \
                or z.shape[1] != self.latent_channels:
            raise ValueError(f"{type(self).__name__}: latents must be a floating (B, "
                             f"{self.latent_channels}, h, w) tensor, got "
                             f"{getattr(z, 'shape', type(z).__name__)}")
        z_raw = z.to(device=self.device, dtype=self.dtype) / self.scale_factor + self.shift
        return self.decode_raw(z_raw).to(device=z.device, dtype=z.dtype)

    def sample_latent(self, x: torch.Tensor, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
        """A draw z_model = mean + exp(log_std) * e, e ~ N(0, I), of q(z_model | x) (B, c, h, w)
        (the reparameterisation, Kingma & Welling 2014, eq. 10)."""
        mean, log_std = self.encode(x)
        e = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(log_std) * e

    def posterior_entropy(self, x: torch.Tensor) -> torch.Tensor:
        """H[q(z_model | x)] per sample (B,) in nats (closed form, :func:`gaussian_entropy`)."""
        return gaussian_entropy(self.encode(x)[1])

    def posterior_kl(self, x: torch.Tensor) -> torch.Tensor:
        """KL(q(z_model | x) || N(0, I)) per sample (B,) in nats (:func:`kl_to_standard_normal`)."""
        return kl_to_standard_normal(*self.encode(x))

    def describe(self) -> dict:
        """What a record says of this autoencoder (kind, shapes, the latent scale)."""
        return {"kind": type(self).__name__, "latent_channels": self.latent_channels,
                "downsampling": self.downsampling, "scale_factor": self.scale_factor,
                "shift": self.shift}


def get_autoencoder(name: str):
    """The autoencoder builder registered as ``name`` (``kl``: the toolkit's own; ``sd_vae``:
    a diffusers AutoencoderKL from local files)."""
    import models.autoencoders.diffusers_vae  # noqa: F401  (registers sd_vae)
    import models.autoencoders.kl  # noqa: F401  (registers kl)
    return AUTOENCODERS.get(name)


def create_autoencoder(ae_config) -> Autoencoder:
    """Build the autoencoder a config section describes: ``ae_config.name`` picks the builder
    (:func:`get_autoencoder`), which reads the rest of the section (see each builder)."""
    name = ae_config.get("name") if hasattr(ae_config, "get") else None
    if not isinstance(name, str):
        raise ValueError(f"an autoencoder config needs a 'name' (kl, sd_vae or another "
                         f"registered autoencoder), got {name!r}")
    return get_autoencoder(name).from_config(ae_config)


__all__ = [
    "AUTOENCODERS",
    "Autoencoder",
    "create_autoencoder",
    "gaussian_entropy",
    "gaussian_log_prob",
    "get_autoencoder",
    "kl_to_standard_normal",
    "register_autoencoder",
]
