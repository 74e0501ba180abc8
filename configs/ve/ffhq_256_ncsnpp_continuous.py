"""NCSN++ (cont.) on FFHQ 256x256 with the VE SDE (images from a folder)."""

from configs.ve import bedroom_ncsnpp_continuous


def get_config():
    """The reference's ``configs/ve/ffhq_256_ncsnpp_continuous.py``: the LSUN model with
    sigma_max 348; FFHQ 256 images in ``data/ffhq_256/``."""
    config = bedroom_ncsnpp_continuous.get_config()
    config.data.root = 'data/ffhq_256'
    config.model.sigma_max = 348
    return config
