"""Training and sampling precision (``training.precision``, ``sampling.precision``,
``eval.likelihood_precision``; ``utils.precision``): the TF32 scope restores torch's flags,
autocast covers the network's forward alone, bf16 training follows fp32 training on digits with
fp32 weights, EMA and checkpoints, fp16 trains with a gradient scaler whose skips stop once it
settles (and which the non-finite guard does not take for failures), bits/dim do not depend on
the training precision, and config errors name the bad value and the choices."""

from __future__ import annotations

import json

import ml_collections
import pytest
import torch

from configs.digits import get_config
from score_sde import datasets, losses
from score_sde.training import acceleration, checkpoints, inference, loop, validation
from score_sde.training.nonfinite import NonFiniteGuard
from score_sde.training.sampling import generate, sampling_record
from score_sde.utils.precision import (
    AutocastModel,
    _tf32_flags,
    network_precision,
    precision_scope,
    resolve_precision,
    unwrap_model,
)


def _tf32_state() -> list:
    return [getattr(obj, attr) for obj, attr, _, _ in _tf32_flags()]


def _tf32_values(on: bool) -> list:
    return [v_on if on else v_off for _, _, v_on, v_off in _tf32_flags()]


class _Recorder:
    """A global forward hook recording, per module call of ``kind``, whether autocast was on and
    the TF32 flags (what the network saw)."""

    def __init__(self, kind: type) -> None:
        self.kind, self.calls = kind, []

    def __enter__(self):
        def hook(module, args, out):
            if isinstance(module, self.kind):
                self.calls.append((torch.is_autocast_enabled("cpu"), _tf32_state(),
                                   out.dtype if isinstance(out, torch.Tensor) else None))
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -- the pieces ----------------------------------------------------------------------------------


def test_auto_resolves_by_device_and_config_errors_name_the_value_and_choices():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda:1") == "tf32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    config = get_config()
    config.device = "cpu"
    config.training.precision = "bf32"
    with pytest.raises(ValueError, match=r"config.training.precision='bf32'; valid: auto, fp32, "
                                         r"tf32, bf16, fp16"):
        validation.validate_config(config)
    config = get_config()
    config.sampling.precision = "fp16"  # no gradient scaler at sampling: not offered
    with pytest.raises(ValueError, match=r"config.sampling.precision='fp16'; valid: fp32, tf32, "
                                         r"bf16"):
        validation.validate_config(config)
    config = get_config()
    config.eval.likelihood_precision = "half"
    with pytest.raises(ValueError, match=r"config.eval.likelihood_precision='half'; valid: "):
        validation.validate_config(config)
    config = ml_collections.ConfigDict(dict(training=dict(batch_size=8, compile="yes")))
    with pytest.raises(TypeError, match="config.training.compile must be True or False, got "
                                        "str 'yes'"):
        acceleration.check_acceleration_config(config)


def test_the_tf32_scope_sets_and_restores_torchs_process_wide_flags():
    outside = _tf32_state()
    flags = _tf32_flags()
    try:
        for obj, attr, on, _ in flags:  # a user who switched TF32 on for the whole process
            setattr(obj, attr, on)
        with precision_scope("fp32"):
            assert _tf32_state() == _tf32_values(False)
            with precision_scope("tf32"):
                assert _tf32_state() == _tf32_values(True)
            assert _tf32_state() == _tf32_values(False)
        assert _tf32_state() == _tf32_values(True)
        with pytest.raises(RuntimeError, match="inside"), precision_scope("fp32"):
            raise RuntimeError("inside")
        assert _tf32_state() == _tf32_values(True)  # restored after an error too
    finally:
        for (obj, attr, _, _), value in zip(flags, outside):
            setattr(obj, attr, value)
    assert _tf32_state() == outside


def test_autocast_covers_the_network_forward_alone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.SiLU(), torch.nn.Linear(64, 16))
    net.learn_sigma = True
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    wrapped = network_precision(net, "bf16")
    assert isinstance(wrapped, AutocastModel) and network_precision(net, "tf32") is net
    assert wrapped.learn_sigma is True and losses.learns_sigma(wrapped)
    assert unwrap_model(wrapped) is net
    assert list(wrapped.state_dict()) == [f"module.{k}" for k in net.state_dict()]
    out, ref = wrapped(x), net(x)
    assert out.dtype == torch.float32  # back in float32 for the loss
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-5 < rel < 3e-2  # it did run in bf16 (8 mantissa bits), and only that far off
    assert wrapped(x.double()).dtype == torch.float64  # a wider solver state stays wider
    assert all(p.dtype == torch.float32 for p in net.parameters())  # master weights
    out.sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())


# -- training on digits --------------------------------------------------------------------------


def _digits(precision: str, nf: int = 8, batch_size: int = 16):
    config = get_config()
    config.device = "cpu"
    config.model.nf = nf
    config.training.batch_size = batch_size
    config.training.precision = precision
    config.eval.batch_size = 4
    return config


def _run(config, steps: int):
    """Per-step losses (steps,) and the final state of ``steps`` steps of ``config``."""
    torch.manual_seed(config.seed)
    state, sde = loop.build(config)
    train_step, _ = loop.get_step_fns(config, sde)
    scaler = datasets.get_data_scaler(config)
    values, scales = [], []
    for _ in range(steps):
        batch, _ = loop.next_batch(state["iterators"]["train"], scaler)
        values.append(train_step(state, batch, generator=state["generators"]["train"]))
        if state.get("grad_scaler") is not None:
            scales.append(state["grad_scaler"].get_scale())
    return torch.stack(values), state, sde, scales


def _moving_average(x: torch.Tensor, window: int) -> torch.Tensor:
    return x.unfold(0, window, 1).mean(dim=1)


def _check_follows_fp32(precision: str, steps: int, window: int, batch_size: int):
    ref, _, _, _ = _run(_digits("fp32", batch_size=batch_size), steps)
    run, state, sde, scales = _run(_digits(precision, batch_size=batch_size), steps)
    ma_ref, ma = _moving_average(ref, window), _moving_average(run, window)
    assert ma[-1] < 0.95 * ma[0] and ma_ref[-1] < 0.95 * ma_ref[0]  # both runs learn
    assert ((ma / ma_ref - 1).abs().max()) <= 0.05
    assert not torch.equal(run, ref)  # the network did run in reduced precision
    for tensor in (*state["model"].parameters(), *state["ema"].shadow_params):
        assert tensor.dtype == torch.float32  # master weights and EMA
    for per_param in state["optimizer"].state.values():
        assert per_param["exp_avg"].dtype == per_param["exp_avg_sq"].dtype == torch.float32
    return state, sde, scales


def test_bf16_training_follows_fp32_on_digits_and_its_checkpoint_samples_in_fp32(tmp_path):
    """The cheap default version of the acceptance run below: 30 steps of batch 8, the 10-step
    moving-average loss within 5 % of fp32's."""
    state, sde, _ = _check_follows_fp32("bf16", steps=30, window=10, batch_size=8)
    config = _digits("bf16", batch_size=8)
    path = tmp_path / "checkpoint.pth"
    checkpoints.save_checkpoint(path, state)
    model, step = inference.load_ema_model(config, path)
    assert step == 30 and all(p.dtype == torch.float32 for p in model.parameters())
    for p, s in zip(model.parameters(), state["ema"].shadow_params):
        assert torch.equal(p, s)  # the EMA weights, fp32 as written
    config.sampling.nfe = 4
    with _Recorder(type(model)) as seen:
        x, info = generate(config, sde, model, (4, 1, 8, 8), inverse_scaler=lambda v: v,
                           generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    assert seen.calls and not any(autocast for autocast, _, _ in seen.calls)  # sampled in fp32
    assert sampling_record(config, info)["precision"]["network"] == "fp32"


@pytest.mark.slow
def test_bf16_training_follows_fp32_over_the_first_100_digits_steps():
    """Acceptance: the 20-step moving-average loss of bf16 within 5 % of fp32's, 100 steps."""
    _check_follows_fp32("bf16", steps=100, window=20, batch_size=16)


@pytest.mark.slow
def test_fp16_training_with_the_scaler_follows_fp32_and_skips_no_step_once_settled():
    _, _, scales = _check_follows_fp32("fp16", steps=100, window=20, batch_size=16)
    drops = [k for k in range(1, len(scales)) if scales[k] < scales[k - 1]]
    assert not drops or max(drops) < 20  # no skip after the scaler settled


def test_fp16_scaler_settles_then_skips_no_step():
    """fp16 autocast with a too-large initial scale (2^24): the first steps overflow and are
    skipped (each halving the scale), then the scale has settled and no step is skipped."""
    import sde_lib

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 64), torch.nn.SiLU(), torch.nn.Linear(64, 4))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, labels):
            return self.net(torch.cat([x, labels[:, None].to(x.dtype) / 1000], dim=1))

    model = Net()
    config = ml_collections.ConfigDict(dict(optim=dict(
        optimizer="Adam", lr=1e-3, beta1=0.9, eps=1e-8, weight_decay=0.0, warmup=0,
        grad_clip=1.0)))
    state = dict(model=model, optimizer=losses.get_optimizer(config, model.parameters()),
                 step=0, grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 24))
    guard = NonFiniteGuard("cpu")
    guard.protect(state["optimizer"], state)
    step_fn = losses.get_step_fn(sde_lib.VPSDE(), True, losses.optimization_manager(config),
                                 precision="fp16")
    g, data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    scales, first = [], [p.detach().clone() for p in model.parameters()]
    for _ in range(60):
        before = state["grad_scaler"].get_scale()
        loss = step_fn(state, torch.randn(32, 4, generator=data), generator=g)
        guard.observe_loss(loss, state["step"])
        guard.end_step()
        scales.append((before, state["grad_scaler"].get_scale()))
    skipped = [k for k, (a, b) in enumerate(scales) if b < a]
    assert skipped and skipped == list(range(len(skipped)))  # a prefix of the run ...
    assert len(skipped) < 30  # ... after which the scale has settled: 30+ steps, no skip
    assert guard.scaler_skips() == len(skipped)
    guard.check()  # scaler skips are no failure
    assert not any(torch.equal(a, b) for a, b in zip(first, model.parameters()))


def test_the_fp16_loss_scale_is_checkpointed_and_restored(tmp_path, caplog):
    """A resumed fp16 run continues with the scale and growth tracker it had; a checkpoint of
    another precision starts the scaler afresh and says so; a corrupt entry is refused."""
    config = _digits("fp16", nf=4, batch_size=4)
    state, _ = loop.build(config)
    settled = dict(state["grad_scaler"].state_dict(), scale=512.0, _growth_tracker=7)
    state["grad_scaler"].load_state_dict(settled)  # as after some steps
    path = tmp_path / "ckpt.pth"
    checkpoints.save_checkpoint(path, state)
    resumed, _ = loop.build(config)
    assert resumed["grad_scaler"].get_scale() != 512.0
    checkpoints.restore_checkpoint(path, resumed)
    assert resumed["grad_scaler"].get_scale() == 512.0
    assert resumed["grad_scaler"].state_dict()["_growth_tracker"] == 7
    fp32 = _digits("fp32", nf=4, batch_size=4)
    plain, _ = loop.build(fp32)
    checkpoints.save_checkpoint(tmp_path / "fp32.pth", plain)
    fresh, _ = loop.build(config)
    with caplog.at_level("WARNING"):
        checkpoints.restore_checkpoint(tmp_path / "fp32.pth", fresh)
    assert "holds no fp16 loss scale" in caplog.text
    assert fresh["grad_scaler"].get_scale() == torch.amp.GradScaler("cpu").get_scale()
    ckpt = torch.load(path, weights_only=True)
    ckpt["grad_scaler"]["scale"] = float("nan")
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(checkpoints.CheckpointError, match="grad_scaler"):
        checkpoints.restore_checkpoint(tmp_path / "bad.pth", loop.build(config)[0])


@pytest.mark.parametrize("fused", [True, False])
def test_the_guard_counts_a_scaler_skip_and_does_not_stop_the_run(fused):
    model = torch.nn.Linear(4, 1)
    optimizer = (torch.optim.Adam(model.parameters(), fused=True) if fused
                 else torch.optim.Adam(model.parameters(), foreach=True))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)
    state = dict(step=0)
    guard = NonFiniteGuard("cpu")
    guard.protect(optimizer, state)
    optimize_fn = losses.optimization_manager(ml_collections.ConfigDict(dict(optim=dict(
        lr=1e-3, warmup=0, grad_clip=-1.0))))
    x = torch.full((2, 4), 1e20)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(x).sum()).backward()  # overflows: inf gradients
    optimize_fn(optimizer, model.parameters(), 0, scaler=scaler)
    guard.end_step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # skipped
    assert guard.scaler_skips() == 1 and scaler.get_scale() == 2.0 ** 119
    guard.check()
    optimizer.zero_grad()
    scaler.scale(model(torch.ones(2, 4)).sum()).backward()
    optimize_fn(optimizer, model.parameters(), 1, scaler=scaler)
    guard.end_step()
    assert guard.scaler_skips() == 1 and not torch.equal(before[0], model.weight)
    guard.check()


# -- bits/dim ------------------------------------------------------------------------------------


def test_bits_per_dim_do_not_depend_on_the_training_precision(tmp_path):
    """``--mode likelihood`` runs in fp32 (no autocast, TF32 off even when the process had it on)
    whatever ``training.precision`` was, and its record says so."""
    config = _digits("fp32")
    torch.manual_seed(0)
    state, _ = loop.build(config)
    checkpoints.save_checkpoint(checkpoints.meta_path(tmp_path), state)
    flags, outside = _tf32_flags(), _tf32_state()
    results = {}
    try:
        for obj, attr, on, _ in flags:
            setattr(obj, attr, on)
        for precision in ("fp32", "bf16", "tf32"):
            config = _digits(precision)
            config.eval.batch_size = 4
            with _Recorder(type(state["model"])) as seen:
                path = inference.run_likelihood(config, tmp_path, f"eval_{precision}",
                                                max_images=4, progress=False)
            assert seen.calls
            assert all(not autocast and tf32 == _tf32_values(False) and dtype == torch.float32
                       for autocast, tf32, dtype in seen.calls)
            record = json.loads(path.read_text())
            assert record["precision"]["network"] == "fp32"
            assert record["precision"]["tf32"] is False
            assert record["precision"]["training_precision"] == precision
            results[precision] = record["bpd"]
        assert _tf32_state() == _tf32_values(True)  # the process's flags, restored
    finally:
        for (obj, attr, _, _), value in zip(flags, outside):
            setattr(obj, attr, value)
    assert len(set(results.values())) == 1, results
