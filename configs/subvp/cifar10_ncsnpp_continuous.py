"""NCSN++ (cont.) on CIFAR-10 with the sub-VP SDE: Song et al. 2021, table 3."""

from configs.vp import cifar10_ncsnpp_continuous


def get_config():
    """The reference's ``configs/subvp/cifar10_ncsnpp_continuous.py``."""
    config = cifar10_ncsnpp_continuous.get_config()
    config.training.sde = 'subvpsde'
    return config
