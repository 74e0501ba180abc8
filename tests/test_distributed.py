"""Data-parallel training (training.distributed): two Gloo processes under torchrun train like
one process over the same global batch; the sharded loss draws equal the whole batch's; the
global batch must split evenly; checkpoints of a 2-rank run resume with one rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import ml_collections
import pytest
import torch
from conftest import REPO

from score_sde import losses
from score_sde.training import checkpoints, distributed
from score_sde.training.loop import train
from score_sde.training.sampling import get_sde

# A tiny toy run. Adam with eps = 10 above every |gradient| acts like SGD, so a wrong gradient
# scale (a sum over ranks instead of a mean, a missing 1/W) changes the result by a factor ~2
# instead of being normalised away; no clipping for the same reason.
TOY = [
    "--config=toy_2d", "--config.model.nf=16", "--config.training.batch_size=32",
    "--config.data.num_samples=256", "--config.training.snapshot_freq=100",
    "--config.training.snapshot_freq_for_preemption=2", "--config.training.log_freq=1",
    "--config.training.eval_freq=2", "--config.training.snapshot_sampling=False",
    "--config.optim.lr=0.05", "--config.optim.eps=10.0", "--config.optim.warmup=0",
    "--config.optim.grad_clip=-1.0", "--noprogress",
]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main(*args, nproc=1, check=True):
    for _attempt in range(3):
        launcher = [] if nproc == 1 else [
            "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
        result = subprocess.run([sys.executable, *launcher, str(REPO / "main.py"), *args],
                                cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        # the free port can be taken between _free_port() and the launch by a test running in
        # another pytest-xdist worker: launch again on another port
        if nproc == 1 or "address already in use" not in result.stderr.lower():
            break
    if check and result.returncode != 0:
        # the head holds the run's own log and any abort message, the tail torchrun's summary
        err = result.stderr
        shown = err if len(err) <= 6000 else f"{err[:3000]}\n[...]\n{err[-3000:]}"
        raise AssertionError(f"{' '.join(args)} failed:\n{shown}")
    return result


def _final(workdir):
    return torch.load(checkpoints.meta_path(workdir), weights_only=True)


def _snapshot_at(workdir, step):
    """The numbered snapshot of ``workdir`` written at ``step``."""
    found = [torch.load(p, weights_only=True) for _, p in checkpoints.list_snapshots(workdir)]
    (ckpt,) = [c for c in found if c["step"] == step]
    return ckpt


def test_two_gloo_ranks_train_like_one_process_and_resume_with_one(tmp_path):
    _main(*TOY, "--config.training.n_iters=4", "--config.training.snapshot_freq=4",
          f"--workdir={tmp_path / 'two'}", nproc=2)
    # The one-process run, in this process from the 2-rank run's resolved config (bitwise what
    # main.py trains, see test_robustness), goes straight to step 6: its numbered snapshot of
    # step 4 is the state to compare the 2-rank run of 4 steps with.
    config = ml_collections.ConfigDict(json.loads((tmp_path / "two" / "config.json").read_text()))
    config.training.n_iters = 6
    torch.manual_seed(config.seed)  # as main.py
    train(config, tmp_path / "one", progress=False)
    two, one = _final(tmp_path / "two"), _snapshot_at(tmp_path / "one", 4)
    assert two["step"] == one["step"] == 4
    assert two["data"] == one["data"]
    assert not any(k.startswith("module.") for k in two["model"])  # no DDP prefix on disk
    moved = max((a - b).abs().max() for a, b in zip(one["model"].values(),
                                                    _fresh_model_state(tmp_path).values()))
    for (name, a), b in zip(one["model"].items(), two["model"].values()):
        # float round-off of sums in another order; a wrong gradient scale moves weights by
        # about as much as training does (``moved``)
        assert (a - b).abs().max() <= 1e-5 * moved, name
    for a, b in zip(one["ema"]["shadow_params"], two["ema"]["shadow_params"]):
        assert (a - b).abs().max() <= 1e-5 * moved
    assert (tmp_path / "two" / "stdout.txt").read_text().count("step: 4, training_loss") == 1

    # a 2-rank checkpoint continues in one process like the one-process run (in this process,
    # as main.py would: the same config, 6 steps)
    torch.manual_seed(config.seed)
    train(config, tmp_path / "two", progress=False)
    two, one = _final(tmp_path / "two"), _final(tmp_path / "one")
    assert two["step"] == one["step"] == 6
    for a, b in zip(one["model"].values(), two["model"].values()):
        assert (a - b).abs().max() <= 1e-5 * moved


def _fresh_model_state(tmp_path):
    """The initial weights of the toy run (config.seed applied as main.py does)."""
    from models.utils import create_model

    config = ml_collections.ConfigDict(json.loads((tmp_path / "one" / "config.json").read_text()))
    torch.manual_seed(config.seed)
    return create_model(config).state_dict()


@pytest.mark.slow  # a torchrun launch; by default the check main.py runs before any work
# (validate_config with torchrun's world size) and its message are
# test_validation.test_the_global_batch_must_split_evenly_over_the_ranks
def test_a_global_batch_that_does_not_split_evenly_is_refused_at_launch(tmp_path):
    result = _main(*TOY, "--config.training.batch_size=15", "--config.training.n_iters=1",
                   f"--workdir={tmp_path}", nproc=2, check=False)
    assert result.returncode != 0
    assert "config.training.batch_size=15 (the global batch) must be divisible by the world " \
           "size 2; use e.g. 14 or 16" in result.stderr
    assert not checkpoints.meta_path(tmp_path).exists()


# -- the pieces, in one process --------------------------------------------------------------


def _mlp(dim=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(dim + 1, 16), torch.nn.SiLU(),
                               torch.nn.Linear(16, dim))


class _Net(torch.nn.Module):
    """A score network for (B, D) data taking (x, labels)."""

    def __init__(self, dim=3):
        super().__init__()
        self.net = _mlp(dim)

    def forward(self, x, labels):
        return self.net(torch.cat([x, labels[:, None].to(x.dtype)], dim=1))


@pytest.mark.parametrize("kind", ["continuous", "likelihood", "ssm", "ddpm"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_losses_average_to_the_whole_batch_loss(kind, world_size):
    """Mean over equal shards of the shard losses (each drawing the global batch's noise) is the
    whole-batch loss, and so is the mean of their gradients (what DDP computes)."""
    sde = get_sde(_ToyConfig)
    if kind == "ssm":
        loss_fn = losses.get_ssm_loss_fn(sde, train=True)
    elif kind == "ddpm":
        loss_fn = losses.get_ddpm_loss_fn(sde, train=True)
    else:
        loss_fn = losses.get_sde_loss_fn(sde, train=True, likelihood_weighting=kind != "continuous")
    batch = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    model = _Net()

    def loss_and_grads(shard):
        model.zero_grad()
        loss = loss_fn(model, batch, generator=torch.Generator().manual_seed(5), shard=shard)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    whole, whole_grads = loss_and_grads(None)
    rows = 8 // world_size
    parts = [loss_and_grads(slice(r * rows, (r + 1) * rows)) for r in range(world_size)]
    torch.testing.assert_close(torch.stack([p[0] for p in parts]).mean(), whole)
    for k, g in enumerate(whole_grads):
        torch.testing.assert_close(torch.stack([p[1][k] for p in parts]).mean(0), g)
    # the shards do see different samples (a shard of the whole loss, not a copy of it)
    assert not torch.allclose(parts[0][0], parts[1][0])


class _ToyConfig:
    class training:  # noqa: N801
        sde = "vpsde"

    model = {"beta_min": 0.1, "beta_max": 20.0, "num_scales": 1000}


def test_a_sharded_dataset_reads_only_its_rows_of_the_global_batch():
    from score_sde.datasets import ArrayDataset, DataIterator

    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    dataset = ArrayDataset(images, torch.zeros(40, dtype=torch.int64), levels=256)
    options = dict(seed=3, random_flip=True, uniform_dequantization=True)
    whole = DataIterator(dataset, 12, **options)
    ranks = [DataIterator(distributed.shard_dataset(dataset, 12, distributed.Context(r, 3)), 12,
                          **options) for r in range(3)]
    read = []
    real_as_float = ArrayDataset.as_float
    ArrayDataset.as_float = lambda self, index: read.append(len(index)) or real_as_float(
        self, index)
    try:
        for _ in range(7):  # over two epoch boundaries (3 batches per epoch)
            batch = next(whole)
            for r, it in enumerate(ranks):
                torch.testing.assert_close(next(it)[4 * r:4 * (r + 1)], batch[4 * r:4 * (r + 1)],
                                           rtol=0, atol=0)
    finally:
        ArrayDataset.as_float = real_as_float
    assert read == [12, 4, 4, 4] * 7  # each rank decodes a third of the global batch
    assert all(it.state_dict() == whole.state_dict() for it in ranks)
    assert distributed.shard_dataset(dataset, 12, distributed.Context()) is dataset


def test_shards_and_seeds():
    ctx = distributed.Context(rank=1, world_size=4)
    assert distributed.shard(32, ctx) == slice(8, 16)
    assert distributed.shard(32, distributed.Context()) is None
    with pytest.raises(ValueError, match="batch_size=30 .* divisible by the world size 4; use "
                                         "e.g. 28 or 32"):
        distributed.shard(30, ctx)
    assert distributed.rank_seed(42, 0) == 42  # one process: the config's seed itself
    seeds = {distributed.rank_seed(42, r) for r in range(8)}
    assert len(seeds) == 8
    assert distributed.rank_seed(42, 1, 10) != distributed.rank_seed(42, 1, 11)


def test_without_torchrun_there_is_no_process_group(monkeypatch):
    for name in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)

    class Config:
        device = "cpu"

    assert distributed.setup(Config) == distributed.Context()
    monkeypatch.setenv("RANK", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="torchrun environment variables must be integers"):
        distributed.setup(Config)


# -- collectives: a failure or a NaN on one rank reaches every rank (no rank left waiting) ---------


def _collectives_worker(rank, port, results):
    import torch.distributed as dist

    from score_sde.training.nonfinite import NonFiniteGuard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    ctx = distributed.context()
    out = {}
    try:
        def full_disk():
            raise OSError(28, "No space left on device")

        try:
            distributed.on_main(full_disk, ctx, "checkpoint")
        except Exception as e:  # noqa: BLE001 - reported to the parent
            out["on_main"] = f"{type(e).__name__}: {e}"
        guard = NonFiniteGuard("cpu")
        guard.observe_loss(torch.tensor(float("nan") if rank == 1 else 1.0), step=7)
        try:
            guard.check(ctx)
        except FloatingPointError as e:
            out["guard"] = str(e)
        out["mean"] = float(distributed.mean(torch.tensor(float(rank)), ctx))
        try:
            distributed.check_same(4 * rank, ctx, "the step to resume from", "A hint.")
        except RuntimeError as e:
            out["same"] = str(e)
    finally:
        dist.destroy_process_group()
    results[rank] = out


def test_a_failure_or_a_nan_on_one_rank_reaches_every_rank():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_collectives_worker, args=(_free_port(), results), nprocs=2, join=True)
    zero, one = results[0], results[1]
    assert zero["on_main"] == "OSError: [Errno 28] No space left on device"
    assert one["on_main"] == "RuntimeError: checkpoint failed on rank 0; see its log"
    assert "non-finite loss or gradient at step 7" in zero["guard"] == one["guard"]
    assert zero["mean"] == one["mean"] == 0.5
    assert zero["same"] == one["same"] == ("ranks disagree on the step to resume from: values "
                                           "from 0 to 4. A hint.")
