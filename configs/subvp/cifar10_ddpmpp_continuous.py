"""DDPM++ (cont.) on CIFAR-10 with the sub-VP SDE (``subvp_cifar``)."""

from configs.vp import cifar10_ddpmpp_continuous


def get_config():
    """The reference's ``configs/subvp/cifar10_ddpmpp_continuous.py``: the VP one, sub-VP SDE."""
    config = cifar10_ddpmpp_continuous.get_config()
    config.training.sde = 'subvpsde'
    return config
