"""DDPM++ on CIFAR-10 trained with the discrete DDPM objective: Song et al. 2021, table 2."""

from configs.vp import cifar10_ddpmpp_continuous


def get_config():
    """The reference's ``configs/vp/cifar10_ddpmpp.py``: discrete training, ancestral sampling."""
    config = cifar10_ddpmpp_continuous.get_config()
    config.training.continuous = False
    config.sampling.predictor = 'ancestral_sampling'
    return config
