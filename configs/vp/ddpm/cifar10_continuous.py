"""DDPM's U-Net trained with the continuous VP SDE objective: Song et al. 2021, table 2."""

from configs.vp.ddpm import cifar10


def get_config():
    """The reference's ``configs/vp/ddpm/cifar10_continuous.py``."""
    config = cifar10.get_config()
    config.training.continuous = True
    config.sampling.predictor = 'euler_maruyama'
    return config
