"""NCSN++ on CIFAR-10 trained with the discrete SMLD objective: Song et al. 2021, table 2."""

from configs.ve import cifar10_ncsnpp_continuous


def get_config():
    """The reference's ``configs/ve/cifar10_ncsnpp.py``: discrete noise levels, positional
    embedding of the level index."""
    config = cifar10_ncsnpp_continuous.get_config()
    config.training.continuous = False
    config.model.embedding_type = 'positional'
    return config
