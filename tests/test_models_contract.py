"""Contract tests over the model registry: every registered network follows the same rules.

* ``num_classes`` is 0 and ``null_label`` None without classes; class labels are then refused;
* with ``model.num_classes = K`` (where supported) ``null_label`` is K, the embedding has K + 1
  rows and no class labels means the null label;
* the output has the input's shape and dtype (float32 in, float32 out, although the image models
  keep the reference's float64 ``sigmas`` buffer), and bad shapes raise ``ValueError``;
* ``learn_sigma`` is False by default; ``model.learn_sigma = True`` doubles the output channels
  or is refused naming the key.

A newly registered model must add a small config to ``_CONFIGS``.
"""

from __future__ import annotations

import json
import re

import ml_collections
import pytest
import torch

import sde_lib
from models.utils import MODELS, SCORE_ADAPTERS, create_model, get_model, get_score_fn

# name -> (fixture JSON or None, config overrides, labels for a batch of 2)
_CONFIGS = {
    "ncsnpp": ("ncsnpp_ve", {}, torch.tensor([0.5, 5.0])),
    "ddpm": ("ddpm_vp", {}, torch.tensor([10.0, 500.0])),
    "ncsnv2_64": ("ncsnv2_ve", {"nf": 4, "num_scales": 10}, torch.tensor([0, 5])),
    "ncsnv2_128": ("ncsnv2_ve", {"nf": 4, "num_scales": 10}, torch.tensor([0, 5])),
    "ncsnv2_256": ("ncsnv2_ve", {"nf": 4, "num_scales": 10}, torch.tensor([0, 5])),
    "mlp": (None, {}, torch.tensor([10.0, 500.0])),
    "dit": (None, {}, torch.tensor([10.0, 500.0])),
}
_NO_CLASSES = {"ncsnv2_64", "ncsnv2_128", "ncsnv2_256"}
_NO_LEARN_SIGMA = {"ncsnv2_64", "ncsnv2_128", "ncsnv2_256", "mlp"}
# Where a model keeps its label table (K + 1 rows), when not ``label_embedding`` (the mixin's).
_LABEL_TABLE = {"dit": "y_embedder.embedding_table.weight"}
_SMALL_CONFIGS = {
    "mlp": {
        "data": {"dim": 3},
        "model": {"nf": 16, "num_layers": 1, "embedding_type": "positional",
                  "nonlinearity": "swish"},
    },
    "dit": {
        "data": {"image_size": 8, "num_channels": 3, "centered": True},
        "model": {"patch_size": 2, "hidden_size": 24, "depth": 1, "num_heads": 2},
    },
}


def _config(name: str, **model) -> ml_collections.ConfigDict:
    fixture, overrides, _ = _CONFIGS[name]
    if fixture is None:
        config = ml_collections.ConfigDict(_SMALL_CONFIGS[name])
    else:
        from conftest import REFERENCE_DIR

        if not REFERENCE_DIR.is_dir():
            pytest.skip(f"reference fixtures not found at {REFERENCE_DIR}")
        config = ml_collections.ConfigDict(
            json.loads((REFERENCE_DIR / f"{fixture}.json").read_text())["config"]
        )
    config.model.name = name
    config.model.update({**overrides, **model})
    return config


def _input(config, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if "dim" in config.data:
        return torch.randn(batch, config.data.dim, generator=g)
    size = config.data.image_size
    return torch.rand(batch, config.data.num_channels, size, size, generator=g)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter: fresh networks may output (near) zeros (DiT's adaLN-Zero, the
    U-Nets' init_scale 0), which would hide what labels change."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_every_registered_model_has_a_contract_config():
    get_model("mlp")  # registers the architectures
    assert set(MODELS.names()) == set(_CONFIGS)


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_unconditional_model_contract(name):
    config = _config(name)
    torch.manual_seed(0)
    model = _perturb(create_model(config)).eval()
    labels = _CONFIGS[name][2]
    x = _input(config)
    assert model.num_classes == 0 and model.null_label is None and model.learn_sigma is False
    assert not any("label_embedding" in k for k in model.state_dict())
    with torch.no_grad():
        out = model(x, labels)
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
        out64 = model.double()(x.double(), labels.double() if labels.is_floating_point()
                               else labels)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out, rtol=1e-4, atol=1e-4 * out.abs().max().item())
    with pytest.raises(ValueError, match="unconditional"):
        model(x.double(), labels, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=type(model).__name__):
        model(x[:, :1].double(), labels)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        model(x.double(), labels[:1])


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_class_conditional_model_contract(name):
    if name in _NO_CLASSES:
        with pytest.raises(ValueError, match="no class conditioning"):
            create_model(_config(name, num_classes=3))
        return
    config = _config(name, num_classes=3)
    torch.manual_seed(0)
    model = _perturb(create_model(config)).eval()
    assert model.num_classes == 3 and model.null_label == 3
    assert model.state_dict()[_LABEL_TABLE.get(name, "label_embedding.weight")].shape[0] == 4
    x, labels = _input(config), _CONFIGS[name][2]
    with torch.no_grad():
        default = model(x, labels)
        null = model(x, labels, torch.full((2,), 3))
        other = model(x, labels, torch.tensor([0, 1]))
    assert torch.equal(default, null)
    assert not torch.equal(default, other)
    for bad in (torch.zeros(2), torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.bool)):
        with pytest.raises(ValueError, match="class_labels"):
            model(x, labels, bad)


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_learn_sigma_contract(name):
    """Every model has ``learn_sigma`` (False by default); True doubles the output channels (the
    next C are the variance interpolation v) or is refused naming the key."""
    if name in _NO_LEARN_SIGMA:
        with pytest.raises(ValueError, match="does not support config.model.learn_sigma"):
            create_model(_config(name, learn_sigma=True))
        return
    config = _config(name, learn_sigma=True)
    torch.manual_seed(0)
    model = create_model(config).eval()
    assert model.learn_sigma is True
    x = _input(config)
    with torch.no_grad():
        out = model(x, _CONFIGS[name][2])
    assert out.shape == (x.shape[0], 2 * x.shape[1], *x.shape[2:]) and out.dtype == x.dtype


@pytest.mark.parametrize("value", [-1, 2.5, "3", True])
def test_bad_num_classes_names_the_value(value):
    message = re.escape(f"num_classes must be an integer >= 0, got {value!r}")
    with pytest.raises(ValueError, match=message):
        create_model(_config("mlp", num_classes=value))


def test_positional_ddpmpp_runs_in_float64():
    """The sinusoidal embedding is float32 (as the reference's); a float64 network casts it."""
    from conftest import REFERENCE_DIR

    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference fixtures not found at {REFERENCE_DIR}")
    config = ml_collections.ConfigDict(
        json.loads((REFERENCE_DIR / "ddpmpp_vp.json").read_text())["config"]
    )
    model = create_model(config).eval().double()
    x = _input(config).double()
    with torch.no_grad():
        out = model(x, torch.tensor([10.0, 500.0], dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == x.shape


@pytest.mark.parametrize("sde_name", sde_lib.SDES.names())
def test_every_sde_convention_has_a_score_adapter(sde_name):
    """An SDE declares its model conventions as data; each must name a registered adapter whose
    labels are finite and (B,) at t in [eps, T]."""
    sde = sde_lib.get_sde(sde_name)
    assert sde.model_conventions, f"{sde_name} declares no model convention"
    t = torch.tensor([1e-3, 0.5, 1.0])
    for kind, adapter in sde.model_conventions.items():
        assert adapter in SCORE_ADAPTERS
        score_fn = get_score_fn(sde, lambda x, labels: x, continuous=kind == "continuous")
        labels = score_fn.labels(t)
        assert labels.shape == (3,) and torch.isfinite(labels.double()).all()
        assert score_fn(torch.ones(3, 2), t).shape == (3, 2)
