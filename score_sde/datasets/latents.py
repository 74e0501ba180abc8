"""Image datasets in a latent space (SD-VAE latents of DiT, Peebles & Xie 2023): not available yet.

``imagenet_latents`` names ImageNet encoded by the SD-VAE (4x32x32 latents of 256 px images), the
training data of the official DiT. This toolkit has no encoder and no such data yet (the
latent-space support will add them), so the loader refuses with a message saying so; configs
that only sample an official checkpoint (``imagenet256_dit_xl2``) never load it.
"""

from __future__ import annotations

from score_sde.datasets.base import ArrayDataset, register_dataset


@register_dataset("imagenet_latents")
def load_imagenet_latents(config, split: str) -> ArrayDataset:
    """Refuse: ImageNet SD-VAE latents are not available in this toolkit yet.

    Raises:
        NotImplementedError: always, naming the dataset and what works instead.
    """
    raise NotImplementedError(
        f"ImageNet encoded into SD-VAE latents ({split} split) is not available here: no data "
        "and no encoder until the latent-space support lands, so this config cannot train; it "
        "samples an official DiT checkpoint: --mode sample --checkpoint /path/DiT-XL-2-256x256.pt")
