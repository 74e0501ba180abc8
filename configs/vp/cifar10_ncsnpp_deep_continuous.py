"""NCSN++ cont. (deep) on CIFAR-10 with the VP SDE: Song et al. 2021, table 3."""

from configs.vp import cifar10_ncsnpp_continuous


def get_config():
    """The reference's ``configs/vp/cifar10_ncsnpp_deep_continuous.py``: 8 blocks per level."""
    config = cifar10_ncsnpp_continuous.get_config()
    config.training.n_iters = 950001
    config.model.num_res_blocks = 8
    return config
