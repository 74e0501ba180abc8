"""In-memory datasets, seeded resumable batch iterators and the data scalers.

Every loader returns an :class:`ArrayDataset`: a tensor of samples in [0, 1] (images as integer
levels or float, toy data as float points) and integer labels. :class:`DataIterator` cuts it into
shuffled batches; its position is a small ``state_dict`` so a resumed run sees the same batches
(and the same flips and dequantisation noise) as an uninterrupted one. Batch b of epoch e is a
pure function of (seed, e, b) (:meth:`DataIterator.batch_at`), so worker processes can build the
next batches ahead of the step (``num_workers``, :mod:`datasets.workers`) without changing a bit.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from score_sde.datasets.workers import Prefetcher
from score_sde.utils import Registry

#: name -> ``loader(config, split) -> ArrayDataset`` (``config.data.dataset`` names a loader).
DATASETS = Registry("dataset")
register_dataset = DATASETS.register


@dataclass
class ArrayDataset:
    """Samples held in memory.

    Attributes:
        data: (N, C, H, W) images — integer levels in [0, levels - 1] (uint8 for 8 bits, int32
            for 16) or float in [0, 1] — or (N, D) points; a tensor, or a lazily decoded image
            collection indexed the same way (``datasets.folder.FolderImages``).
        labels: (N,) int64 class labels (all 0 without classes).
        levels: number of intensity levels of the stored images (256 for 8-bit, 65536 for 16-bit,
            17 for the 8x8 digits), used by uniform dequantisation and bits/dim; ``None`` for
            continuous data.
        classes: class names, index = label.
        notes: extra clauses of the summary (an image folder's skipped files, images with alpha).
    """

    data: torch.Tensor
    labels: torch.Tensor
    levels: int | None = None
    classes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.data.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"{self.data.shape[0]} samples but {self.labels.shape[0]} labels"
            )
        if self.data.shape[0] == 0:
            raise ValueError("the dataset is empty")
        integer = not self.data.dtype.is_floating_point
        if integer and self.data.dtype != torch.uint8 and self.levels is None:
            raise ValueError(f"{self.data.dtype} levels need the number of levels (levels=None)")

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def is_image(self) -> bool:
        """True for (N, C, H, W) image data."""
        return self.data.dim() == 4

    @property
    def bit_depth(self) -> float | None:
        """Bits per sample value, log2(levels) (8, 16; 4.09 for 17 levels); None if continuous."""
        return None if self.levels is None else math.log2(self.levels)

    def summary(self) -> str:
        """One line: the sample count and shape, the bit depth (levels) and the classes."""
        kind = "images" if self.is_image else "points"
        bits = self.bit_depth
        if bits is None:
            depth = "continuous values"
        else:
            shown = f"{bits:.0f}" if bits.is_integer() else f"{bits:.2f}"
            depth = f"{shown}-bit ({self.levels} levels)"
        classes = f"{len(self.classes)} classes" if self.classes else "no classes"
        return ", ".join((f"{len(self)} {kind} of shape {tuple(self.data.shape[1:])}", depth,
                          classes, *self.notes))

    def as_float(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Samples ``index`` as float32 in [0, 1] (integer levels k -> k / (levels - 1)) or as
        stored (float images and points)."""
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        x = self.data[index]
        if x.dtype.is_floating_point:
            return x.float()
        top = 255 if self.levels is None else self.levels - 1  # uint8 without levels: 8-bit
        return x.float() / top


def _seed_of(*keys: int) -> int:
    """A 63-bit seed derived from integers (numpy's SeedSequence mixes them thoroughly)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


class DataIterator:
    """Endless shuffled batches of an :class:`ArrayDataset`, resumable from ``state_dict()``.

    Epoch e uses the permutation drawn from seed (seed, e); batch b of an epoch draws its flips
    and dequantisation noise from seed (seed, e, b). The state is just (epoch, batch), so no
    generator state is needed to resume bit for bit.

    Args:
        dataset: the samples.
        batch_size: samples per batch (the last incomplete batch of an epoch is dropped when
            ``shuffle``; without shuffling, one pass yields every sample once).
        seed: integer seed of the permutations and augmentations.
        shuffle: reshuffle every epoch (training); otherwise sequential order, one epoch.
        random_flip: flip images horizontally with probability 1/2 (the reference's augmentation).
        uniform_dequantization: add U[0, 1) noise to the integer levels, x -> (x (L-1) + u) / L.
        device: where batches are put.
        with_labels: yield ``(x, y)`` with the samples' integer class labels y (B,) (int64), for
            class-conditional training; otherwise x alone. The labels are read at the same
            indices and draw nothing, so batches, augmentations and ``state_dict`` are the same
            either way.
        num_workers: worker processes that build the next batches ahead (0: built here when
            asked). The batches are the same bits for every value; ``state_dict`` is the
            position of the last batch returned, not of the last one built.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        random_flip: bool = False,
        uniform_dequantization: bool = False,
        device: torch.device | str | None = None,
        with_labels: bool = False,
        num_workers: int = 0,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if shuffle and batch_size > len(dataset):
            raise ValueError(
                f"batch_size {batch_size} exceeds the dataset size {len(dataset)}"
            )
        if uniform_dequantization and dataset.levels is None:
            raise ValueError("uniform_dequantization needs quantised data (images)")
        if random_flip and not dataset.is_image:
            raise ValueError("random_flip applies to images only; set data.random_flip=False")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.random_flip = random_flip
        self.uniform_dequantization = uniform_dequantization
        self.device = device
        self.with_labels = bool(with_labels)
        self.num_workers = num_workers
        self.epoch = 0
        self.batch = 0
        self._order: torch.Tensor | None = None
        self._order_epoch = -1
        self._prefetcher = None  # the worker processes' batches (datasets.workers.Prefetcher)

    @property
    def batches_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        n = len(self.dataset)
        return n // self.batch_size if self.shuffle else -(-n // self.batch_size)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order_epoch != epoch:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(_seed_of(self.seed, epoch))
                self._order = torch.randperm(n, generator=g)
            else:
                self._order = torch.arange(n)
            self._order_epoch = epoch
        return self._order

    def batch_at(self, epoch: int, batch: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Batch ``batch`` of epoch ``epoch`` on the CPU: a pure function of (seed, epoch, batch)
        (the permutation of the epoch, then the batch's flips and dequantisation noise)."""
        start = batch * self.batch_size
        index = self._epoch_order(epoch)[start:start + self.batch_size]
        x = self.dataset.as_float(index)  # (B, C, H, W) or (B, D)
        g = torch.Generator().manual_seed(_seed_of(self.seed, epoch, batch))
        if self.random_flip:
            flip = torch.rand(x.shape[0], generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.uniform_dequantization:
            levels = self.dataset.levels
            x = (x * (levels - 1) + torch.rand(x.shape, generator=g)) / levels
        return (x, self.dataset.labels[index].long()) if self.with_labels else x  # y: (B,)

    def positions(self, epoch: int, batch: int):
        """The positions (epoch, batch) from (epoch, batch) on, in the order ``__next__`` reads
        them (endless when shuffling, else up to the end of the one pass)."""
        while True:
            if batch >= self.batches_per_epoch:
                if not self.shuffle:
                    return
                epoch, batch = epoch + 1, 0
            yield epoch, batch
            batch += 1

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        position = next(self.positions(self.epoch, self.batch), None)
        if position is None:
            raise StopIteration
        if self.num_workers:
            if self._prefetcher is None:
                self._prefetcher = Prefetcher(self.worker_copy(), self.num_workers, self.device)
            item = self._prefetcher.get(position)
        else:
            item = self.batch_at(*position)
        self.epoch, self.batch = position[0], position[1] + 1
        return self._to_device(item)

    def _to_device(self, item):
        if self.device is None:
            return item
        device = torch.device(self.device)
        non_blocking = device.type == "cuda"  # from pinned memory: overlaps the step
        if isinstance(item, (tuple, list)):  # (x, y)
            return tuple(t.to(device, non_blocking=non_blocking) for t in item)
        return item.to(device, non_blocking=non_blocking)

    def worker_copy(self) -> DataIterator:
        """A copy for worker processes: the same batch function, no workers of its own."""
        clone = copy.copy(self)
        clone.num_workers, clone._prefetcher = 0, None
        return clone

    def close(self) -> None:
        """Stop the worker processes (started again by the next batch)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_prefetcher": None}

    def state_dict(self) -> dict[str, int]:
        """The position: ``{'epoch', 'batch', 'seed'}`` (plain ints)."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data iterator state has seed {state['seed']}, expected {self.seed}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        if self._prefetcher is not None:
            self._prefetcher.restart()  # the batches built ahead belong to the old position


def get_data_scaler(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """Data in [0, 1] -> model space: [-1, 1] when ``config.data.centered``, else unchanged.

    Point data (configs with ``data.dim``) is used as is: it is not confined to [0, 1].
    """
    if config.data.centered and "dim" not in config.data:
        return lambda x: x * 2.0 - 1.0
    return lambda x: x


def get_data_inverse_scaler(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inverse of :func:`get_data_scaler`: model space -> [0, 1] (identity for point data)."""
    if config.data.centered and "dim" not in config.data:
        return lambda x: (x + 1.0) / 2.0
    return lambda x: x
