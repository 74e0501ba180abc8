"""The MLP score model (shapes, label conventions through get_score_fn) and the EMA semantics."""

from __future__ import annotations

import ml_collections
import pytest
import torch
from torch import nn

import sde_lib
from models.ema import ExponentialMovingAverage, trainable_parameter_names
from models.mlp import MLP
from models.utils import MODELS, create_model, get_score_fn


def mlp_config(**model) -> ml_collections.ConfigDict:
    base = {
        "name": "mlp",
        "nf": 16,
        "num_layers": 2,
        "embedding_type": "positional",
        "nonlinearity": "swish",
    }
    base.update(model)
    return ml_collections.ConfigDict({"data": {"dim": 3}, "model": base})


def build(seed: int = 0, **model) -> MLP:
    torch.manual_seed(seed)
    return create_model(mlp_config(**model)).eval()


# -- MLP -------------------------------------------------------------------------------------


def test_mlp_is_registered():
    assert MODELS.get("mlp") is MLP


@pytest.mark.parametrize("embedding_type", ["positional", "fourier"])
def test_mlp_shapes(embedding_type):
    model = build(embedding_type=embedding_type)
    x = torch.randn(4, 3)
    labels = torch.tensor([0.5, 1.0, 2.0, 10.0])
    assert model(x, labels).shape == (4, 3)
    # Any (B, *S) with prod(S) = D is flattened and reshaped back.
    assert torch.equal(model(x.reshape(4, 1, 3), labels).reshape(4, 3), model(x, labels))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        model(torch.randn(4, 2), labels)
    with pytest.raises(ValueError, match="labels"):
        model(x, labels[:2])


def _recorded_labels(model: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    return seen


def test_mlp_vp_convention_through_get_score_fn():
    """VP continuous: the network sees 999 t and predicts noise; score = -output / std(t)."""
    model = build()
    sde = sde_lib.VPSDE(0.1, 20, 1000)
    x, t = torch.randn(5, 3), torch.tensor([0.01, 0.2, 0.4, 0.7, 1.0])
    seen = _recorded_labels(model)
    score = get_score_fn(sde, model, continuous=True)(x, t)
    torch.testing.assert_close(seen[0], 999 * t, rtol=1e-6, atol=0)
    std = sde.marginal_prob(x, t)[1]
    torch.testing.assert_close(score, -model(x, 999 * t) / std[:, None], rtol=1e-6, atol=0)


def test_mlp_ve_convention_and_scale_by_sigma():
    """VE continuous: the network sees sigma(t); scale_by_sigma divides its output by sigma."""
    sde = sde_lib.VESDE(0.01, 50, 1000)
    x, t = torch.randn(5, 3), torch.tensor([0.01, 0.2, 0.4, 0.7, 1.0])
    scaled = build(seed=1, embedding_type="fourier", scale_by_sigma=True)
    plain = build(seed=1, embedding_type="fourier", scale_by_sigma=False)
    seen = _recorded_labels(scaled)
    score = get_score_fn(sde, scaled, continuous=True)(x, t)
    sigma = 0.01 * (50 / 0.01) ** t
    torch.testing.assert_close(seen[0], sigma, rtol=1e-6, atol=0)
    # The same labels for both nets (the Fourier embedding turns a 1-ulp label change into ~1e-5).
    torch.testing.assert_close(score * seen[0][:, None], plain(x, seen[0]), rtol=1e-5, atol=1e-6)
    # The Fourier frequencies are fixed (skipped by the EMA, like NCSN++'s W).
    assert not scaled.embed.W.requires_grad


def test_mlp_uncentred_data_maps_to_unit_interval():
    x, labels = torch.rand(4, 3), torch.full((4,), 100.0)
    centred = build(seed=2)
    config = mlp_config()
    config.data.centered = False
    torch.manual_seed(2)
    uncentred = create_model(config).eval()
    torch.testing.assert_close(uncentred(x, labels), centred(2 * x - 1, labels))


def test_mlp_class_conditioning_with_null_label():
    model = build(num_classes=4)
    assert model.null_label == 4
    x, labels = torch.randn(3, 3), torch.full((3,), 500.0)
    null = torch.full((3,), 4, dtype=torch.long)
    assert torch.equal(model(x, labels), model(x, labels, null))
    assert not torch.allclose(model(x, labels, torch.zeros(3, dtype=torch.long)), model(x, labels))
    # Unconditional models have no class parameters and refuse class labels.
    plain = build()
    assert not any("label_embedding" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, labels, null)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"embedding_type": "sinusoid"}, "Unknown embedding_type"),
        ({"scale_by_sigma": True}, "scale_by_sigma needs embedding_type='fourier'"),
        ({"nonlinearity": "tanhh"}, "Unknown nonlinearity"),
        ({"nf": 3}, "nf >= 4 .*got nf=3"),
    ],
)
def test_mlp_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        create_model(mlp_config(**change))


def test_mlp_needs_data_dim():
    config = mlp_config()
    del config.data["dim"]
    config.data.num_channels = 3  # an image key is not a point dimension
    with pytest.raises(ValueError, match="data.dim"):
        create_model(config)


# -- EMA ---------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """One trainable vector, one frozen parameter (like NCSN++'s Fourier W) and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Parameter(torch.tensor([5.0], dtype=torch.float64), requires_grad=False)
        self.a = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
        self.register_buffer("sigmas", torch.tensor([7.0], dtype=torch.float64))


def _set(p: torch.Tensor, values) -> None:
    with torch.no_grad():
        p.copy_(torch.tensor(values, dtype=p.dtype))


def test_ema_warmup_matches_hand_computed_values():
    model = Tiny()
    ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
    assert len(ema.shadow_params) == 1  # the frozen parameter is skipped
    _set(model.a, [3.0, 4.0])
    ema.update(model.parameters())
    # n = 1: decay = min(0.9, 2/11); shadow = s - (9/11)(s - p) = (1 + 18/11, 2 + 18/11).
    assert ema.num_updates == 1
    torch.testing.assert_close(ema.shadow_params[0], torch.tensor([29 / 11, 40 / 11]).double())
    _set(model.a, [0.0, 0.0])
    ema.update(model.parameters())
    # n = 2: decay = min(0.9, 3/12) = 1/4; shadow = s / 4.
    torch.testing.assert_close(ema.shadow_params[0], torch.tensor([29 / 44, 10 / 11]).double())
    # The next update is n = num_updates + 1: decay (1 + n)/(10 + n) until it reaches 0.9.
    ema.num_updates = 9
    assert ema.current_decay() == pytest.approx(11 / 20)
    ema.num_updates = 200
    assert ema.current_decay() == 0.9


def test_ema_without_warmup_uses_decay():
    model = Tiny()
    ema = ExponentialMovingAverage(model.parameters(), decay=0.9, use_num_updates=False)
    _set(model.a, [3.0, 4.0])
    ema.update(model.parameters())
    assert ema.num_updates is None
    torch.testing.assert_close(ema.shadow_params[0], torch.tensor([1.2, 2.2]).double())


def test_ema_copy_to_store_restore():
    model = Tiny()
    ema = ExponentialMovingAverage(model.parameters(), decay=0.5, use_num_updates=False)
    _set(model.a, [3.0, 6.0])
    ema.update(model.parameters())  # shadow (2, 4)
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    assert model.a.tolist() == [2.0, 4.0]
    assert model.frozen.tolist() == [5.0]
    ema.restore(model.parameters())
    assert model.a.tolist() == [3.0, 6.0]


def test_ema_state_dict_round_trip_and_names():
    model = Tiny()
    ema = ExponentialMovingAverage(model.parameters(), decay=0.999)
    _set(model.a, [3.0, 4.0])
    ema.update(model.parameters())
    state = ema.state_dict()
    assert set(state) == {"decay", "num_updates", "shadow_params"}
    assert isinstance(state["shadow_params"], list)
    other = ExponentialMovingAverage(Tiny().parameters(), decay=0.5)
    other.load_state_dict(state)
    assert (other.decay, other.num_updates) == (0.999, 1)
    assert torch.equal(other.shadow_params[0], ema.shadow_params[0])
    assert trainable_parameter_names(model) == ["a"]
    named = ema.named_shadow_params(model)
    assert list(named) == ["a"]
    fresh = ExponentialMovingAverage(model.parameters(), decay=0.999)
    fresh.load_named_shadow_params(model, {**named, "sigmas": model.sigmas})
    assert torch.equal(fresh.shadow_params[0], named["a"])


def test_ema_errors():
    model = Tiny()
    with pytest.raises(ValueError, match="decay"):
        ExponentialMovingAverage(model.parameters(), decay=1.5)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
    with pytest.raises(ValueError, match="shadow parameters"):
        ema.load_state_dict({"decay": 0.9, "num_updates": 0, "shadow_params": []})
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({"decay": 0.9, "num_updates": 0, "shadow_params": [torch.zeros(3)]})
    with pytest.raises(ValueError, match="trainable parameters"):
        ema.update(build().parameters())
    with pytest.raises(ValueError, match="list of tensors, got dict"):
        ema.load_state_dict({"decay": 0.9, "num_updates": 0, "shadow_params": {}})
    with pytest.raises(ValueError, match=r"list holding \['float'\]"):
        ema.load_state_dict({"decay": 0.9, "num_updates": 0, "shadow_params": [0.5]})
