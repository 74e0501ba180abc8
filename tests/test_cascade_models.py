"""Cascaded generation, model side: image conditioning of ncsnpp / ddpm / dit, the training-side
conditioning with noise augmentation, cascade configs trained and sampled end to end, resume.

The samplers-side oracle tests of super-resolution are in tests/test_cascade_oracle.py.
"""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from models.utils import create_model, get_cond_score_factory, get_score_fn
from score_sde.training import cascade, checkpoints, super_resolution, validation
from score_sde.training.loop import train
from score_sde.utils.resize import downsample, upsample

NEW_KEYS = {"cond_conv.weight", "cond_level_embed.0.weight", "cond_level_embed.0.bias",
            "cond_level_embed.2.weight", "cond_level_embed.2.bias"}


def _model_config(name: str, **model):
    """A small config of architecture ``name`` on 8x8x1 digits."""
    if name == "dit":
        config = importlib.import_module("configs.dit_digits").get_config()
        config.model.update(hidden_size=32, depth=1, num_heads=2, num_classes=0,
                            class_dropout_prob=0.0, learn_sigma=False)
    else:
        config = importlib.import_module("configs.digits").get_config()
        config.model.nf = 32
        if name == "ncsnpp_fourier":  # NCSN++: Fourier features of sigma, FIR, pyramids
            config.training.sde, config.model.scale_by_sigma = "vesde", True
            config.model.update(embedding_type="fourier", fir=True, progressive="output_skip",
                                progressive_input="input_skip")
        elif name == "ddpm":
            config.model.name = "ddpm"
    config.device = "cpu"
    config.model.update(model)
    return config


def _randomize(model: torch.nn.Module) -> None:
    """Random weights everywhere (fresh models end in zero layers, whose output says little)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _time_input(config, batch: int) -> torch.Tensor:
    if config.model.get("embedding_type") == "fourier":
        return torch.linspace(0.1, 10.0, batch)  # sigma
    return torch.linspace(10.0, 900.0, batch)  # time label


ARCHS = ["ncsnpp", "ncsnpp_fourier", "ddpm", "dit"]


@pytest.mark.parametrize("arch", ARCHS)
def test_unconditional_models_are_unchanged_by_the_conditioning_paths(arch):
    """cond_channels = 0 (or absent): the same parameters, draws and outputs; a conditioning
    input is refused."""
    config = _model_config(arch)
    torch.manual_seed(0)
    plain = create_model(config)
    config.model.cond_channels = 0
    torch.manual_seed(0)
    explicit = create_model(config)
    assert plain.state_dict().keys() == explicit.state_dict().keys()
    assert not NEW_KEYS & set(plain.state_dict())
    _randomize(plain)
    _randomize(explicit)
    x = torch.randn(3, 1, 8, 8)
    t = _time_input(config, 3)
    assert torch.equal(plain(x, t), explicit(x, t, cond_image=None, cond_level=None))
    with pytest.raises(ValueError, match="cond_channels = 0"):
        plain(x, t, cond_image=torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match="no image conditioning"):
        get_cond_score_factory(None, plain)


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_initialised_conditional_model_equals_the_unconditional_one(arch):
    """A fresh conditional model holds the unconditional parameters (same draws) plus zero
    conditioning layers, so it computes the unconditional output for any conditioning; moving
    either conditioning layer off zero changes the output."""
    config = _model_config(arch)
    torch.manual_seed(0)
    uncond = create_model(config)
    config.model.cond_channels = 1
    torch.manual_seed(0)
    cond = create_model(config)
    fresh = cond.state_dict()
    new_keys = NEW_KEYS | ({"cond_level_features.W"} if arch == "ncsnpp_fourier" else set())
    assert set(fresh) - set(uncond.state_dict()) == new_keys
    assert all(torch.equal(v, fresh[k]) for k, v in uncond.state_dict().items())
    assert not fresh["cond_conv.weight"].any() and not fresh["cond_level_embed.2.weight"].any()
    _randomize(uncond)
    missing, unexpected = cond.load_state_dict(uncond.state_dict(), strict=False)
    assert set(missing) == new_keys and not unexpected
    x, t = torch.randn(4, 1, 8, 8), _time_input(config, 4)
    y, s = torch.randn(4, 1, 4, 4), torch.rand(4)
    expected = uncond(x, t)
    assert expected.abs().mean() > 1e-2
    torch.testing.assert_close(cond(x, t, cond_image=y, cond_level=s), expected,
                               rtol=0, atol=0)
    torch.testing.assert_close(cond(x, t), expected, rtol=0, atol=0)  # null conditioning
    with torch.no_grad():
        cond.cond_conv.weight.normal_(0, 0.1)
    image_effect = (cond(x, t, cond_image=y, cond_level=s) - expected).abs().mean()
    with torch.no_grad():
        cond.cond_conv.weight.zero_()
        cond.cond_level_embed[2].weight.normal_(0, 0.1)
    level_effect = (cond(x, t, cond_image=y, cond_level=s) - expected).abs().mean()
    assert image_effect > 1e-3 * expected.abs().mean()
    assert level_effect > 1e-3 * expected.abs().mean()


def test_conditioning_dropout_gives_each_sample_the_null_or_its_own_conditioning():
    """Training mode with cond_dropout_prob = 0.5: every row is either the null-conditioned or
    the conditioned output (nothing in between); both occur; eval mode never drops."""
    config = _model_config("ncsnpp", cond_channels=1, cond_dropout_prob=0.5)
    torch.manual_seed(0)
    model = create_model(config)
    _randomize(model)
    x, t = torch.randn(32, 1, 8, 8), _time_input(config, 32)
    y, s = torch.randn(32, 1, 4, 4), torch.rand(32)
    model.eval()
    conditioned = model(x, t, cond_image=y, cond_level=s)
    null = model(x, t)
    model.train()
    torch.manual_seed(3)
    out = model(x, t, cond_image=y, cond_level=s)
    is_cond = (out - conditioned).flatten(1).abs().amax(1) < 1e-5
    is_null = (out - null).flatten(1).abs().amax(1) < 1e-5
    assert (is_cond ^ is_null).all()
    assert 4 <= int(is_null.sum()) <= 28  # Binomial(32, 0.5): 6 sigma


def test_score_factory_binds_the_conditioning_and_broadcasts_a_scalar_level():
    config = _model_config("ncsnpp", cond_channels=1)
    torch.manual_seed(0)
    model = create_model(config).eval()
    _randomize(model)
    from score_sde.training.sampling import get_sde

    sde = get_sde(config)
    y = torch.randn(3, 1, 4, 4)
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.5)
    factory = get_cond_score_factory(sde, model, continuous=True)
    direct = get_score_fn(sde, model, continuous=True, cond_image=y,
                          cond_level=torch.full((3,), 0.2))(x, t)
    torch.testing.assert_close(factory(y, 0.2)(x, t), direct, rtol=0, atol=0)
    torch.testing.assert_close(factory(y, torch.full((3,), 0.2))(x, t), direct, rtol=0, atol=0)
    assert not torch.allclose(factory(y, 0.9)(x, t), direct)


def test_guidance_on_the_image_combines_the_conditional_and_null_scores():
    """sampling.cond_cfg_scale = s: the score is u + s (c - u) with c conditioned on y_s and u on
    the null conditioning (scores are -eps / sigma, so the eps rule is the score rule); each
    score costs two network calls; s = 1 is the conditional score alone."""
    config = _sr_config()
    config.model.nf = 32
    torch.manual_seed(0)
    model = create_model(config).eval()
    _randomize(model)
    from score_sde.training.sampling import get_sde

    sde = get_sde(config)
    y, x, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 8, 8), torch.full((3,), 0.4)
    c = get_score_fn(sde, model, continuous=True, cond_image=y,
                     cond_level=torch.full((3,), 0.1))(x, t)
    u = get_score_fn(sde, model, continuous=True)(x, t)
    assert (c - u).abs().mean() > 1e-3 * c.abs().mean()
    config.sampling.cond_cfg_scale = 3.0
    guided = super_resolution.sampling_stage(config, sde, model).score_factory(y, 0.1)
    torch.testing.assert_close(guided(x, t), u + 3.0 * (c - u), rtol=1e-5, atol=1e-5)
    assert guided.nfe_per_call == 2
    config.sampling.cond_cfg_scale = 1.0
    plain = super_resolution.sampling_stage(config, sde, model).score_factory(y, 0.1)
    torch.testing.assert_close(plain(x, t), c, rtol=0, atol=0)


def test_resize_operators():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    low = downsample(x, 4)
    torch.testing.assert_close(low, x.reshape(2, 1, 4, 2, 4, 2).mean((3, 5)))
    torch.testing.assert_close(downsample(upsample(low, 8, "nearest"), 4), low)
    smooth = torch.linspace(-1, 1, 4).expand(1, 1, 4, 4)  # bicubic keeps a constant exactly
    torch.testing.assert_close(upsample(torch.full((1, 1, 4, 4), 0.3), 8),
                               torch.full((1, 1, 8, 8), 0.3))
    assert upsample(smooth, 8).shape == (1, 1, 8, 8)
    assert downsample(x, 4, "bicubic").shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="Unknown downsample method 'box'; valid: area, bicubic"):
        downsample(x, 4, "box")
    with pytest.raises(ValueError, match="size 3 must divide"):
        downsample(x, 3)
    with pytest.raises(ValueError, match="Unknown upsample method 'linear'; valid: bicubic"):
        upsample(low, 8, "linear")


def _sr_config(**training):
    config = cascade.stage_config(importlib.import_module("configs.digits_cascade").get_config(),
                                  "sr")
    config.device = "cpu"
    config.training.update(training)
    return config


def test_training_conditioning_is_the_downsampled_batch_noised_at_the_drawn_level():
    """y_s = m(s) A x + sigma(s) eps: at level 0 exactly A x; at a fixed level s the residual
    y_s - m(s) A x has std sigma(s) (within 5 standard errors) and the levels are s."""
    x = torch.randn(256, 1, 8, 8)
    gen = torch.Generator().manual_seed(0)
    clean = super_resolution.conditioning_kwargs(_sr_config(cond_aug_max=0.0), x, gen)
    torch.testing.assert_close(clean["cond_image"], downsample(x, 4), rtol=0, atol=0)
    assert not clean["cond_level"].any()
    config = _sr_config(cond_aug_max=0.5, cond_aug_dist="fixed")
    noised = super_resolution.conditioning_kwargs(config, x, gen)
    s = torch.tensor(0.5)
    m, sigma = super_resolution.get_aug_sde(config).marginal_coeffs(s)
    assert torch.equal(noised["cond_level"], torch.full((256,), 0.5))
    residual = noised["cond_image"] - m * downsample(x, 4)
    n = residual.numel()
    assert abs(float(residual.std()) - float(sigma)) < 5 * float(sigma) / (2 * n) ** 0.5
    uniform = super_resolution.conditioning_kwargs(_sr_config(cond_aug_max=0.25), x, gen)
    levels = uniform["cond_level"]
    assert 0 <= float(levels.min()) and float(levels.max()) <= 0.25
    assert abs(float(levels.mean()) - 0.125) < 5 * 0.25 / (12 * 256) ** 0.5


def _tiny_cascade(base_iters=3, sr_iters=3):
    config = importlib.import_module("configs.digits_cascade").get_config()
    config.device = "cpu"
    config.model.nf = 8
    t = config.training
    t.batch_size, t.snapshot_sampling = 8, False
    t.snapshot_freq, t.snapshot_freq_for_preemption, t.log_freq, t.eval_freq = 100, 2, 1, 2
    config.cascade.base.training.update(n_iters=base_iters, snapshot_freq=100, eval_freq=2)
    config.cascade.sr.training.n_iters = sr_iters
    config.sampling.nfe = 4
    config.eval.batch_size = 8
    return config


def test_a_cascade_config_trains_and_samples_end_to_end(tmp_path):
    """digits_cascade at test size: both stages train into their workdirs; sampling writes every
    stage's grid with the stage's size and a record whose NFE is the stages' sum; --low_res
    images replace the base stage's output."""
    config = _tiny_cascade()
    config.training.snapshot_sampling = True  # the SR stage super-resolves test digits
    for _name, cfg in cascade.stage_configs(config):
        validation.validate_config(cfg)
    cascade.train_cascade(config, tmp_path, progress=False)
    for name, size in (("base", 4), ("sr", 8)):
        assert checkpoints.latest_checkpoint(tmp_path / name) is not None
        with np.load(tmp_path / name / "samples" / "iter_3" / "sample.npz") as data:
            assert data["samples"].shape == (8, size, size, 1)
    folder = cascade.run_sample_cascade(config, tmp_path, num_samples=5, progress=False)
    sizes = {}
    for name in ("base", "sr"):
        with np.load(folder / name / "sample.npz") as data:
            sizes[name] = data["samples"].shape
        assert (folder / name / "sample.png").is_file()
    assert sizes == {"base": (5, 4, 4, 1), "sr": (5, 8, 8, 1)}
    record = json.loads((folder / "info.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["base", "sr"]
    assert record["nfe"] == sum(s["nfe"] for s in record["stages"]) == 8
    assert record["stages"][1]["aug_level"] == pytest.approx(0.1)
    assert record["stages"][1]["conditioning"] == "noised"

    low = tmp_path / "low.npz"
    np.savez(low, samples=np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1), np.uint8))
    folder = cascade.run_sample_cascade(config, tmp_path, eval_folder="given", low_res=str(low),
                                        progress=False)
    with np.load(folder / "sr" / "sample.npz") as data:
        assert data["samples"].shape == (3, 8, 8, 1)
    with np.load(folder / "base" / "sample.npz") as data:  # the given images, as they were
        assert np.abs(data["samples"].astype(int) - np.load(low)["samples"]).max() <= 1


class Preempted(Exception):
    pass


def test_a_super_resolution_stage_resumes_bitwise(tmp_path):
    """Interrupted after step 3 (checkpoint at step 2) and resumed: the same weights and
    generators as an uninterrupted run, so the augmentation draws are resumed too."""
    config = cascade.stage_config(_tiny_cascade(sr_iters=5), "sr")
    config.training.cond_aug_max = 0.25
    torch.manual_seed(0)
    uninterrupted = train(config, tmp_path / "a", progress=False)

    def stop(state):
        if state["step"] == 3:
            raise Preempted

    torch.manual_seed(0)
    with pytest.raises(Preempted):
        train(config, tmp_path / "b", hooks=[stop], progress=False)
    torch.manual_seed(123)
    resumed = train(config, tmp_path / "b", progress=False)
    for a, b in zip(uninterrupted["model"].state_dict().values(),
                    resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(uninterrupted["generators"]["train"].get_state(),
                       resumed["generators"]["train"].get_state())


@pytest.mark.parametrize("key, value, message", [
    ("data.low_res_size", 3, "low_res_size = 3 must be below data.image_size = 8 and divide it"),
    ("data.downsample", "box", "Unknown config.data.downsample 'box'; valid: area, bicubic"),
    ("model.cond_upsample", "linear", "Unknown config.model.cond_upsample 'linear'; valid"),
    ("model.cond_channels", 3, "cond_channels must equal data.num_channels = 1"),
    ("model.cond_dropout_prob", 1.0, "cond_dropout_prob must be a number in \\[0, 1\\), got 1.0"),
    ("training.cond_aug_dist", "beta", "Unknown config.training.cond_aug_dist 'beta'; valid"),
    ("training.cond_aug_max", 2.0, "cond_aug_max must be a level in \\[0, 1"),
    ("training.cond_aug_sde", "vp", "Unknown SDE 'vp'"),
    ("sampling.cond_level", -0.5, "cond_level must be a level in \\[0, 1"),
    ("sampling.cond_cfg_scale", float("nan"), "cond_cfg_scale must be a finite number"),
])
def test_config_errors_name_the_bad_value(key, value, message):
    config = _sr_config()
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ValueError, match=message):
        validation.validate_config(config)


def test_cascade_config_errors_name_the_stage_and_values():
    config = _tiny_cascade()
    config.cascade.sr.data.low_res_size = 2
    with pytest.raises(ValueError, match="stage 'sr' has data.low_res_size = 2, but the previous "
                                         "stage 'base' makes 4x4"):
        cascade.stage_configs(config)
    config = _tiny_cascade()
    config.cascade.stages = ("base", "sr2")
    with pytest.raises(ValueError, match="names 'sr2' but config.cascade.sr2"):
        cascade.stage_configs(config)
    config = _tiny_cascade()
    config.cascade.base.data.image_sise = 4
    with pytest.raises(ValueError, match="cascade.base.data.image_sise overrides a key"):
        cascade.stage_configs(config)
    config = _tiny_cascade()
    config.cascade.base.data.low_res_size = 2
    config.cascade.base.model.cond_channels = 1
    with pytest.raises(ValueError, match="base stage 'base' must be unconditional"):
        cascade.stage_configs(config)


def test_low_res_images_from_a_folder_are_super_resolved(tmp_path):
    """``--low_res=FOLDER`` with a single SR config: 8x8 PNGs are area-downsampled to the stage's
    4x4 and super-resolved to 8x8; the record names the level and the conditioning."""
    from PIL import Image

    config = cascade.stage_config(_tiny_cascade(sr_iters=2), "sr")
    train(config, tmp_path / "sr", progress=False)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(folder / f"{k}.png")
    y = cascade.read_low_res(folder, config, "cpu")
    assert y.shape == (3, 1, 4, 4) and -1 <= float(y.min()) and float(y.max()) <= 1
    out = cascade.run_super_resolution(config, tmp_path / "sr", str(folder), progress=False)
    with np.load(out / "sample.npz") as data:
        assert data["samples"].shape == (3, 8, 8, 1)
    record = json.loads((out / "info.json").read_text())
    assert record["aug_level"] == pytest.approx(0.1) and record["conditioning"] == "noised"
    with pytest.raises(FileNotFoundError, match="no .png"):
        cascade.read_low_res(tmp_path / "sr" / "checkpoints", config, "cpu")
