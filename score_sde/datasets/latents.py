"""``imagenet_latents``: a name kept so that old configs fail with directions, not a dataset.

ImageNet in SD-VAE latents (the training data of the official DiT, Peebles & Xie 2023) is made
here by latent training itself: an ImageNet image folder (``data.dataset = 'folder'``) encoded by
the SD VAE of ``data.autoencoder`` (name ``'sd_vae'``), the posteriors cached once
(``training.latent_data``; ``configs/imagenet256_dit_xl2.py``). Pre-encoded latent files are not
read: they would fix one draw of q(z | x) and one flip per image.
"""

from __future__ import annotations

from score_sde.datasets.base import ArrayDataset, register_dataset


@register_dataset("imagenet_latents")
def load_imagenet_latents(config, split: str) -> ArrayDataset:
    """Refuse, saying how ImageNet latents are made instead.

    Raises:
        NotImplementedError: always, naming the dataset and the keys to set.
    """
    raise NotImplementedError(
        f"data.dataset = 'imagenet_latents' ({split} split) is not a dataset: latents are encoded "
        "from the images by the config's autoencoder: set data.dataset = 'folder', data.root = "
        "<ImageNet train folder> and data.autoencoder.name = 'sd_vae' with data.autoencoder.path "
        "= <local sd-vae-ft-ema folder> (as configs/imagenet256_dit_xl2.py does)")
