"""Datasets: CIFAR-10 (official tarball), image folders, the embedded 8x8 digits, 2-D toys and
the analytic Gaussian mixture, behind one loader registry and one resumable iterator.

``config.data.dataset`` names the loader (``CIFAR10``, ``folder``, ``digits``, ``toy_2d``,
``gmm``; ``imagenet_latents``, DiT's SD-VAE latents, is named but refused until the latent-space
support lands); ``get_data_scaler`` / ``get_data_inverse_scaler`` map [0, 1] to model space and back
(``data.centered``), as in the reference.
"""

from __future__ import annotations

import torch

from score_sde.datasets import (  # noqa: F401  (registers the loaders)
    cifar10,
    digits,
    folder,
    latents,
    toy,
)
from score_sde.datasets.base import (
    DATASETS,
    ArrayDataset,
    DataIterator,
    get_data_inverse_scaler,
    get_data_scaler,
    register_dataset,
)


def data_shape(config) -> tuple[int, ...]:
    """Shape of one sample: (C, H, W) for images, (D,) for point data (``data.dim``)."""
    if "dim" in config.data:
        return (config.data.dim,)
    return (config.data.num_channels, config.data.image_size, config.data.image_size)


def get_dataset(config, split: str = "train") -> ArrayDataset:
    """Load ``split`` of the dataset named by ``config.data.dataset``."""
    return DATASETS.get(config.data.dataset)(config, split)


def get_data_iterator(
    config,
    split: str = "train",
    *,
    batch_size: int | None = None,
    train: bool = True,
    seed: int | None = None,
    dataset: ArrayDataset | None = None,
    device: torch.device | str | None = None,
    with_labels: bool = False,
) -> DataIterator:
    """A seeded batch iterator over ``split`` with the config's augmentation.

    Args:
        config: the experiment config (``data.*``, ``training.batch_size``, ``seed``).
        split: 'train' or 'test'.
        batch_size: default ``config.training.batch_size``.
        train: shuffle endlessly with random flips (as the reference's training pipeline);
            ``False`` gives one ordered pass without flips (evaluation).
        seed: default ``config.seed``.
        dataset: an already loaded dataset (else loaded here).
        device: where batches go.
        with_labels: yield ``(x, y)`` with the class labels y (B,) (class-conditional runs).
    Returns:
        An iterator of (B, *data_shape(config)) float tensors in [0, 1] (model space comes from
        ``get_data_scaler``), or of ``(x, y)`` pairs ``with_labels``.
    """
    dataset = dataset if dataset is not None else get_dataset(config, split)
    return DataIterator(
        dataset,
        batch_size or config.training.batch_size,
        seed=config.seed if seed is None else seed,
        shuffle=train,
        random_flip=train and config.data.random_flip,
        uniform_dequantization=config.data.uniform_dequantization,
        device=device,
        with_labels=with_labels,
    )


__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DataIterator",
    "data_shape",
    "get_data_inverse_scaler",
    "get_data_iterator",
    "get_data_scaler",
    "get_dataset",
    "register_dataset",
]
