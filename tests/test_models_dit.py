"""DiT (Peebles & Xie 2023) against the official implementation's fixtures, its checkpoints, and
the learned-sigma and label-dropout extensions of the other networks.

Tolerances: the fixture README's tiny DiT (seeded noise on every parameter, so a wrong wiring
changes the output) must be reproduced within 1e-5 relative; float32 round-off of the 2-block
model is ~1e-7, and a swapped shift/scale, a cos/sin order or a missing 1 + scale is O(1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex

import ml_collections
import pytest
import torch
from conftest import MISSING_FIXTURES, REFERENCE_DIR, SHARED_FIXTURES
from safetensors.torch import load_file

from models.checkpoint import CheckpointError, UnsafeCheckpointError
from models.conditioning import drop_labels
from models.dit import DIT_SIZES, DiT, build_dit, dit_kwargs, dit_parameter_count
from models.dit_checkpoint import build_dit_from_args, load_dit_checkpoint
from models.dit_layers import sincos_pos_embed_2d, timestep_embedding
from models.utils import MODELS, create_model

DIT_DIR = SHARED_FIXTURES / "dit"
REL_TOL = 1e-5
# A small model for the tests without fixtures: 8x8 input, patch 2 (16 tokens), 3 channels.
SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=24, depth=2, num_heads=2,
             num_classes=5, class_dropout_prob=0.1, learn_sigma=True)


@pytest.fixture(scope="module")
def dit_dir():
    if not DIT_DIR.is_dir():
        pytest.skip(f"DiT {MISSING_FIXTURES} {DIT_DIR} (only in the dev checkout)")
    return DIT_DIR


@pytest.fixture(scope="module")
def tiny(dit_dir):
    """(meta, DiT with the official fixture weights in eval mode, io tensors)."""
    meta = json.loads((dit_dir / "dit.json").read_text())["dit_tiny"]
    model = DiT(**meta["kwargs"])
    model.load_state_dict(load_file(dit_dir / "dit_tiny.safetensors"), strict=True)
    return meta, model.eval(), load_file(dit_dir / "dit_tiny_io.safetensors")


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _perturbed(model: DiT, seed: int = 0) -> DiT:
    """``model`` with noise on every parameter (a fresh DiT outputs zeros: adaLN-Zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _inputs(model: DiT, batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = model.input_size
    x = torch.randn(batch, model.in_channels, size, size, generator=g)
    t = torch.rand(batch, generator=g) * 999
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, t, y


# -- the official model ---------------------------------------------------------------------------


def test_state_dict_has_the_official_keys_shapes_and_order(tiny):
    meta, model, _ = tiny
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == meta["keys"]
    assert not model.pos_embed.requires_grad
    assert not any(b for b in model.buffers())  # everything is in the official state dict


def test_fixture_output_is_reproduced(tiny):
    _, model, io = tiny
    with torch.no_grad():
        out = model(io["x"], io["t"], io["y"])
    assert out.shape == io["out"].shape == (4, 8, 16, 16)
    assert _rel(out, io["out"]) <= REL_TOL


def test_fixture_forward_with_cfg_is_reproduced(tiny):
    _, model, io = tiny
    with torch.no_grad():
        out = model.forward_with_cfg(io["cfg_x"], io["cfg_t"], io["cfg_y"], 4.0)
        plain = model(io["cfg_x"], io["cfg_t"], io["cfg_y"])
    assert _rel(out, io["cfg_out"]) <= REL_TOL
    # Channels 3+ are each half's own output; channels 0-2 are guided (differ from plain).
    torch.testing.assert_close(out[:, 3:], plain[:, 3:], rtol=0, atol=1e-6)
    assert (out[:, :3] - plain[:, :3]).abs().max() > 0.1


def test_pos_embed_construction_equals_the_fixture(dit_dir):
    state = load_file(dit_dir / "dit_tiny.safetensors")
    model = DiT(**json.loads((dit_dir / "dit.json").read_text())["dit_tiny"]["kwargs"])
    torch.testing.assert_close(model.pos_embed, state["pos_embed"], rtol=0, atol=1e-7)


def test_parameter_counts_of_the_named_sizes(dit_dir):
    counts = json.loads((dit_dir / "dit.json").read_text())["dit_tiny"][
        "parameter_counts_input32_1000classes"]
    assert set(counts) == set(DIT_SIZES)
    assert {name: dit_parameter_count(name) for name in counts} == counts


def test_named_sizes_and_unknown_names():
    assert dit_kwargs("DiT-B/4") == {"depth": 12, "hidden_size": 768, "num_heads": 12,
                                     "patch_size": 4}
    assert dit_kwargs("DiT-XL/2", input_size=64)["input_size"] == 64
    with pytest.raises(ValueError, match=r"Unknown DiT size 'DiT-M/2'; valid: DiT-S/2, .*DiT-XL/8"):
        build_dit("DiT-M/2")


def test_closed_forms_of_the_embeddings():
    t = torch.tensor([0.0, 2.5])
    emb = timestep_embedding(t)  # [cos, sin] of t w_k, w_k = 10000^(-k / 128)
    assert emb.shape == (2, 256)
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    k = 5
    w = math.exp(-math.log(10000) * k / 128)
    assert emb[1, k].item() == pytest.approx(math.cos(2.5 * w), abs=1e-6)
    assert emb[1, 128 + k].item() == pytest.approx(math.sin(2.5 * w), abs=1e-6)
    pos = sincos_pos_embed_2d(8, grid_size=3)  # token 5 = row 1, column 2; w = (1, 1e-2)
    expected = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02),
                math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    torch.testing.assert_close(pos[5], torch.tensor(expected, dtype=torch.float64))


def test_fresh_model_outputs_exact_zeros():
    """adaLN-Zero and the zeroed final layer (Peebles & Xie 2023, Sec. 3.2)."""
    torch.manual_seed(0)
    model = DiT(**SMALL).eval()
    x, t, y = _inputs(model)
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (4, 6, 8, 8) and torch.equal(out, torch.zeros_like(out))
    assert model.final_layer.linear.weight.abs().sum() == 0
    # The official init elsewhere: zero biases, N(0, 0.02) tables, xavier-uniform weights.
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert 0.01 < model.y_embedder.embedding_table.weight.std() < 0.03
    bound = math.sqrt(6 / (24 + 72))
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound


def test_eval_forward_is_deterministic_and_batch_order_equivariant():
    torch.manual_seed(0)
    model = _perturbed(DiT(**SMALL)).eval()
    x, t, y = _inputs(model)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = model(x, t, y)
        assert torch.equal(model(x, t, y), out)
        torch.testing.assert_close(model(x[perm], t[perm], y[perm]), out[perm],
                                   rtol=1e-5, atol=1e-6)
        # Each sample depends on its own t and y: changing sample 0's label moves only it.
        y2 = y.clone()
        y2[0] = (y[0] + 1) % 5
        out2 = model(x, t, y2)
    assert (out2[0] - out[0]).abs().max() > 1e-3 and torch.equal(out2[1:], out[1:])


def test_null_label_and_y_none():
    torch.manual_seed(0)
    model = _perturbed(DiT(**SMALL)).eval()
    x, t, _ = _inputs(model)
    assert model.num_classes == 5 and model.null_label == 5 and model.learn_sigma
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t, torch.full((4,), 5)))
    no_null = DiT(**{**SMALL, "class_dropout_prob": 0.0})
    assert no_null.null_label is None
    assert no_null.y_embedder.embedding_table.weight.shape == (5, 24)  # official: no null row
    with pytest.raises(ValueError, match="y .* required.*no null label"):
        no_null(x, t)
    with pytest.raises(ValueError, match=r"in \[0, 4\], got values in \[0, 5\]"):
        no_null(x, t, torch.tensor([0, 1, 2, 5]))
    uncond = DiT(**{**SMALL, "num_classes": 0})
    assert uncond.y_embedder is None and uncond.null_label is None and uncond.num_classes == 0
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, torch.zeros(4, dtype=torch.long))


def test_input_validation_names_the_shapes():
    model = DiT(**SMALL)
    x, t, y = _inputs(model)
    with pytest.raises(ValueError, match=r"x must be \(B, 3, 8, 8\), got \(4, 3, 8, 6\)"):
        model(x[..., :6], t, y)
    with pytest.raises(ValueError, match=r"t must be .* \(4,\) to match x, got .* \(3,\)"):
        model(x, t[:3], y)
    with pytest.raises(ValueError, match=r"class_labels\) must be integers in \[0, 5\]"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match=r"must be in \[0, 5\], got values in \[-1"):
        model(x, t, torch.tensor([-1, 0, 1, 2]))
    with torch.no_grad():  # integer timesteps are fine
        assert model(x, t.long(), y).shape == (4, 6, 8, 8)
    for bad, match in (({"input_size": 9}, "divisible by patch_size"),
                       ({"num_heads": 5}, "divisible by num_heads"),
                       ({"class_dropout_prob": 1.0}, r"in \[0, 1\)"),
                       ({"depth": 0}, "depth must be an integer >= 1")):
        with pytest.raises(ValueError, match=match):
            DiT(**{**SMALL, **bad})


def test_forward_with_cfg_refusals_and_guidance_formula():
    torch.manual_seed(0)
    model = _perturbed(DiT(**SMALL)).eval()
    x, t, y = _inputs(model)
    y_cfg = torch.cat([y[:2], torch.full((2,), 5)])
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y_cfg, 3.0)
        both = model(torch.cat([x[:2], x[:2]]), t, y_cfg)
    guided = both[2:, :3] + 3.0 * (both[:2, :3] - both[2:, :3])
    torch.testing.assert_close(out[:2, :3], guided, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2:, :3], out[:2, :3])
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x[:3], t[:3], y_cfg[:3], 3.0)
    two = DiT(**{**SMALL, "in_channels": 2})
    x2 = torch.randn(4, 2, 8, 8)
    with pytest.raises(ValueError, match="2 epsilon channel"):
        two.forward_with_cfg(x2, t, y_cfg, 3.0)


def test_label_dropout_in_training_mode_only():
    torch.manual_seed(0)
    model = _perturbed(DiT(**{**SMALL, "class_dropout_prob": 1 - 1e-7}))
    x, t, y = _inputs(model)
    with torch.no_grad():
        null = model.eval()(x, t)
        cond = model(x, t, y)
        assert (cond - null).abs().max() > 1e-3
        torch.testing.assert_close(model.train()(x, t, y), null, rtol=1e-6, atol=1e-6)
        forced = model.y_embedder(y, train=False, force_drop_ids=torch.tensor([1, 0, 0, 1]))
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(forced, table[torch.tensor([5, y[1], y[2], 5])])


def test_drop_labels_rate():
    """Dropped fraction within 4 standard errors of p (sqrt(p (1 - p) / n) = 0.005)."""
    torch.manual_seed(0)
    labels = torch.zeros(10_000, dtype=torch.long)
    dropped = drop_labels(labels, 0.5, null_label=7)
    assert set(dropped.unique().tolist()) == {0, 7}
    assert abs((dropped == 7).double().mean().item() - 0.5) < 0.02


# -- the toolkit's config and registry --------------------------------------------------------


def _dit_config(**model) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "data": {"image_size": 8, "num_channels": 3, "centered": True},
        "model": {"name": "dit", "patch_size": 2, "hidden_size": 24, "depth": 2, "num_heads": 2,
                  **model},
    })


def test_create_model_builds_dit_from_the_config():
    model = create_model(_dit_config(num_classes=5, learn_sigma=True, mlp_ratio=2.0))
    assert type(model) is DiT and MODELS.get("dit")(_dit_config()).num_classes == 0
    official = DiT(**{**SMALL, "mlp_ratio": 2.0})
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in official.state_dict().items()}
    assert model.class_dropout_prob == 0.1 and model.null_label == 5  # the official default
    default = create_model(_dit_config())
    assert not default.learn_sigma and default.out_channels == 3 and default.null_label is None
    with pytest.raises(ValueError, match=r"needs config.model.hidden_size, depth"):
        create_model(_dit_config(hidden_size=None, depth=None))
    with pytest.raises(ValueError, match="centered = True"):
        create_model(ml_collections.ConfigDict({**_dit_config().to_dict(),
                                                "data": {"image_size": 8, "num_channels": 3,
                                                         "centered": False}}))
    with pytest.raises(ValueError, match=r"class_dropout_prob must be a number in \[0, 1\)"):
        create_model(_dit_config(num_classes=5, class_dropout_prob=1.5))


# -- official checkpoints -------------------------------------------------------------------------


def _training_checkpoint(tmp_path, model: DiT, ema_state: dict):
    """An official training checkpoint: {'model', 'ema', 'opt', 'args'} written by torch.save."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(*_inputs(model)).square().mean().backward()
    opt.step()
    args = argparse.Namespace(model="DiT-S/8", image_size=64, num_classes=5, global_seed=0,
                              results_dir="results", ckpt=None)
    path = tmp_path / "0400000.pt"
    torch.save({"model": model.state_dict(), "ema": ema_state, "opt": opt.state_dict(),
                "args": args}, path)
    return path


def test_training_checkpoint_loads_ema_by_default(tmp_path):
    torch.manual_seed(0)
    raw, ema = _perturbed(DiT(**SMALL), seed=1), _perturbed(DiT(**SMALL), seed=2)
    path = _training_checkpoint(tmp_path, raw, ema.state_dict())
    target = DiT(**SMALL)
    state, args = load_dit_checkpoint(path, target)
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in target.state_dict().items())
    assert args == {"model": "DiT-S/8", "image_size": 64, "num_classes": 5, "global_seed": 0,
                    "results_dir": "results", "ckpt": None}
    assert state.keys() == target.state_dict().keys()
    loaded = load_dit_checkpoint(path, target, key="model")
    assert all(torch.equal(v, raw.state_dict()[k]) for k, v in target.state_dict().items())
    assert torch.equal(loaded.state_dict["blocks.0.attn.qkv.weight"],
                       raw.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="valid: ema, model"):
        load_dit_checkpoint(path, key="opt")
    with torch.device("meta"):
        built = build_dit_from_args(args)
    assert (built.input_size, built.patch_size, len(built.blocks), built.num_classes) == \
        (8, 8, 12, 5)


def test_released_state_dict_and_layout_errors(tmp_path):
    torch.manual_seed(0)
    model = _perturbed(DiT(**SMALL))
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)
    target = DiT(**SMALL)
    state, args = load_dit_checkpoint(path, target)
    assert args is None and torch.equal(target.pos_embed, model.pos_embed)
    bad = dict(model.state_dict(), extra=torch.zeros(1))
    del bad["final_layer.linear.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): final_layer.linear.bias; "
                                              r"unexpected keys \(1\): extra"):
        load_dit_checkpoint(_save(tmp_path, bad), target)
    other = DiT(**{**SMALL, "learn_sigma": False}).state_dict()
    with pytest.raises(CheckpointError, match=r"shape mismatches .*final_layer.linear.weight"):
        load_dit_checkpoint(_save(tmp_path, other), target)
    with pytest.raises(CheckpointError, match="not a DiT checkpoint"):
        load_dit_checkpoint(_save(tmp_path, [torch.zeros(1)]))


def _save(tmp_path, state) -> os.PathLike:
    path = tmp_path / "other.pt"
    torch.save(state, path)
    return path


def test_nan_and_wrong_dtype_weights_are_refused_naming_the_tensor(tmp_path):
    model = DiT(**SMALL)
    state = model.state_dict()
    state["blocks.1.mlp.fc2.weight"] = state["blocks.1.mlp.fc2.weight"].clone()
    state["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
    path = _training_checkpoint(tmp_path, DiT(**SMALL), state)
    with pytest.raises(CheckpointError, match=r"ema.blocks.1.mlp.fc2.weight has NaN"):
        load_dit_checkpoint(path, DiT(**SMALL))
    with pytest.raises(CheckpointError, match=r"ema.blocks.1.mlp.fc2.weight has NaN"):
        load_dit_checkpoint(path)  # without a model: finiteness still checked
    load_dit_checkpoint(path, DiT(**SMALL), key="model")  # the raw weights are fine
    ints = {k: v.to(torch.int32) if k == "pos_embed" else v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="state_dict.pos_embed is int32"):
        load_dit_checkpoint(_save(tmp_path, ints), DiT(**SMALL))


class _Payload:
    """Unpickling this calls os.system (creating a marker file)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("where", ["ema", "args"])
def test_malicious_pickle_is_refused_without_running(tmp_path, where):
    marker = tmp_path / "pwned"
    model = DiT(**SMALL)
    payload = {"model": model.state_dict(), "ema": model.state_dict(), "opt": {},
               "args": argparse.Namespace(model="DiT-S/2")}
    if where == "ema":
        payload["ema"] = {"pos_embed": _Payload(marker)}
    else:  # hidden inside the allowed Namespace
        payload["args"] = argparse.Namespace(model=_Payload(marker))
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    with pytest.raises(UnsafeCheckpointError, match="refused.*system"):
        load_dit_checkpoint(path, model)
    assert not marker.exists()


# -- learned sigma and label dropout on the other networks ----------------------------------------


def _reference_config(name: str) -> ml_collections.ConfigDict:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference {MISSING_FIXTURES} {REFERENCE_DIR}")
    return ml_collections.ConfigDict(
        json.loads((REFERENCE_DIR / f"{name}.json").read_text())["config"])


@pytest.mark.parametrize("name, overrides", [
    ("ddpm_vp", {}), ("ddpmpp_vp", {}), ("ncsnpp_ve", {}), ("ncsnpp_ve_outskip", {}),
    ("ncsnpp_ve", {"progressive": "residual"}),
])
def test_learn_sigma_doubles_the_output_and_keeps_epsilon(name, overrides):
    """With the extra output rows set equal to the first C, the first C channels are the
    reference model's output and the next C the same before any division by sigma."""
    config = _reference_config(name)
    config.model.update(overrides)
    torch.manual_seed(0)
    base = create_model(config).eval()
    config.model.learn_sigma = True
    model = create_model(config).eval()
    assert model.learn_sigma and not base.learn_sigma
    C = config.data.num_channels
    state = base.state_dict()
    for k, v in model.state_dict().items():
        if v.shape != state[k].shape:  # an output conv: (2 C, ...) rows or (2 C,) bias
            assert v.shape[0] == 2 * C == 2 * state[k].shape[0]
            state[k] = torch.cat([state[k], state[k]])
    model.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(0)
    size = config.data.image_size
    x = torch.rand(2, C, size, size, generator=g)
    labels = torch.tensor([0.5, 5.0]) if name.startswith("ncsnpp") else torch.tensor([10.0, 500.0])
    with torch.no_grad():
        ref, out = base(x, labels), model(x, labels)
    assert out.shape == (2, 2 * C, size, size)
    torch.testing.assert_close(out[:, :C], ref, rtol=1e-5, atol=1e-6)
    scale = labels.view(-1, 1, 1, 1) if base.scale_by_sigma else 1.0  # v is never divided
    torch.testing.assert_close(out[:, C:], ref * scale, rtol=1e-4, atol=1e-5)


def _mlp_config(**model) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "data": {"dim": 3},
        "model": {"name": "mlp", "nf": 16, "num_layers": 1, "embedding_type": "positional",
                  "nonlinearity": "swish", **model},
    })


def test_learn_sigma_refused_where_unsupported_and_validated():
    config = _mlp_config()
    assert create_model(config).learn_sigma is False
    config.model.learn_sigma = True
    with pytest.raises(ValueError, match="mlp does not support config.model.learn_sigma"):
        create_model(config)
    with pytest.raises(ValueError, match="learn_sigma must be True or False, got 'yes'"):
        create_model(_mlp_config(learn_sigma="yes"))


def test_label_dropout_of_the_conditioning_mixin():
    torch.manual_seed(0)
    model = create_model(_mlp_config(num_classes=4, class_dropout_prob=1 - 1e-7))
    x, labels, y = torch.randn(6, 3), torch.full((6,), 500.0), torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        null = model.eval()(x, labels)
        cond = model(x, labels, y)
        assert (cond - null).abs().max() > 1e-3
        torch.testing.assert_close(model.train()(x, labels, y), null, rtol=0, atol=0)
        assert torch.equal(model.eval()(x, labels, y), cond)
    assert create_model(_mlp_config(num_classes=4)).class_dropout_prob == 0.0


@pytest.mark.parametrize("value", [-0.1, 1.0, True, "0.1"])
def test_bad_class_dropout_prob_names_the_value(value):
    with pytest.raises(ValueError, match=r"class_dropout_prob must be a number in \[0, 1\), got"):
        create_model(_mlp_config(num_classes=4, class_dropout_prob=value))


def test_label_dropout_without_classes_is_refused():
    with pytest.raises(ValueError, match="needs classes to drop"):
        create_model(_mlp_config(class_dropout_prob=0.1))
