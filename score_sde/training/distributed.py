"""Data-parallel training with ``torch.distributed``, launched by ``torchrun``.

``torchrun`` starts one process per device and describes the job in environment variables
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); :func:`setup` joins
that process group (NCCL on GPUs, Gloo on CPU) and gives each process its device. There is no
launcher of ours::

    torchrun --standalone --nproc_per_node 4 main.py --config vp_cifar --workdir runs/vp
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \\
        main.py --config vp_cifar --workdir runs/vp      # and --node_rank 1 on the other node

The design keeps a run's result independent of the world size W:

* every rank iterates the *global* batch (``training.batch_size``, same seed, same position) and
  reads only rows ``[r B/W, (r+1) B/W)`` (:func:`shard`, :func:`shard_dataset`); the data
  position in checkpoints is therefore the same on every rank and for every W;
* the loss draws (t, z) are made for the whole global batch from the same seeded generator on
  every rank and sliced the same way (``losses`` ``shard=``), so sample i sees the same noise
  whatever W is; a class-conditional run's labels of the global batch are sliced with the rows,
  so every sample keeps its own label;
* ``DistributedDataParallel`` averages the gradients of the equal shards, which is the gradient of
  the global batch mean;
* rank 0 alone updates the EMA, logs, samples and writes checkpoints of the bare module (no
  ``module.`` prefix), so a checkpoint loads with any W;
* torch's global generator (dropout) is seeded per rank (:func:`rank_seed`), rank 0 with
  ``config.seed`` itself, so a one-process run is unchanged.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from score_sde.datasets import ArrayDataset

#: environment variables torchrun sets for every worker
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """This process in the job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, samples and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process: gradients must be averaged."""
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the environment describes a torchrun worker (``RANK`` and ``WORLD_SIZE`` set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(config, timeout_minutes: float = 30.0) -> Context:
    """Join the process group torchrun describes in the environment; no-op for a plain run.

    On CUDA each process takes ``cuda:LOCAL_RANK`` (``config.device`` is rewritten) and NCCL;
    on CPU, Gloo. Call once at the entry point, after the device is resolved.

    Args:
        config: reads and, for CUDA, rewrites ``config.device``.
        timeout_minutes: how long a collective waits for a silent rank before failing.
    Returns:
        this process's :class:`Context`.
    Raises:
        ValueError: malformed torchrun variables, naming them.
    """
    if not launched_by_torchrun():
        return Context()
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        found = {k: os.environ.get(k) for k in TORCHRUN_VARS}
        raise ValueError(f"torchrun environment variables must be integers, got {found}") from None
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    if world_size == 1:
        return Context()
    device = torch.device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        config.device = str(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return context()


def context() -> Context:
    """The :class:`Context` of the initialised process group (one process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def cleanup(finished: bool = True) -> None:
    """Leave the process group, if one was joined.

    The ``DistributedDataParallel`` wrapper of a finished run sits in a reference cycle; left for
    interpreter shutdown, its reducer outlives the destroyed Gloo group and the process aborts
    ("terminate called without an active exception", SIGABRT) in a few percent of runs on a busy
    machine, which torchrun reports as a failed run. So collect it first, and, when every rank
    ``finished`` normally, wait for all of them before tearing the group down (not after an
    error: a rank that died would leave the others waiting).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int, *keys: int) -> int:
    """Seed of torch's global generator on ``rank``: ``seed`` itself on rank 0 without ``keys``
    (a one-process run is unchanged), else a 63-bit mix of (seed, rank, *keys)."""
    if rank == 0 and not keys:
        return int(seed)
    mixed = np.random.SeedSequence([int(seed), int(rank), *map(int, keys)]).generate_state(
        1, np.uint64)[0]
    return int(mixed >> 1)


def check_divisible(batch_size: int, world_size: int, name: str = "training.batch_size") -> int:
    """Rows per rank, ``batch_size / world_size``.

    Raises:
        ValueError: the global batch does not split evenly (naming both numbers and the
            nearest valid batch sizes).
    """
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size
        upper = lower + world_size
        raise ValueError(
            f"{name}={batch_size} (the global batch) must be divisible by the world size "
            f"{world_size}; use e.g. {lower or upper} or {upper}"
        )
    return batch_size // world_size


def shard(batch_size: int, ctx: Context) -> slice | None:
    """Rows of the global batch that ``ctx.rank`` trains on; ``None`` for one process."""
    if not ctx.enabled:
        return None
    rows = check_divisible(batch_size, ctx.world_size)
    return slice(ctx.rank * rows, (ctx.rank + 1) * rows)


@dataclass
class ShardedDataset(ArrayDataset):
    """An :class:`~datasets.ArrayDataset` whose global batches hold only this rank's rows.

    ``DataIterator`` asks for the samples of the whole global batch (so permutations, flips and
    dequantisation noise are those of a one-process run); only rows ``rows`` are read or decoded,
    the others are zeros that the sharded loss never looks at. Built by :func:`shard_dataset`.
    """

    rows: slice = field(default_factory=lambda: slice(None))
    batch_size: int = 0

    def as_float(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Samples ``index`` (B,) as float; rows outside ``rows`` are zeros for a global batch."""
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        if index.shape[0] != self.batch_size:  # not a training batch: read everything
            return super().as_float(index)
        local = super().as_float(index[self.rows])  # (B / W, *D)
        x = local.new_zeros((index.shape[0], *local.shape[1:]))
        x[self.rows] = local
        return x


def shard_dataset(dataset: ArrayDataset, batch_size: int, ctx: Context) -> ArrayDataset:
    """``dataset`` reading only ``ctx.rank``'s rows of each global batch (unchanged for one
    process), so an image folder is decoded once over all ranks, not once per rank."""
    rows = shard(batch_size, ctx)
    if rows is None:
        return dataset
    return ShardedDataset(dataset.data, dataset.labels, dataset.levels, dataset.classes,
                          dataset.notes, rows=rows, batch_size=batch_size)


# -- collectives that every rank calls at the same point ------------------------------------------


def _device_of(ctx: Context, device: torch.device | str) -> torch.device:
    return torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_true(ok: bool, ctx: Context, device: torch.device | str = "cpu") -> bool:
    """True when ``ok`` holds on every rank (a collective: also a barrier)."""
    if not ctx.enabled:
        return bool(ok)
    flag = torch.tensor(0 if ok else 1, dtype=torch.int32, device=_device_of(ctx, device))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) == 0


def minimum(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The elementwise minimum of ``value`` over ranks (a collective)."""
    if not ctx.enabled:
        return value
    out = value.detach().clone().to(_device_of(ctx, value.device))
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out.to(value.device)


def mean(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The mean of ``value`` over ranks (a collective): the global batch's loss from the shards'."""
    if not ctx.enabled:
        return value
    out = value.detach().clone().to(_device_of(ctx, value.device))
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return (out / ctx.world_size).to(value.device)


def check_same(value: int, ctx: Context, what: str, hint: str = "",
               device: torch.device | str = "cpu") -> None:
    """Every rank holds the same integer ``value`` (a collective).

    Raises:
        RuntimeError: on every rank, naming ``what``, the range of values seen and ``hint``.
    """
    if not ctx.enabled:
        return
    both = torch.tensor([value, -value], dtype=torch.int64, device=_device_of(ctx, device))
    dist.all_reduce(both, op=dist.ReduceOp.MIN)
    low, high = int(both[0]), -int(both[1])
    if low != high:
        raise RuntimeError(f"ranks disagree on {what}: values from {low} to {high}. {hint}")


def on_main(fn: Callable[[], Any], ctx: Context, what: str,
            device: torch.device | str = "cpu") -> None:
    """Run ``fn`` on rank 0 only while the other ranks wait (a barrier around checkpoint writes).

    A failure on rank 0 (a full disk, a non-finite state) is re-raised there and reported on every
    other rank as a ``RuntimeError`` naming ``what``, so no rank is left waiting in a collective.
    """
    error: BaseException | None = None
    if ctx.is_main:
        try:
            fn()
        except Exception as e:  # re-raised below, after the other ranks know
            error = e
    ok = all_true(error is None, ctx, device)
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"{what} failed on rank 0; see its log")


def barrier(ctx: Context, device: torch.device | str = "cpu") -> None:
    """Wait for every rank (nothing for one process)."""
    all_true(True, ctx, device)


# -- the data-parallel training step -------------------------------------------------------------


def data_parallel_step(train_step: Callable[..., torch.Tensor], model: torch.nn.Module,
                       batch_size: int, ctx: Context) -> Callable[..., torch.Tensor]:
    """``step(state, batch, *, generator, class_labels=None)`` training on this rank's rows of
    the global ``batch``.

    ``train_step`` is ``losses.get_step_fn(..., train=True)``; it sees the model wrapped in
    ``DistributedDataParallel`` (gradient averaging), ``shard=`` its rows, and the EMA on rank 0
    only. ``class_labels`` (B,) of the global batch go to the loss whole; it keeps the same rows
    of them as of the batch, so every sample keeps its label. ``state['model']`` stays the bare
    module, so checkpoints carry no ``module.`` prefix.
    With one process ``train_step`` is returned unchanged.
    """
    if not ctx.enabled:
        return train_step
    rows = shard(batch_size, ctx)
    device = next(model.parameters()).device
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def step(state: dict, batch: torch.Tensor, *, generator: torch.Generator | None = None,
             class_labels: torch.Tensor | None = None, **image_cond: torch.Tensor
             ) -> torch.Tensor:
        if batch.shape[0] != batch_size:
            raise ValueError(f"expected the global batch of {batch_size} rows, got "
                             f"{batch.shape[0]}")
        view = dict(state, model=ddp, ema=state["ema"] if ctx.is_main else None)
        extra = {} if class_labels is None else {"class_labels": class_labels}
        extra.update(image_cond)  # cond_image, cond_level: sharded by the loss like the labels
        loss = train_step(view, batch, generator=generator, shard=rows, **extra)
        state["step"] = view["step"]
        return loss

    return step


def reseed_after_resume(seed: int, step: int, ctx: Context) -> None:
    """After a resume every rank holds rank 0's saved global generator; give ranks > 0 their own
    stream again, derived from (seed, rank, step) so a resumed run is deterministic."""
    if ctx.rank > 0:
        torch.manual_seed(rank_seed(seed, ctx.rank, step))
