"""Batches built ahead of the training step in worker processes.

A :class:`~score_sde.datasets.base.DataIterator`'s batch b of epoch e is a pure function of
(seed, e, b) (``batch_at``), so a ``torch.utils.data.DataLoader`` over batch *positions* can build
them in other processes without changing a bit: its sampler yields the positions (e, b) from the
iterator's current one on, each worker calls ``batch_at`` for the positions it is given, and the
loader returns them in order. The iterator counts the batches it hands out itself, so its
``state_dict`` is the position of the last batch the training loop consumed, never that of a batch
still waiting in the prefetch queue.

The workers persist across epochs (they are started once per position jump: the first batch and
every ``load_state_dict``), keep ``prefetch_factor`` batches each in flight, run torch on one
thread (they share the cores with the step) and, on CUDA only, return page-locked batches so that
the copy to the device can overlap the step (``non_blocking``).
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

#: The default ``'auto'`` for data that is decoded from files: at most this many workers.
MAX_AUTO_WORKERS = 4


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_num_workers(value: int | str, decodes_files: bool) -> int:
    """``config.data.num_workers`` as a number: ``'auto'`` is min(4, available cores) for data
    decoded from files (image folders) and 0 for data held in memory (nothing to overlap); a
    count may be given as an int or as its digits (the config key is a string, so
    ``--config.data.num_workers=2`` arrives as ``'2'``).

    Raises:
        ValueError: neither ``'auto'`` nor a count >= 0.
    """
    if value == "auto":
        return min(MAX_AUTO_WORKERS, available_cores()) if decodes_files else 0
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.data.num_workers must be 'auto' or an int >= 0, got {value!r}")
    return value


class _Batches(Dataset):
    """Position (epoch, batch) -> (position, batch), built by the iterator's pure function."""

    def __init__(self, iterator) -> None:
        self.iterator = iterator  # a worker copy: no workers of its own

    def __getitem__(self, position: tuple[int, int]):
        return position, self.iterator.batch_at(*position)


class _Positions(Sampler):
    """The positions from ``start`` on (set before each ``iter``), in the iterator's order."""

    def __init__(self, iterator) -> None:
        self.iterator = iterator
        self.start = (0, 0)

    def __iter__(self):
        return self.iterator.positions(*self.start)


def as_is(item):
    """A loader item as built (no collation: a worker returns whole batches)."""
    return item


def one_thread(worker_id: int) -> None:
    """A worker's start: torch on one thread (the workers share the cores with the step)."""
    torch.set_num_threads(1)


class Prefetcher:
    """The batches of ``iterator`` built by ``num_workers`` processes, ahead of the asking.

    Args:
        iterator: a ``DataIterator`` without workers (``DataIterator.worker_copy()``).
        num_workers: worker processes (>= 1).
        device: where the batches go; page-locked memory on CUDA only.
    """

    def __init__(self, iterator, num_workers: int, device: torch.device | str | None) -> None:
        self._iterator = iterator
        self._sampler = _Positions(iterator)
        cuda = device is not None and torch.device(device).type == "cuda"
        self._loader = DataLoader(
            _Batches(iterator), batch_size=None, sampler=self._sampler,
            num_workers=num_workers, collate_fn=as_is, pin_memory=cuda,
            persistent_workers=True, prefetch_factor=2, worker_init_fn=one_thread)
        self._stream = None
        self._next_position: tuple[int, int] | None = None

    def get(self, position: tuple[int, int]):
        """The batch at ``position`` (epoch, batch); a position that does not follow the last one
        restarts the stream there (the batches in flight are dropped)."""
        if self._stream is None or position != self._next_position:
            self._sampler.start = position
            self._stream = iter(self._loader)  # persistent workers: reset, not restarted
        built, item = next(self._stream)
        if tuple(built) != tuple(position):  # the loader's in-order guarantee, checked
            raise RuntimeError(f"data workers built batch {tuple(built)}, expected {position}")
        self._next_position = next(self._iterator.positions(position[0], position[1] + 1), None)
        return item

    def restart(self) -> None:
        """Forget the batches in flight: the next :meth:`get` starts at its position."""
        self._next_position = None

    def close(self) -> None:
        """Stop the workers."""
        self._stream = None
        self._loader = None
