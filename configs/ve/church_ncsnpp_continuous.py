"""NCSN++ (cont.) on LSUN church_outdoor 256x256 with the VE SDE (images from a folder)."""

from configs.ve import bedroom_ncsnpp_continuous


def get_config():
    """The reference's ``configs/ve/church_ncsnpp_continuous.py``: the bedroom config with
    sigma_max 380; images in ``data/lsun_church_outdoor/``."""
    config = bedroom_ncsnpp_continuous.get_config()
    config.data.root = 'data/lsun_church_outdoor'
    config.model.sigma_max = 380
    return config
