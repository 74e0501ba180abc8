"""Improved-DDPM training (Nichol & Dhariwal 2021): the hybrid objective's gradients, the
importance sampler of the steps (history, weights, checkpoints, data-parallel gather), the
config rules, training a tiny model, and ``--mode likelihood`` by the variational bound."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

import sde_lib
from score_sde import losses
from score_sde.discrete_diffusion import (
    RespacedProcess,
    VLBImportanceSampler,
    hybrid_loss_terms,
    schedule,
)
from score_sde.training import checkpoints, inference, validation
from score_sde.training.loop import train

F64 = torch.float64


class LearnedVarianceNet(torch.nn.Module):
    """A tiny network for (B, D) data outputting (eps, v): 2 D channels, ``learn_sigma``."""

    learn_sigma = True

    def __init__(self, dim: int = 3, learn_sigma: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.learn_sigma = learn_sigma
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, 32), torch.nn.SiLU(),
                                       torch.nn.Linear(32, 2 * dim if learn_sigma else dim))

    def forward(self, x, labels):
        return self.net(torch.cat([x, labels[:, None].to(x.dtype) / 100], dim=1))


def test_l_vlb_reaches_only_v_and_l_simple_only_eps():
    """Nichol & Dhariwal 2021, Sec. 3.1: the stop-gradient on the mean's eps in L_vlb."""
    process = RespacedProcess.from_sde(sde_lib.DiscreteVPSDE(N=50, beta_end=0.2))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, generator=g, dtype=F64) * 2 - 1, torch.randn(4, 3, generator=g,
                                                                               dtype=F64)
    i = torch.tensor([0, 3, 20, 49])
    x_t = process.q_sample(x0, i, noise)
    eps = (noise + 0.1 * torch.randn(4, 3, generator=g, dtype=F64)).requires_grad_(True)
    v = (0.2 * torch.randn(4, 3, generator=g, dtype=F64)).requires_grad_(True)
    terms = hybrid_loss_terms(process, eps, v, x0, x_t, i, noise)
    d_eps, d_v = torch.autograd.grad(terms["vb"].sum(), (eps, v), allow_unused=True)
    assert d_eps is None and d_v.abs().min() > 0
    d_eps, d_v = torch.autograd.grad(terms["mse"].sum(), (eps, v), allow_unused=True)
    assert d_v is None
    torch.testing.assert_close(d_eps, 2 * (eps - noise).detach() / 3)
    rescaled = hybrid_loss_terms(process, eps, v, x0, x_t, i, noise, rescale=True)
    torch.testing.assert_close(rescaled["vb"], terms["vb"] * 50 / 1000)


# -- the importance sampler -------------------------------------------------------------------


def test_importance_sampler_is_uniform_until_warm_then_follows_the_second_moment():
    sampler = VLBImportanceSampler(4, history=3, uniform_prob=0.01)
    reference = {t: [] for t in range(4)}
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        torch.testing.assert_close(sampler.probs(), torch.full((4,), 0.25))
        t = torch.tensor([0, 1, 1, 2, 3, 3, 3, 3, 3])  # step 3 more often than the history holds
        values = torch.rand(9, generator=g)
        sampler.update(t, values)
        for k, val in zip(t.tolist(), values.tolist()):
            reference[k] = (reference[k] + [val])[-3:]
        if all(len(r) == 3 for r in reference.values()):
            break
    for k in range(4):  # the last 3 values of each step (ring order)
        assert sorted(sampler.history[k].tolist()) == pytest.approx(sorted(reference[k]))
    rms = torch.tensor([math.sqrt(sum(v * v for v in reference[k]) / 3) for k in range(4)])
    expected = 0.99 * rms / rms.sum() + 0.01 / 4
    torch.testing.assert_close(sampler.probs(), expected.float())
    t, w = sampler.sample(20000, torch.Generator().manual_seed(1))
    freq = torch.bincount(t, minlength=4) / 20000.0
    assert (freq - expected).abs().max() < 4 * math.sqrt(0.25 / 20000)  # 4 standard errors
    torch.testing.assert_close(w, 1 / (4 * expected.float()[t]))
    # the weighted mean of any per-step value is unbiased for its uniform mean
    per_step = torch.tensor([1.0, 5.0, -2.0, 0.5])
    assert float((w * per_step[t]).mean()) == pytest.approx(float(per_step.mean()), abs=0.05)


def test_importance_sampler_state_round_trips_and_bad_states_are_refused():
    a = VLBImportanceSampler(5, history=2)
    a.update(torch.tensor([0, 1, 2, 3, 4, 4, 4]), torch.arange(7.0))
    b = VLBImportanceSampler(5, history=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.history, b.history) and torch.equal(a.seen, b.seen)
    with pytest.raises(ValueError, match=r"'history' must be a finite tensor of shape \(5, 2\)"):
        b.load_state_dict({"history": torch.zeros(5, 3), "seen": torch.zeros(5)})
    with pytest.raises(ValueError, match="uniform_prob"):
        VLBImportanceSampler(5, uniform_prob=1.0)


def test_the_history_gathers_every_ranks_rows(monkeypatch):
    """Under torch.distributed each rank holds its rows of the losses; update() all-gathers
    them (rank order), so every rank's history is the one-process history."""
    t = torch.tensor([0, 2, 2, 1, 3, 0])
    values = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 5.0])
    whole = VLBImportanceSampler(4, history=2)
    whole.update(t, values)

    class FakeDist:  # two ranks, this one rank 1
        @staticmethod
        def is_available():
            return True

        is_initialized = is_available

        @staticmethod
        def get_world_size():
            return 2

        @staticmethod
        def get_backend():
            return "gloo"

        @staticmethod
        def all_gather(parts, local):
            parts[0].copy_(values[:3])
            parts[1].copy_(local)

    monkeypatch.setattr(schedule, "dist", FakeDist)
    rank1 = VLBImportanceSampler(4, history=2)
    rank1.update(t, values[3:], shard=slice(3, 6))
    assert torch.equal(rank1.history, whole.history) and torch.equal(rank1.seen, whole.seen)


# -- the loss function and the step function -----------------------------------------------------


def _loss_and_grads(loss_fn, model, batch, shard=None, seed=5):
    model.zero_grad()
    loss = loss_fn(model, batch, generator=torch.Generator().manual_seed(seed), shard=shard)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("importance", [False, True])
def test_sharded_hybrid_losses_average_to_the_whole_batch_loss(importance):
    sde = sde_lib.DiscreteVPSDE(N=8, beta_end=0.3)
    batch = torch.rand(8, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = LearnedVarianceNet()

    def make():
        sampler = None
        if importance:  # warm, so that the weights are not all 1
            sampler = VLBImportanceSampler(sde.N, history=1)
            sampler.update(torch.arange(sde.N), torch.linspace(0.1, 3.0, sde.N))
        return losses.get_hybrid_loss_fn(sde, train=True, importance_sampler=sampler), sampler

    loss_fn, whole_sampler = make()
    whole, whole_grads = _loss_and_grads(loss_fn, model, batch)
    parts = []
    for r in range(2):
        loss_fn, _ = make()
        parts.append(_loss_and_grads(loss_fn, model, batch, shard=slice(4 * r, 4 * r + 4)))
    torch.testing.assert_close(torch.stack([p[0] for p in parts]).mean(), whole)
    for k, g in enumerate(whole_grads):
        torch.testing.assert_close(torch.stack([p[1][k] for p in parts]).mean(0), g)
    if importance:
        assert int(whole_sampler.seen.sum()) == sde.N + 8  # the batch's steps were recorded


def test_hybrid_training_steps_reduce_the_loss():
    sde = sde_lib.DiscreteVPSDE(N=20, beta_end=0.3)
    model = LearnedVarianceNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    step_fn = losses.get_step_fn(sde, True, lambda opt, params, step: opt.step(),
                                 continuous=False, reduce_mean=True, loss="hybrid",
                                 vlb_rescale=True)
    eval_fn = losses.get_step_fn(sde, False, continuous=False, reduce_mean=True, loss="hybrid")
    state = dict(model=model, optimizer=optimizer, step=0, ema=None)
    batch = torch.rand(64, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1

    def held_out():
        return float(eval_fn(state, batch, generator=torch.Generator().manual_seed(9)))

    before = held_out()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        assert torch.isfinite(step_fn(state, batch, generator=g))
    assert state["step"] == 40 and held_out() < 0.8 * before


def test_the_objective_and_the_model_must_agree():
    sde = sde_lib.DiscreteVPSDE(N=20, beta_end=0.3)
    batch = torch.rand(4, 3)
    with pytest.raises(ValueError, match="v would never be trained"):
        losses.get_ddpm_loss_fn(sde, train=True)(LearnedVarianceNet(), batch)
    with pytest.raises(ValueError, match="needs a model with learned variances"):
        losses.get_hybrid_loss_fn(sde, train=True)(LearnedVarianceNet(learn_sigma=False), batch)
    with pytest.raises(ValueError, match="needs continuous=False"):
        losses.get_step_fn(sde, False, continuous=True, loss="hybrid")
    with pytest.raises(ValueError, match="valid: simple, hybrid"):
        losses.get_step_fn(sde, False, continuous=False, loss="vlb")
    with pytest.raises(ValueError, match="needs loss='hybrid'"):
        losses.get_step_fn(sde, False, continuous=False,
                           importance_sampler=VLBImportanceSampler(20))
    with pytest.raises(ValueError, match="Hybrid .* needs an SDE with the vp_discrete or vp_index"):
        losses.get_hybrid_loss_fn(sde_lib.VESDE(N=10), train=True)


# -- configs, training, checkpoints and --mode likelihood ----------------------------------------


def _tiny_config(n_iters=4, **training):
    config = importlib.import_module("configs.digits").get_config()
    config.device = "cpu"
    config.model.nf = 8
    config.model.learn_sigma = True
    config.model.num_scales = 20
    t = config.training
    t.sde, t.continuous, t.loss = "discrete_vpsde", False, "hybrid"
    t.n_iters, t.batch_size, t.snapshot_sampling = n_iters, 8, False
    t.snapshot_freq, t.snapshot_freq_for_preemption, t.log_freq, t.eval_freq = 100, 2, 1, 2
    for key, value in training.items():
        t[key] = value
    config.eval.batch_size = 8
    return config


@pytest.mark.parametrize("change, message", [
    (dict(loss="hybrid", continuous=True), "needs training.continuous=False"),
    (dict(loss="simple"), "would never train the variances"),
    (dict(vlb_importance_sampling=True, loss="simple"), "would never train"),
    (dict(loss="l1"), r"config.training.loss='l1'; valid: simple, hybrid"),
    (dict(reduce_mean=False), "set config.training.reduce_mean=True"),
])
def test_the_config_rules_of_improved_ddpm(change, message):
    validation.validate_config(_tiny_config())
    with pytest.raises(ValueError, match=message):
        validation.validate_config(_tiny_config(**change))
    config = _tiny_config()
    config.model.learn_sigma = False
    with pytest.raises(ValueError, match="needs config.model.learn_sigma=True"):
        validation.validate_config(config)
    config = _tiny_config()
    config.eval.bpd_method, config.eval.vlb_spacing = "vlb", "ddim8"
    with pytest.raises(ValueError, match="no stride"):
        validation.validate_config(config)
    config.training.continuous, config.eval.vlb_spacing = True, None
    config.training.loss = "simple"
    config.model.learn_sigma = False
    with pytest.raises(ValueError, match="bpd_method='vlb' needs a discrete DDPM model"):
        validation.validate_config(config)


class Preempted(Exception):
    pass


def test_the_importance_history_is_checkpointed_and_resumes_bitwise(tmp_path):
    """A hybrid run with importance sampling: the checkpoint holds the history of every step's
    L_vlb; a run preempted after step 2 and resumed ends where the uninterrupted run ends."""
    config = _tiny_config(4, vlb_importance_sampling=True)
    torch.manual_seed(0)
    whole = train(config, tmp_path / "a", progress=False)
    saved = torch.load(checkpoints.meta_path(tmp_path / "a"), weights_only=True)
    assert int(saved["importance_sampler"]["seen"].sum()) == 4 * 8  # 4 steps of 8 samples
    assert torch.equal(saved["importance_sampler"]["history"], whole["importance_sampler"].history)

    def preempt(state):
        if state["step"] == 2:
            raise Preempted

    torch.manual_seed(0)
    with pytest.raises(Preempted):
        train(config, tmp_path / "b", hooks=[preempt], progress=False)
    resumed = train(config, tmp_path / "b", progress=False)
    assert torch.equal(resumed["importance_sampler"].history, whole["importance_sampler"].history)
    for a, b in zip(whole["model"].parameters(), resumed["model"].parameters()):
        assert torch.equal(a, b)


def test_likelihood_mode_by_the_variational_bound_names_its_method(tmp_path):
    config = _tiny_config(2)
    torch.manual_seed(0)
    train(config, tmp_path, progress=False)
    config.eval.bpd_method, config.eval.vlb_spacing = "vlb", "5"
    path = inference.run_likelihood(config, tmp_path, max_images=6, progress=False)
    record = json.loads(path.read_text())
    assert record["bpd_method"] == "vlb" and record["nfe"] == 5 * 1  # one batch of 6 images
    assert record["likelihood"]["variance"] == "learned" and record["likelihood"]["steps"] == 5
    assert record["likelihood"]["spacing"] == "5" and "variational bound" in record["bound"]
    assert record["levels"] == 17 and math.isfinite(record["bpd"]) and record["bpd"] > 0
    # --mode eval's bits/dim follow eval.bpd_method too
    from models.utils import get_score_fn
    from score_sde.evaluation.run import eval_bpd
    from score_sde.training.sampling import get_sde

    model, _ = inference.load_ema_model(config, checkpoints.meta_path(tmp_path))
    sde = get_sde(config)
    config.eval.batch_size = 150
    summary = eval_bpd(config, get_score_fn(sde, model, continuous=False), sde,
                       tmp_path / "bpd.npz", progress=False)
    assert summary["bpd_method"] == "vlb" and summary["nfe"] == 5 * 2  # 297 images, 2 batches
    assert summary["num_images"] == 297 and math.isfinite(summary["mean"])


def test_the_sampling_record_names_the_ddpm_options_as_run():
    from score_sde.training.sampling import sampling_options, sampling_record

    config = importlib.import_module("configs.digits").get_config()
    config.sampling.method = "ddpm"
    method, options = sampling_options(config)
    assert method == "ddpm" and options == {"nfe": 30}  # the config's budget: 30 steps
    record = sampling_record(config, {"nfe": 30, "variance": "large"})
    assert record["options"] == {"spacing": "30", "nfe": 30, "variance": "large",
                                 "clip_denoised": False}


@pytest.mark.slow
def test_two_gloo_ranks_keep_one_importance_history(tmp_path):
    """Hybrid training with importance sampling under torchrun: both ranks record the whole
    global batch's L_vlb (gathered), so the 2-rank run ends like the one-process run."""
    from test_distributed import _final, _main

    hybrid = [
        "--config=digits", "--config.model.nf=8", "--config.model.learn_sigma=True",
        "--config.model.num_scales=4", "--config.training.sde=discrete_vpsde",
        "--config.training.continuous=False", "--config.training.loss=hybrid",
        "--config.training.vlb_importance_sampling=True", "--config.training.batch_size=8",
        "--config.training.n_iters=8", "--config.training.snapshot_freq=100",
        "--config.training.snapshot_freq_for_preemption=4", "--config.training.log_freq=1",
        "--config.training.eval_freq=4", "--config.training.snapshot_sampling=False",
        "--config.optim.warmup=0", "--noprogress",
    ]
    _main(*hybrid, f"--workdir={tmp_path / 'two'}", nproc=2)
    _main(*hybrid, f"--workdir={tmp_path / 'one'}")
    two, one = _final(tmp_path / "two"), _final(tmp_path / "one")
    # 8 steps of 8 samples over 4 steps: warm (10 values each) after 5 training steps
    assert torch.equal(two["importance_sampler"]["seen"], one["importance_sampler"]["seen"])
    assert int(one["importance_sampler"]["seen"].sum()) == 64
    torch.testing.assert_close(two["importance_sampler"]["history"],
                               one["importance_sampler"]["history"], rtol=1e-4, atol=1e-6)
    for a, b in zip(one["model"].values(), two["model"].values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
