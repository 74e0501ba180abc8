"""Importance sampling of the training step for L_vlb (Nichol & Dhariwal 2021, Sec. 3.3).

p_t is proportional to sqrt(E[L_t^2]), estimated from the last ``history`` values of each term
L_t; until every t has that many values, t is uniform. The estimate sum_t p_t L_t / (N p_t) of
sum_t L_t / N is unbiased for any p_t > 0, so a small uniform share keeps every p_t positive.
The history lives on the loss's device and is updated without host synchronisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist


def gather_rows(local: torch.Tensor, shard: slice | None) -> torch.Tensor:
    """The values (B,) of a whole global batch from each process's rows ``shard`` (equal,
    contiguous and in rank order, as ``training.distributed.shard``); ``local`` itself for one
    process or ``shard=None``. A collective under ``torch.distributed``: every rank calls it at
    the same point."""
    if shard is None or not (dist.is_available() and dist.is_initialized()) \
            or dist.get_world_size() == 1:
        return local
    device = local.device if dist.get_backend() == "nccl" else torch.device("cpu")
    local = local.detach().to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts)


class VLBImportanceSampler:
    """Draws steps t ~ p_t = (1 - u) sqrt(E[L_t^2]) / sum_s sqrt(E[L_s^2]) + u / N with weights
    1 / (N p_t), from a history of the last ``history`` values of L_t per step (Nichol &
    Dhariwal 2021, Sec. 3.3; uniform until every step has a full history).

    Args:
        num_timesteps: N, the steps t = 0 .. N-1.
        history: values kept per step (the paper's 10).
        uniform_prob: u, the uniform share mixed into p_t (the official code's 0.001), in [0, 1).
        device, dtype: of the history (the loss's device).
    """

    def __init__(self, num_timesteps: int, *, history: int = 10, uniform_prob: float = 0.001,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        for name, value in (("num_timesteps", num_timesteps), ("history", history)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(uniform_prob, (int, float)) and 0 <= uniform_prob < 1):
            raise ValueError(f"uniform_prob must be a number in [0, 1), got {uniform_prob!r}")
        self.num_timesteps, self.uniform_prob = num_timesteps, float(uniform_prob)
        # one spare row N receives the values a full history drops (see update)
        self._history = torch.zeros(num_timesteps + 1, history, device=device, dtype=dtype)
        self.seen = torch.zeros(num_timesteps, device=device, dtype=torch.int64)
        self._pending: list | None = None  # updates collected inside deferred_updates

    @property
    def history(self) -> torch.Tensor:
        """The last values of L_t, (N, history) (in ring order; only their moments matter)."""
        return self._history[:-1]

    def probs(self) -> torch.Tensor:
        """p_t (N,): uniform until every step has a full history, then the mixture above."""
        N, H = self.num_timesteps, self._history.shape[1]
        rms = self.history.square().mean(dim=1).sqrt()
        p = rms / rms.sum().clamp(min=torch.finfo(rms.dtype).tiny)
        p = (1.0 - self.uniform_prob) * p + self.uniform_prob / N
        warm = (self.seen >= H).all()
        return torch.where(warm, p, torch.full_like(p, 1.0 / N))

    def sample(self, batch_size: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps t (B,) int64 ~ p_t and their weights 1 / (N p_t) (B,), on the history's device
        (``generator`` must live there)."""
        p = self.probs()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, 1.0 / (self.num_timesteps * p[t])

    @contextlib.contextmanager
    def deferred_updates(self) -> Iterator[None]:
        """Inside the block :meth:`update` only collects its values (the probabilities, and so
        the steps a replayed draw gives, stay those at entry); on a normal exit they are applied
        as one update of the rows the calls covered, in order. Gradient accumulation: the
        micro-batches of one step, consecutive slices of this process's rows, update the
        history as the whole batch would."""
        self._pending = []
        try:
            yield
            pending = self._pending
        finally:
            self._pending = None
        if pending:
            t = pending[0][0]
            values = torch.cat([v.reshape(-1) for _, v, _ in pending])
            shards = [s for _, _, s in pending]
            shard = None if shards[0] is None else slice(shards[0].start, shards[-1].stop)
            self.update(t, values, shard=shard)

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor, shard: slice | None = None) -> None:
        """Append the values ``losses`` of the terms L_t at steps ``t`` (B,) of the whole batch to
        the history, in batch order (a step drawn more often than the history holds keeps its
        last values). Under data parallelism ``losses`` holds this process's rows ``shard`` of the
        batch; they are gathered from every rank (:func:`gather_rows`), so that every rank keeps
        the same history and draws the same steps (without a process group, only the rows
        ``shard`` of ``t`` are recorded)."""
        if self._pending is not None:  # inside deferred_updates
            self._pending.append((t, losses.detach(), shard))
            return
        H = self._history.shape[1]
        t = t.to(self.seen.device).long().reshape(-1)
        values = gather_rows(losses.detach(), shard).to(self._history).reshape(-1)
        if shard is not None and values.numel() != t.numel():  # no process group: own rows
            t = t[shard]
        if values.numel() != t.numel():
            raise ValueError(f"{values.numel()} losses for {t.numel()} steps")
        order = torch.argsort(t, stable=True)
        ts, vs = t[order], values[order]
        rank = torch.arange(ts.numel(), device=ts.device) - torch.searchsorted(ts, ts)
        counts = torch.bincount(ts, minlength=self.num_timesteps)
        keep = rank >= counts[ts] - H  # the last H values of each step: distinct ring slots
        row = torch.where(keep, ts, torch.full_like(ts, self.num_timesteps))
        slot = (self.seen[ts] + rank) % H
        self._history.index_put_((row, slot), vs)
        self.seen += counts

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The history (N, history) and the count of values seen per step (N,)."""
        return {"history": self.history.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`; shapes must match.

        Raises:
            ValueError: a missing or non-finite entry, or a shape other than this sampler's.
        """
        for name, live in (("history", self.history), ("seen", self.seen)):
            value = state.get(name) if isinstance(state, Mapping) else None
            if not isinstance(value, torch.Tensor) or value.shape != live.shape \
                    or not bool(torch.isfinite(value).all()):
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                raise ValueError(f"importance-sampler state {name!r} must be a finite tensor "
                                 f"of shape {tuple(live.shape)}, got {found!r}")
        self.history.copy_(state["history"])
        self.seen.copy_(state["seen"])
