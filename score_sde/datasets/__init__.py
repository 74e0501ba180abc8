"""Datasets: CIFAR-10 (official tarball), image folders, the embedded 8x8 digits, 2-D toys and
the analytic Gaussian mixture, behind one loader registry and one resumable iterator.

``config.data.dataset`` names the loader (``CIFAR10``, ``folder``, ``digits``, ``toy_2d``,
``gmm``; ``imagenet_latents`` is refused with directions: latents are encoded from an image
folder by the config's autoencoder, ``training.latent_data``); ``get_data_scaler`` /
``get_data_inverse_scaler`` map [0, 1] to model space and back
(``data.centered``), as in the reference.

Image folders are decoded in worker processes ahead of the step (``data.num_workers``,
:mod:`datasets.workers`) and, with ``data.cache``, once into a memory-mapped decode cache
(:mod:`datasets.cache`, :func:`datasets.folder.cached`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from score_sde.datasets import (  # noqa: F401  (registers the loaders)
    cifar10,
    digits,
    folder,
    latents,
    toy,
    workers,
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


def decodes_files(dataset: ArrayDataset) -> bool:
    """Whether ``dataset``'s samples come from image files (decoded or cached), not memory."""
    return isinstance(dataset.data, (folder.FolderImages, folder.CachedImages))


def cache_folder(config, workdir: str | os.PathLike | None = None) -> Path | None:
    """Where ``config.data.cache`` puts decoded images: None for ``'none'``; for ``'auto'``,
    ``workdir/data_cache`` (None without a workdir); otherwise the path it names (a cache that
    several runs may share).

    Raises:
        ValueError: an empty value.
    """
    value = config.data.get("cache", "none")
    if not isinstance(value, str) or not value:
        raise ValueError(f"config.data.cache must be 'none', 'auto' or a folder, got {value!r}")
    if value == "none":
        return None
    if value == "auto":
        return None if workdir is None else Path(workdir) / "data_cache"
    return Path(value).expanduser()


def num_data_workers(config, dataset: ArrayDataset) -> int:
    """``config.data.num_workers`` resolved for ``dataset``: ``'auto'`` (the default) is
    min(4, available cores) for image files and 0 for data in memory."""
    return workers.resolve_num_workers(config.data.get("num_workers", "auto"),
                                       decodes_files(dataset))


def check_loader_config(config) -> None:
    """Check the loader keys ``data.num_workers``, ``data.cache`` and ``data.alpha_background``
    before any work (each raises ValueError naming the value and what is allowed)."""
    workers.resolve_num_workers(config.data.get("num_workers", "auto"), True)
    cache_folder(config)
    folder.alpha_background(config)


def get_dataset(config, split: str = "train", *,
                workdir: str | os.PathLike | None = None) -> ArrayDataset:
    """Load ``split`` of the dataset named by ``config.data.dataset``; image files are read
    through the decode cache of ``config.data.cache`` (:func:`cache_folder`; ``'auto'`` needs
    ``workdir``), which the first call builds (decoding with ``num_workers`` processes)."""
    dataset = DATASETS.get(config.data.dataset)(config, split)
    where = cache_folder(config, workdir)
    if where is not None and isinstance(dataset.data, folder.FolderImages):
        dataset = folder.cached(dataset, where, num_data_workers(config, dataset))
    return dataset


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
    num_workers: int | None = None,
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
        num_workers: processes building batches ahead; default ``config.data.num_workers``
            resolved by :func:`num_data_workers`. The batches are the same bits for every value.
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
        num_workers=num_data_workers(config, dataset) if num_workers is None else num_workers,
    )


__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DataIterator",
    "cache_folder",
    "check_loader_config",
    "data_shape",
    "decodes_files",
    "get_data_inverse_scaler",
    "get_data_iterator",
    "get_data_scaler",
    "get_dataset",
    "num_data_workers",
    "register_dataset",
]
