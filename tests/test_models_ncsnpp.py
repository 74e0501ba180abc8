"""NCSN++ / DDPM++ against the reference fixtures, FIR resampling against its definitions, and the
class-conditional extension.

Tolerances are the fixture README's: outputs and scores within 2e-5 max|ref| (5x the reference's
own float32 round-off; a GroupNorm eps or FIR kernel mistake costs 3.6e-5 or far more), float
labels to 1e-6 relative.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from ml_collections import ConfigDict
from safetensors.torch import load_file

import models.ncsnpp  # noqa: F401  (registers 'ncsnpp')
import sde_lib
from models import layers
from models import up_or_down_sampling as updown
from models.utils import create_model, get_score_fn

FAMILIES = ["ncsnpp_ve", "ncsnpp_ve_outskip", "ddpmpp_vp", "ddpmpp_deep_subvp"]
# The reference's parameter counts of the full-size CIFAR-10 models (Song et al. 2021, Table 3 /
# the issue): DDPM++ cont. (VP) 61.8M, NCSN++ cont. (VE) 62.8M, given to 0.1M.
FULL_SIZE_PARAMS = {"ddpmpp_vp": 61.8e6, "ncsnpp_ve": 62.8e6}


def strip_module_prefix(state_dict: dict) -> dict:
    """Drop the ``module.`` prefix that the reference's ``DataParallel`` wrapper adds."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _meta(reference_dir, name: str) -> dict:
    return json.loads((reference_dir / f"{name}.json").read_text())


def _config(meta: dict, full_size: bool = False) -> ConfigDict:
    config = ConfigDict(meta["config"])
    if full_size:
        for key, values in meta["overrides"].items():
            section, field = key.split(".")
            config[section][field] = values["reference"]
    return config


def _sde(meta: dict) -> sde_lib.SDE:
    spec = meta["sde"]
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "class", "T")}
    return sde_lib.get_sde(spec["name"], **kwargs)


def _max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, reference_dir):
    """(meta, model with the fixture weights in eval mode, io tensors) for one family."""
    name = request.param
    meta = _meta(reference_dir, name)
    model = create_model(_config(meta))
    state = strip_module_prefix(load_file(reference_dir / f"{name}.safetensors"))
    model.load_state_dict(state, strict=True)
    return meta, model.eval(), load_file(reference_dir / f"{name}_io.safetensors")


def test_fixture_parameter_count(family):
    meta, model, _ = family
    assert sum(p.numel() for p in model.parameters()) == meta["n_params"]


def test_fixture_model_output(family):
    _, model, io = family
    with torch.no_grad():
        out = model(io["x"], io["labels"])
    assert out.shape == io["model_output"].shape and out.dtype == io["model_output"].dtype
    assert _max_rel(out, io["model_output"]) <= 2e-5


def test_fixture_labels_and_score(family):
    meta, model, io = family
    score_fn = get_score_fn(_sde(meta), model, train=False, continuous=meta["continuous"])
    labels = score_fn.labels(io["t"])
    assert torch.allclose(labels, io["labels"], rtol=1e-6, atol=0)
    with torch.no_grad():
        score = score_fn(io["x"], io["t"])
    assert _max_rel(score, io["score"]) <= 2e-5


def test_sigmas_buffer_is_the_reference_grid(family):
    meta, model, _ = family
    fresh = layers.get_sigmas(_config(meta))
    assert fresh.dtype == torch.float64 and fresh[0] > fresh[-1]
    torch.testing.assert_close(fresh, model.sigmas, rtol=1e-12, atol=0)


def test_only_the_fourier_weights_are_frozen(family):
    meta, model, _ = family
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    expected = ["all_modules.0.W"] if meta["config"]["model"]["embedding_type"] == "fourier" else []
    assert frozen == expected


def test_parameter_order_matches_the_reference_ema_list(reference_dir):
    # The reference's EMA stores a list in model.parameters() order (trainable ones only), so our
    # registration order must be the reference's: applying that list must give score_ema.
    numpy = pytest.importorskip("numpy")
    meta = _meta(reference_dir, "ncsnpp_ve")
    allow = [numpy._core.multiarray.scalar, numpy.dtype, numpy.dtypes.Float64DType]
    with torch.serialization.safe_globals(allow):
        ckpt = torch.load(reference_dir / "ncsnpp_ve_checkpoint.pth", weights_only=True)
    model = create_model(_config(meta)).eval()
    model.load_state_dict(strip_module_prefix(ckpt["model"]), strict=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    shadow = ckpt["ema"]["shadow_params"]
    assert [p.shape for p in trainable] == [s.shape for s in shadow]
    with torch.no_grad():
        for p, s in zip(trainable, shadow):
            p.copy_(s)
    io = load_file(reference_dir / "ncsnpp_ve_checkpoint_io.safetensors")
    with torch.no_grad():
        score = get_score_fn(_sde(meta), model, train=False, continuous=True)(io["x"], io["t"])
    assert _max_rel(score, io["score_ema"]) <= 2e-5


@pytest.mark.parametrize("name", sorted(FULL_SIZE_PARAMS))
def test_full_size_cifar10_parameter_count_and_forward(reference_dir, name):
    config = _config(_meta(reference_dir, name), full_size=True)
    assert config.data.image_size == 32 and config.model.nf == 128
    model = create_model(config).eval()
    num_params = sum(p.numel() for p in model.parameters())
    assert abs(num_params - FULL_SIZE_PARAMS[name]) < 0.05e6, num_params
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fourier = config.model.embedding_type == "fourier"
    label = torch.tensor([0.5]) if fourier else torch.tensor([500.0])  # sigma or 999 t
    with torch.no_grad():
        out = model(x, label)
    assert out.shape == x.shape and torch.isfinite(out).all()


# --- class-conditional extension -------------------------------------------------------------


def test_num_classes_zero_leaves_the_state_dict_unchanged(reference_dir):
    meta = _meta(reference_dir, "ddpmpp_vp")
    plain = create_model(_config(meta))
    config = _config(meta)
    config.model.num_classes = 0
    zero = create_model(config)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in zero.state_dict().items()
    }
    assert not hasattr(zero, "label_embedding")


def test_class_conditional_model(reference_dir):
    meta = _meta(reference_dir, "ddpmpp_vp")
    config = _config(meta)
    config.model.num_classes = 10
    model = create_model(config).eval()
    plain = strip_module_prefix(load_file(reference_dir / "ddpmpp_vp.safetensors"))
    missing, unexpected = model.load_state_dict(plain, strict=False)
    assert missing == ["label_embedding.weight"] and unexpected == []
    assert model.label_embedding.weight.shape == (11, 4 * config.model.nf)
    assert model.null_label == 10
    with torch.no_grad():
        model.label_embedding.weight.normal_(generator=torch.Generator().manual_seed(1))
    io = load_file(reference_dir / "ddpmpp_vp_io.safetensors")
    x, labels = io["x"], io["labels"]
    with torch.no_grad():
        default = model(x, labels)
        null = model(x, labels, torch.full((2,), 10, dtype=torch.long))
        cls3 = model(x, labels, torch.tensor([3, 3]))
    assert torch.equal(default, null)  # no labels = the reserved null label
    assert (cls3 - null).abs().max() > 1e-3 * null.abs().max()
    with pytest.raises(ValueError, match="class_labels"):
        model(x, labels, torch.tensor([1.0, 2.0]))


def test_class_labels_on_an_unconditional_model_raise(reference_dir):
    model = create_model(_config(_meta(reference_dir, "ddpmpp_vp")))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.zeros(2, 3, 16, 16), torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))


# --- variants without fixtures: build and run ------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"progressive": "residual", "progressive_input": "residual"},
        {
            "progressive": "output_skip",
            "progressive_input": "input_skip",
            "progressive_combine": "cat",
        },
        {"resblock_type": "ddpm", "fir": True},
        {"resblock_type": "ddpm", "fir": False, "conditional": False},
    ],
)
def test_other_variants_build_and_run(reference_dir, overrides):
    config = _config(_meta(reference_dir, "ncsnpp_ve"))
    config.model.update(overrides)
    model = create_model(config).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, torch.tensor([0.1, 10.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unknown_names_are_rejected(reference_dir):
    config = _config(_meta(reference_dir, "ncsnpp_ve"))
    config.model.progressive = "skip"
    with pytest.raises(ValueError, match="valid: none, output_skip, residual"):
        create_model(config)
    config = _config(_meta(reference_dir, "ncsnpp_ve"))
    config.model.nonlinearity = "gelu"
    with pytest.raises(ValueError, match="valid: elu, lrelu, relu, swish"):
        create_model(config)
    config = _config(_meta(reference_dir, "ncsnpp_ve"))
    config.model.attention_type = "legacy"
    with pytest.raises(ValueError, match="attention_type='legacy' is not supported; valid: 'ddpm'"):
        create_model(config)


# --- layers and FIR resampling against closed forms -----------------------------------------


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.5, 999.0])
    emb = layers.get_timestep_embedding(t, 8)
    k = torch.arange(4, dtype=torch.float64)
    freqs = 10000.0 ** (-k / 3)
    args = t.double()[:, None] * freqs
    expected = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    torch.testing.assert_close(emb.double(), expected, rtol=0, atol=1e-4)
    assert layers.get_timestep_embedding(t, 7).shape == (3, 7)


def test_upfirdn2d_is_a_true_convolution():
    # An asymmetric kernel tells a convolution from a cross-correlation.
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=torch.float64)
    out = updown.upfirdn2d(x, k, pad=(1, 1))  # 'full' convolution: (H + 1, W + 1)
    expected = torch.zeros(1, 2, 6, 7, dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            expected[..., i : i + 5, j : j + 6] += k[i, j] * x
    torch.testing.assert_close(out, expected)


def test_fir_resampling_identities():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # Box kernels are nearest upsampling and average pooling.
    torch.testing.assert_close(updown.upsample_2d(x, (1, 1)), updown.naive_upsample_2d(x))
    torch.testing.assert_close(updown.downsample_2d(x, (1, 1)), updown.naive_downsample_2d(x))
    torch.testing.assert_close(updown.downsample_2d(x, (1, 1)), F.avg_pool2d(x, 2))
    # A constant image stays constant away from the zero-padded border (gain 1).
    ones = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(
        updown.upsample_2d(ones, (1, 3, 3, 1))[..., 2:-2, 2:-2],
        torch.ones(1, 1, 12, 12, dtype=torch.float64),
    )
    torch.testing.assert_close(
        updown.downsample_2d(ones, (1, 3, 3, 1))[..., 1:-1, 1:-1],
        torch.ones(1, 1, 2, 2, dtype=torch.float64),
    )


def test_fused_resampling_convs_equal_their_unfused_definitions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=g)
    k = (1, 3, 3, 1)
    up = updown.upsample_conv_2d(x, w, k)
    up_ref = F.conv2d(updown.upsample_2d(x, k), w, padding=1)
    assert up.shape == (2, 5, 16, 16)
    # Equal away from the border (the fused op pads once, the unfused one twice).
    torch.testing.assert_close(up[..., 3:-3, 3:-3], up_ref[..., 3:-3, 3:-3])
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=g)
    down = updown.conv_downsample_2d(x, w, k)
    down_ref = updown.downsample_2d(F.conv2d(x, w, padding=1), k)
    assert down.shape == (2, 5, 8, 8)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], down_ref[..., 1:-1, 1:-1])


def test_fused_leaky_relu_closed_form():
    """StyleGAN2's fused bias + leaky ReLU: scale * (x + b) where positive, else slope * scale."""
    from models.fused_act import FusedLeakyReLU, fused_leaky_relu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g)
    b = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    pre = x + b[None, :, None, None]
    expected = torch.where(pre > 0, pre, 0.2 * pre) * 2**0.5
    torch.testing.assert_close(fused_leaky_relu(x, b), expected, rtol=1e-12, atol=0)
    layer = FusedLeakyReLU(3).double()
    assert list(dict(layer.named_parameters())) == ["bias"]
    with torch.no_grad():
        layer.bias.copy_(b)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=0)
    # Vectors (B, C): the bias runs over the channel axis.
    torch.testing.assert_close(fused_leaky_relu(x[:, :, 0, 0], b), expected[:, :, 0, 0])
    # The gain keeps the second moment of a standard normal input with slope 0 (ReLU).
    z = torch.randn(200_000, 1, dtype=torch.float64, generator=g)
    second = fused_leaky_relu(z, torch.zeros(1, dtype=torch.float64), 0.0).square().mean()
    assert abs(second.item() - 1.0) < 4 * (5 / 200_000) ** 0.5  # Var(2 relu(z)^2) = 5
    with pytest.raises(ValueError, match=r"bias must be \(C,\)"):
        fused_leaky_relu(x, b[:2])


def test_fir_kernels_are_built_once_per_device_and_dtype():
    """Resampling layers set up their kernel in every forward: taps are cached per device and
    dtype, so no host-to-device copy happens per call (meta stands in for an accelerator)."""
    x = torch.zeros(1, 1, 4, 4)
    k = updown.setup_kernel((1, 3, 3, 1), like=x)
    assert k is updown.setup_kernel([1, 3, 3, 1], like=x)
    torch.testing.assert_close(k, torch.outer(*[torch.tensor([1.0, 3, 3, 1]) / 8] * 2))
    on_meta = updown.setup_kernel((1, 3, 3, 1), like=x.to("meta"))
    assert on_meta.device.type == "meta" and on_meta is not k
    assert updown.setup_kernel((1, 3, 3, 1), like=x.double()).dtype == torch.float64
    assert updown.upsample_2d(torch.zeros(1, 2, 4, 4, device="meta"), (1, 3, 3, 1)).shape == (
        1, 2, 8, 8)
