"""Memory options (models.memory): activation checkpointing and the channels_last layout.

Each network family, shrunk as in test_configs (a few k parameters), with its parameters
perturbed away from the initialisation (DiT's adaLN-Zero and the U-Nets' near-zero output convs
would otherwise make most gradients vanish and the comparisons empty):

* grad_checkpoint recomputes the same function with the same dropout masks, so gradients equal the
  plain model's to 1e-6 relative (the issue's bound; they are bit-identical on CPU); the
  recomputation is checked to happen (each block runs twice) where it should, and only there;
* channels_last changes the summation order of the convolutions only: outputs and gradients
  within 1e-5 relative in float32 (the issue's bound), 1e-12 in float64. A wrong weight layout,
  a transposed input or a missed block would be off by O(1).
"""

from __future__ import annotations

import importlib
import io
import os
import shutil

import ml_collections
import pytest
import torch

from configs.registry import CONFIGS
from models.memory import CheckpointedBlock, set_grad_checkpoint
from models.utils import create_model

# family -> (config name, model overrides, weight perturbation): every block type that can be
# recomputed is covered (NCSN++ / DDPM++ BigGAN and DDPM++ blocks, AttnBlockpp; DDPM's
# ResnetBlockDDPM and AttnBlock; NCSNv2's ResidualBlock and RefineBlock; DiTBlock). NCSNv2 has no
# zero-initialised layer and is left as built: perturbed, its instance norms on 2x2 maps become
# so ill-conditioned that float32 itself is only good to 1e-3.
FAMILIES = {
    "ncsnpp": ("ve_cifar", {}, 0.05),
    "ddpmpp": ("vp_cifar", {}, 0.05),
    "ddpmpp_ddpm_blocks": ("vp_cifar", {"resblock_type": "ddpm"}, 0.05),
    "ddpm": ("ddpm_cifar", {}, 0.05),
    "ncsnv2": ("ncsn_cifar", {}, 0.0),
    "dit": ("dit_digits", {}, 0.05),
}
UNETS = [f for f in FAMILIES if f != "dit"]


def _config(family: str, **model):
    name, overrides, _ = FAMILIES[family]
    config = importlib.import_module(CONFIGS[name]).get_config()
    config.device = "cpu"
    config.model.num_scales = 10
    if config.model.name == "dit":
        config.model.update(hidden_size=32, depth=2, num_heads=2)
        config.data.image_size = 8
    else:
        config.model.nf = 16 if config.model.name.startswith("ncsnv2") else 32
        if "ch_mult" in config.model:
            config.model.ch_mult, config.model.num_res_blocks = (1, 2), 1
            config.model.attn_resolutions, config.data.image_size = (8,), 16
    config.model.update({**overrides, **model})
    return config


def _model(family: str, dtype=torch.float32, **model) -> torch.nn.Module:
    """The family's tiny model, the same weights whatever the memory options."""
    torch.manual_seed(0)
    net = create_model(_config(family, **model)).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(FAMILIES[family][2] * torch.randn(p.shape, generator=g).to(p))
    return net


def _inputs(family: str, dtype=torch.float32):
    """x (B, C, H, W) and the time labels (B,) the family takes, and a fixed cotangent."""
    config = _config(family)
    g = torch.Generator().manual_seed(2)
    size, channels = config.data.image_size, config.data.num_channels
    x = torch.randn(3, channels, size, size, generator=g, dtype=dtype)
    if family == "ncsnpp":  # Fourier embedding of sigma
        labels = torch.rand(3, generator=g, dtype=dtype) + 0.1
    elif family == "ncsnv2":  # integer indices into sigmas
        labels = torch.randint(0, 10, (3,), generator=g)
    else:  # float time labels
        labels = torch.rand(3, generator=g, dtype=dtype) * 9
    return x, labels


def _grads(net: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, train: bool,
           seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and the gradients (parameters and x) of <w, net(x)> for a fixed w."""
    net.train(train)
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the dropout masks
    out = net(x, labels)
    w = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * w).sum().backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    grads["x"] = x.grad
    return out.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _assert_grads_close(got: dict, expected: dict, tol: float, tensor_tol: float = 0.0) -> None:
    """All gradients (parameters and x) within ``tol`` of the expected ones, relative to the
    largest; each tensor also within ``max(tol, tensor_tol)`` relative to its own largest entry
    (``tensor_tol`` leaves room for float32 cancellation in sums such as a bias gradient). A
    tensor whose gradient vanishes analytically (a conv bias before a GroupNorm with one channel
    per group, the key bias of attention) is measured against 1e-2 of the largest gradient."""
    assert got.keys() == expected.keys() and len(expected) > 10
    top = max(float(g.abs().max()) for g in expected.values())
    assert top > 0
    for name, g in expected.items():
        error = float((got[name] - g).abs().max())
        assert error <= tol * top, name
        assert error <= max(tol, tensor_tol) * max(float(g.abs().max()), 1e-2 * top), name


def _count_block_calls(net: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(module, args):
        calls[0] += 1

    for m in net.modules():
        if isinstance(m, CheckpointedBlock):
            m.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("family", FAMILIES)
def test_grad_checkpoint_gradients_equal_the_plain_model(family, train):
    x, labels = _inputs(family)
    plain, ckpt = _model(family), _model(family, grad_checkpoint=True)
    assert plain.state_dict().keys() == ckpt.state_dict().keys()
    plain_calls, ckpt_calls = _count_block_calls(plain), _count_block_calls(ckpt)
    out, expected = _grads(plain, x, labels, train)
    out_ckpt, got = _grads(ckpt, x, labels, train)
    assert torch.equal(out, out_ckpt)
    _assert_grads_close(got, expected, 1e-6)
    # The recomputation happens (each block runs again in backward) in training mode only.
    assert plain_calls[0] > 0
    assert ckpt_calls[0] == (2 if train else 1) * plain_calls[0]


@pytest.mark.parametrize("family", ["ddpmpp", "ddpm"])
def test_grad_checkpoint_recomputes_the_same_dropout_masks(family):
    """With dropout the training-mode output differs from eval's, yet checkpointed gradients
    equal the plain ones: the recomputation draws the forward pass's masks again."""
    x, labels = _inputs(family)
    plain, ckpt = _model(family, dropout=0.5), _model(family, dropout=0.5, grad_checkpoint=True)
    out_eval, _ = _grads(plain, x, labels, train=False)
    out, expected = _grads(plain, x, labels, train=True)
    assert _rel(out, out_eval) > 1e-2  # dropout is active
    _, got = _grads(ckpt, x, labels, train=True)
    _assert_grads_close(got, expected, 1e-6)
    # The RNG leaves the checkpointed step where the plain one leaves it.
    torch.manual_seed(5)
    plain.train()(x, labels).sum().backward()
    after_plain = torch.rand(4)
    torch.manual_seed(5)
    ckpt.train()(x, labels).sum().backward()
    assert torch.equal(torch.rand(4), after_plain)


def test_grad_checkpoint_is_off_without_gradients_and_switchable():
    net = _model("ddpmpp", grad_checkpoint=True).train()
    calls = _count_block_calls(net)
    x, labels = _inputs("ddpmpp")
    with torch.no_grad():
        net(x, labels)
    per_pass = calls[0]
    assert per_pass > 0
    assert set_grad_checkpoint(net, False) == per_pass  # every block is called once per pass
    net(x, labels).sum().backward()
    assert calls[0] == 2 * per_pass  # plain: no recomputation
    assert set_grad_checkpoint(net, True) == per_pass
    net(x, labels).sum().backward()
    assert calls[0] == 4 * per_pass  # forward + recomputation


def test_grad_checkpoint_supports_the_double_backward_of_sliced_score_matching():
    """SSM's loss holds grad_x(v^T score) (create_graph): its parameter gradients pass through
    the recomputed blocks twice."""
    x, labels = _inputs("ddpmpp")
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for flag in (False, True):
        net = _model("ddpmpp", dropout=0.0, grad_checkpoint=flag).train()
        x_in = x.clone().requires_grad_(True)
        score = net(x_in, labels)
        (jvp,) = torch.autograd.grad((score * v).sum(), x_in, create_graph=True)
        ((v * jvp).sum() + 0.5 * score.square().sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    assert _rel(grads[1], grads[0]) <= 1e-6


@pytest.mark.parametrize("family", UNETS)
def test_channels_last_outputs_and_gradients_equal_the_default_layout(family):
    x, labels = _inputs(family)
    plain, nhwc = _model(family), _model(family, channels_last=True)
    convs = [p for p in nhwc.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # really NHWC, not 1x1 trivia
    # Eval mode: dropout masks are drawn in memory order, so they differ between layouts.
    out, expected = _grads(plain, x, labels, train=False)
    out_nhwc, got = _grads(nhwc, x, labels, train=False)
    assert out_nhwc.is_contiguous()  # returned in the default layout
    assert _rel(out_nhwc, out) <= 1e-5
    _assert_grads_close(got, expected, 1e-5, tensor_tol=1e-4)


def test_channels_last_in_float64_equals_to_round_off():
    x, labels = _inputs("ncsnpp", torch.float64)
    out, expected = _grads(_model("ncsnpp", torch.float64), x, labels, train=False)
    out_nhwc, got = _grads(_model("ncsnpp", torch.float64, channels_last=True), x, labels,
                           train=False)
    assert _rel(out_nhwc, out) <= 1e-12
    _assert_grads_close(got, expected, 1e-12)


def test_channels_last_with_grad_checkpoint_in_training():
    x, labels = _inputs("ddpm")
    out, expected = _grads(_model("ddpm", dropout=0.0), x, labels, train=True)
    both = _model("ddpm", dropout=0.0, grad_checkpoint=True, channels_last=True)
    out_both, got = _grads(both, x, labels, train=True)
    assert _rel(out_both, out) <= 1e-5
    _assert_grads_close(got, expected, 1e-5, tensor_tol=1e-4)


def test_channels_last_checkpoints_load_both_ways():
    """Same keys; a channels_last model's saved state dict loads strictly into a default-layout
    model and back, and both give the same outputs."""
    x, labels = _inputs("ddpmpp")
    nhwc = _model("ddpmpp", channels_last=True).eval()
    buffer = io.BytesIO()
    torch.save(nhwc.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(7)
    plain = create_model(_config("ddpmpp")).eval()
    assert plain.state_dict().keys() == state.keys()
    plain.load_state_dict(state, strict=True)
    assert all(p.is_contiguous() for p in plain.parameters())
    with torch.no_grad():
        assert _rel(plain(x, labels), nhwc(x, labels)) <= 1e-5
    back = create_model(_config("ddpmpp", channels_last=True)).eval()
    back.load_state_dict(plain.state_dict(), strict=True)
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in back.parameters() if p.dim() == 4)
    for name, p in back.state_dict().items():
        assert torch.equal(p, state[name]), name


def test_every_config_carries_the_memory_keys_off():
    for name in CONFIGS:
        model = importlib.import_module(CONFIGS[name]).get_config().model
        assert (model.grad_checkpoint, model.channels_last) == (False, False), name


def test_unsupported_options_are_refused_naming_the_model():
    from score_sde.training.validation import validate_config

    dit = _config("dit", channels_last=True)
    with pytest.raises(ValueError, match=r"dit does not support config.model.channels_last"):
        create_model(dit)
    with pytest.raises(ValueError, match=r"dit does not support config.model.channels_last"):
        validate_config(dit)
    toy = importlib.import_module(CONFIGS["toy_2d"]).get_config()
    for key in ("grad_checkpoint", "channels_last"):
        config = toy.copy_and_resolve_references()
        config.model[key] = True
        with pytest.raises(ValueError, match=rf"mlp does not support config.model.{key} = True"):
            validate_config(config)
    config = ml_collections.ConfigDict(_config("ddpm").to_dict(), type_safe=False)
    config.model.grad_checkpoint = "yes"
    with pytest.raises(TypeError, match=r"config.model.grad_checkpoint must be True or False, "
                                        r"got str 'yes'"):
        validate_config(config)
    with pytest.raises(ValueError, match=r"config.model.grad_checkpoint must be True or False"):
        create_model(config)
    validate_config(_config("ddpm", grad_checkpoint=True, channels_last=True))


@pytest.mark.parametrize("name", ["digits", "dit_digits"])
def test_training_steps_with_grad_checkpoint_equal_the_plain_ones(name):
    """Two steps of the training loop's step function (loss, backward, clipping, Adam): the
    same weights with and without checkpointing; channels_last gives the same first loss."""
    from score_sde import losses
    from score_sde.datasets import data_shape, get_data_scaler
    from score_sde.training.loop import get_step_fns
    from score_sde.training.sampling import get_sde

    def run(**model):
        config = importlib.import_module(CONFIGS[name]).get_config()
        config.device = "cpu"
        config.model.update(model)
        torch.manual_seed(0)
        net = create_model(config)
        initial = torch.cat([p.detach().flatten() for p in net.parameters()])
        state = dict(model=net, step=0, ema=None,
                     optimizer=losses.get_optimizer(config, net.parameters()))
        train_step, _ = get_step_fns(config, get_sde(config))
        g = torch.Generator().manual_seed(1)
        x = get_data_scaler(config)(torch.rand(8, *data_shape(config), generator=g))
        step_losses = [train_step(state, x, generator=g) for _ in range(2)]
        final = torch.cat([p.detach().flatten() for p in net.parameters()])
        return torch.stack(step_losses), final - initial

    plain_losses, plain_update = run()
    ckpt_losses, ckpt_update = run(grad_checkpoint=True)
    assert plain_update.abs().max() > 0
    assert torch.equal(ckpt_losses, plain_losses)
    assert _rel(ckpt_update, plain_update) <= 1e-6
    if name == "digits":  # dropout 0: the first loss is the same function of the same weights
        nhwc_losses, _ = run(channels_last=True)
        assert _rel(nhwc_losses[:1], plain_losses[:1]) <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile's inductor needs a C++ compiler")
def test_grad_checkpoint_under_torch_compile():
    """The compiled checkpointed model (inductor) gives the eager plain model's output and
    gradients to float32 round-off, and keeps the plain state-dict keys under ``_orig_mod``."""
    x, labels = _inputs("ddpmpp")
    out, expected = _grads(_model("ddpmpp", dropout=0.0), x, labels, train=True)
    net = _model("ddpmpp", dropout=0.0, grad_checkpoint=True)
    compiled = torch.compile(net)
    out_compiled, got = _grads(compiled, x, labels, train=True)
    got = {k.removeprefix("_orig_mod."): v for k, v in got.items()}
    assert _rel(out_compiled, out) <= 1e-5
    _assert_grads_close(got, expected, 1e-5, tensor_tol=1e-4)
    assert net.state_dict().keys() == _model("ddpmpp").state_dict().keys()


def test_resuming_across_a_channels_last_switch_keeps_the_adam_update(tmp_path):
    """A training checkpoint written in the default layout, resumed with channels_last (and back):
    the next optimizer step equals the one of an unswitched resume. Torch's fused Adam assumes
    its buffers laid out as the parameters; restore_checkpoint re-lays them out
    (models.memory.match_optimizer_state_layout), without which the step is off by O(lr)."""
    from score_sde.training import checkpoints, loop

    def built(channels_last: bool):
        config = importlib.import_module(CONFIGS["digits"]).get_config()
        config.device = "cpu"
        config.model.channels_last = channels_last
        torch.manual_seed(0)
        state, _ = loop.build(config)
        return state

    def step(state) -> torch.Tensor:
        """One optimizer step with fixed gradients (in each parameter's own layout)."""
        g = torch.Generator().manual_seed(4)
        for p in state["model"].parameters():
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))
        state["optimizer"].step()
        return torch.cat([p.detach().flatten() for p in state["model"].parameters()])

    for written_in in (False, True):
        source = built(written_in)
        step(source)  # the optimizer now holds exp_avg, exp_avg_sq in the source's layout
        path = tmp_path / f"checkpoint_{written_in}.pth"
        checkpoints.save_checkpoint(path, source)
        same, switched = built(written_in), built(not written_in)
        for state in (same, switched):
            checkpoints.restore_checkpoint(path, state)
        for p in switched["model"].parameters():
            for buffer in switched["optimizer"].state[p].values():
                if buffer.shape == p.shape:
                    assert buffer.stride() == p.stride()
        before = torch.cat([p.detach().flatten() for p in same["model"].parameters()])
        expected = step(same)
        assert _rel(step(switched) - before, expected - before) <= 1e-6


@pytest.mark.slow
def test_two_gloo_ranks_with_grad_checkpoint_and_channels_last_train_like_plain(tmp_path):
    """DDP (2 Gloo ranks under torchrun) with both options: the weights after 3 steps are the
    plain 2-rank run's (Adam's eps = 10 makes the update proportional to the gradient, so a
    wrong gradient is not normalised away)."""
    from test_distributed import _final, _main

    run = ["--config=digits", "--config.training.batch_size=16", "--config.training.n_iters=3",
           "--config.training.snapshot_freq=100",
           "--config.training.snapshot_freq_for_preemption=3", "--config.training.log_freq=1",
           "--config.training.eval_freq=100",
           "--config.training.snapshot_sampling=False", "--config.optim.eps=10.0",
           "--config.optim.lr=0.05", "--config.optim.warmup=0", "--noprogress"]
    _main(*run, f"--workdir={tmp_path / 'plain'}", nproc=2)
    _main(*run, "--config.model.grad_checkpoint=True", "--config.model.channels_last=True",
          f"--workdir={tmp_path / 'memory'}", nproc=2)
    plain, memory = _final(tmp_path / "plain")["model"], _final(tmp_path / "memory")["model"]
    assert plain.keys() == memory.keys()
    config = importlib.import_module(CONFIGS["digits"]).get_config()
    config.device = "cpu"
    torch.manual_seed(config.seed)  # as main.py
    initial = create_model(config).state_dict()
    moved = max(float((plain[k] - initial[k]).abs().max()) for k in plain
                if plain[k].is_floating_point())
    error = max(float((memory[k] - plain[k]).abs().max()) for k in plain
                if plain[k].is_floating_point())
    assert moved > 1e-3 and error <= 1e-5 * moved
