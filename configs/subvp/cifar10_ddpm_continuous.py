"""DDPM's U-Net trained with the continuous sub-VP SDE objective: Song et al. 2021, table 2."""

from configs.vp.ddpm import cifar10_continuous


def get_config():
    """The reference's ``configs/subvp/cifar10_ddpm_continuous.py``."""
    config = cifar10_continuous.get_config()
    config.training.sde = 'subvpsde'
    return config
