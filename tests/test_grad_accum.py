"""Gradient accumulation (``training.grad_accum = k``, ``losses.accumulate_gradients``): k
micro-batches give the weights of the one-shot batch after 3 steps (the same draws, sliced),
for each objective and reduction, the hybrid loss with its importance sampler, in float32 and
float64; DDP all-reduces once per step; under 2-rank Gloo DDP a run equals one process."""

from __future__ import annotations

import ml_collections
import pytest
import torch
import torch.distributed as dist
from test_hybrid_loss import LearnedVarianceNet

import sde_lib
from models.ema import ExponentialMovingAverage
from score_sde import losses
from score_sde.discrete_diffusion import VLBImportanceSampler
from score_sde.training import acceleration

F64 = torch.float64


def Net(dim: int = 3, learn_sigma: bool = False) -> torch.nn.Module:
    """The (B, D) score network of the hybrid-loss tests; 2 D outputs only with ``learn_sigma``."""
    return LearnedVarianceNet(dim, learn_sigma)


def _config():
    # Adam with eps = 10 above every |gradient| acts like SGD, so a wrong gradient weight (a
    # missing 1/k, a sum over micro-batches) changes the update by its factor instead of being
    # normalised away; no clipping for the same reason.
    return ml_collections.ConfigDict(dict(optim=dict(
        optimizer="Adam", lr=0.05, beta1=0.9, eps=10.0, weight_decay=0.0, warmup=0,
        grad_clip=-1.0)))


def _warm_sampler(N: int) -> VLBImportanceSampler:
    """An importance sampler past its warm-up, with a non-uniform history."""
    sampler = VLBImportanceSampler(N, history=2)
    g = torch.Generator().manual_seed(3)
    sampler.load_state_dict({"history": torch.rand(N, 2, generator=g) * torch.arange(1, N + 1)[
        :, None], "seen": torch.full((N,), 2, dtype=torch.int64)})
    return sampler


KINDS = ("dsm_mean", "dsm_sum", "likelihood", "ssm", "ddpm", "hybrid_importance")


def _train(kind: str, k: int, dtype=torch.float32, steps: int = 3, batch_size: int = 16):
    """Weights, EMA, generator state and importance-sampler state after ``steps`` steps."""
    config = _config()
    discrete = kind in ("ddpm", "hybrid_importance")
    sde = sde_lib.DiscreteVPSDE(N=20, beta_end=0.2) if discrete else sde_lib.VPSDE()
    model = Net(learn_sigma=kind == "hybrid_importance").to(dtype)
    sampler = _warm_sampler(sde.N) if kind == "hybrid_importance" else None
    loss_fn = losses.get_ssm_loss_fn(sde, train=True) if kind == "ssm" else None
    step_fn = losses.get_step_fn(
        sde, True, losses.optimization_manager(config), reduce_mean=kind != "dsm_sum",
        continuous=not discrete, likelihood_weighting=kind == "likelihood", loss_fn=loss_fn,
        loss="hybrid" if sampler is not None else "simple", importance_sampler=sampler,
        grad_accum=k)
    state = dict(model=model, optimizer=losses.get_optimizer(config, model.parameters()),
                 ema=ExponentialMovingAverage(model.parameters(), decay=0.9), step=0)
    init = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    data = torch.Generator().manual_seed(1)
    loss_values = []
    for _ in range(steps):
        batch = (torch.rand(batch_size, 3, generator=data) * 2 - 1).to(dtype)
        loss_values.append(step_fn(state, batch, generator=g))
    return dict(params=[p.detach() for p in model.parameters()], init=init,
                ema=[p.clone() for p in state["ema"].shadow_params], rng=g.get_state(),
                losses=torch.stack(loss_values),
                sampler=None if sampler is None else sampler.state_dict())


def _assert_same_run(one, acc, rel):
    moved = max((a - b).abs().max() for a, b in zip(one["params"], one["init"]))
    assert moved > 1e-4  # training moved the weights
    for a, b in zip(one["params"], acc["params"]):
        assert (a - b).abs().max() <= rel * moved
    for a, b in zip(one["ema"], acc["ema"]):
        assert (a - b).abs().max() <= rel * moved
    torch.testing.assert_close(acc["losses"], one["losses"], rtol=10 * rel, atol=0)
    assert torch.equal(one["rng"], acc["rng"])  # the generator ends where one draw leaves it
    if one["sampler"] is not None:
        torch.testing.assert_close(acc["sampler"]["history"], one["sampler"]["history"],
                                   rtol=10 * rel, atol=0)
        assert torch.equal(acc["sampler"]["seen"], one["sampler"]["seen"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 4])
def test_micro_batches_give_the_one_shot_update_in_float32(kind, k):
    _assert_same_run(_train(kind, 1), _train(kind, k), rel=1e-5)


@pytest.mark.parametrize("kind", ["dsm_sum", "hybrid_importance"])
@pytest.mark.parametrize("k", [2, 4])
def test_micro_batches_give_the_one_shot_update_in_float64(kind, k):
    _assert_same_run(_train(kind, 1, F64), _train(kind, k, F64), rel=1e-12)


def test_a_missing_weight_would_be_seen():
    """The tolerance's power: micro-batch gradients summed without the 1/k weight (twice the
    update for k = 2) differ from the one-shot run far beyond it."""
    one = _train("dsm_mean", 1, F64)
    real = losses.optimization.accumulate_gradients

    def unweighted(loss_fn, model, batch, *, grad_accum=1, **kwargs):
        return real(lambda *a, **kw: loss_fn(*a, **kw) * grad_accum, model, batch,
                    grad_accum=grad_accum, **kwargs)

    losses.optimization.accumulate_gradients = unweighted
    try:
        wrong = _train("dsm_mean", 2, F64)
    finally:
        losses.optimization.accumulate_gradients = real
    moved = max((a - b).abs().max() for a, b in zip(one["params"], one["init"]))
    assert max((a - b).abs().max() for a, b in zip(one["params"], wrong["params"])) > 0.1 * moved


def test_micro_batches_and_the_config_refuse_uneven_splits_naming_the_values():
    with pytest.raises(ValueError, match="grad_accum=3 must divide the 16 rows"):
        losses.micro_batches(slice(0, 16), 3)
    assert losses.micro_batches(slice(8, 16), 2) == [slice(8, 12), slice(12, 16)]
    config = ml_collections.ConfigDict(dict(training=dict(batch_size=16, grad_accum=3)))
    with pytest.raises(ValueError, match=r"grad_accum=3 must divide the 8 rows per process .*"
                                         r"valid: 1, 2, 4, 8"):
        acceleration.check_acceleration_config(config, world_size=2)
    for bad in (0, 1.5, True):
        config = ml_collections.ConfigDict(dict(training=dict(batch_size=16, grad_accum=bad)))
        with pytest.raises(ValueError, match=f"grad_accum must be an integer >= 1, got {bad!r}"):
            acceleration.check_acceleration_config(config)
    with pytest.raises(ValueError, match="pass a torch.Generator"):
        _step_without_generator()


def _step_without_generator():
    sde = sde_lib.VPSDE()
    model = Net()
    step_fn = losses.get_step_fn(sde, True, losses.optimization_manager(_config()),
                                 grad_accum=2)
    state = dict(model=model, optimizer=losses.get_optimizer(_config(), model.parameters()),
                 step=0)
    step_fn(state, torch.rand(4, 3))


def test_ddp_all_reduces_once_per_accumulated_step(tmp_path):
    """``no_sync`` on the first k - 1 micro-batches: the communication hook runs once per
    bucket per step, not once per micro-batch (a one-rank Gloo group)."""
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = Net()
        ddp = DistributedDataParallel(model)
        calls = []

        def hook(state, bucket):
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, hook)
        sde = sde_lib.VPSDE()
        loss_fn = losses.get_sde_loss_fn(sde, train=True)
        batch = torch.rand(16, 3, generator=torch.Generator().manual_seed(1))
        grads = {}
        for k in (1, 4):
            calls.clear()
            ddp.zero_grad(set_to_none=True)
            losses.accumulate_gradients(loss_fn, ddp, batch,
                                        generator=torch.Generator().manual_seed(2),
                                        shard=slice(0, 16), grad_accum=k)
            grads[k] = ([p.grad.clone() for p in model.parameters()], len(calls))
        assert grads[4][1] == grads[1][1] >= 1
        for a, b in zip(grads[1][0], grads[4][0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_with_accumulation_train_like_one_process(tmp_path):
    """A 2-rank run with grad_accum = 2 (micro-batches of 8 rows per rank) ends with the
    one-process one-shot run's weights (toy_2d, 4 steps)."""
    from test_distributed import TOY, _final, _fresh_model_state, _main

    _main(*TOY, "--config.training.n_iters=4", "--config.training.grad_accum=2",
          f"--workdir={tmp_path / 'two'}", nproc=2)
    _main(*TOY, "--config.training.n_iters=4", f"--workdir={tmp_path / 'one'}")
    two, one = _final(tmp_path / "two"), _final(tmp_path / "one")
    assert two["step"] == one["step"] == 4
    moved = max((a - b).abs().max() for a, b in zip(one["model"].values(),
                                                    _fresh_model_state(tmp_path).values()))
    for (name, a), b in zip(one["model"].items(), two["model"].values()):
        assert (a - b).abs().max() <= 1e-5 * moved, name
