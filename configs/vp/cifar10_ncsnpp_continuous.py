"""NCSN++ (cont.) on CIFAR-10 with the VP SDE: Song et al. 2021, table 3."""

from configs.vp import cifar10_ddpmpp_continuous


def get_config():
    """The reference's ``configs/vp/cifar10_ncsnpp_continuous.py``: DDPM++ (VP) plus the FIR
    resampling and the residual input pyramid of NCSN++."""
    config = cifar10_ddpmpp_continuous.get_config()
    config.model.fir = True
    config.model.progressive_input = 'residual'
    return config
