"""Configs: names and reference paths resolve to the same data, the reference's values, every key
read somewhere, no torch."""

from __future__ import annotations

import importlib
import re

import pytest
from conftest import REPO

from configs.registry import CONFIGS, module_path
from score_sde import cli as main

# Keys no code reads yet, each with the reason; the test fails when one is read (remove it here)
# or when a new unread key appears.
PENDING: dict[str, str] = {}


def _load(name):
    return importlib.import_module(CONFIGS[name]).get_config()


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_name_and_reference_path_give_the_same_config(name):
    path = main.resolve_config_path(name)
    assert path == REPO / module_path(name) and path.is_file()
    assert main.resolve_config_path(module_path(name)).resolve() == path.resolve()
    from_path = main.NamedConfigParser(main.flags.FLAGS["config"].parser.inner).parse(
        module_path(name))
    assert from_path.to_dict() == _load(name).to_dict()


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown config 'vp_cifa'; valid: .*vp_cifar"):
        main.resolve_config_path("vp_cifa")


def test_vp_cifar_has_the_reference_hyperparameters():
    c = _load("vp_cifar")
    assert (c.training.sde, c.model.beta_min, c.model.beta_max, c.model.num_scales) == (
        "vpsde", 0.1, 20.0, 1000)
    assert c.training.continuous and c.training.reduce_mean and c.data.centered
    assert (c.model.name, c.model.nf, tuple(c.model.ch_mult), c.model.num_res_blocks) == (
        "ncsnpp", 128, (1, 2, 2, 2), 4)
    assert (c.training.batch_size, c.training.n_iters) == (128, 1300001)
    assert (c.optim.optimizer, c.optim.lr, c.optim.warmup, c.optim.grad_clip) == (
        "Adam", 2e-4, 5000, 1.0)
    assert c.model.ema_rate == 0.9999
    assert (c.sampling.method, c.sampling.predictor, c.sampling.corrector) == (
        "pc", "euler_maruyama", "none")


@pytest.mark.parametrize("name, fixture", [
    ("vp_cifar", "ddpmpp_vp"), ("subvp_cifar_deep", "ddpmpp_deep_subvp"),
    ("ve_cifar", "ncsnpp_ve"), ("ddpm_cifar", "ddpm_vp"), ("ncsn_cifar", "ncsnv2_ve"),
])
def test_configs_equal_the_reference_dumps(name, fixture, reference_dir):
    """The fixture JSONs hold the reference's own config dicts (shrunk: see 'overrides')."""
    import json

    record = json.loads((reference_dir / f"{fixture}.json").read_text())
    ref = dict(record["config"])
    for key, change in record["overrides"].items():
        section, field = key.split(".")
        if change["reference"] == "<unset>":
            del ref[section][field]
        else:
            ref[section][field] = change["reference"]
    ours = _load(name).to_dict()
    for d in (ours, ref):
        d.pop("device")
    ours["data"].pop("root")  # ours: where the CIFAR-10 tarball lives
    ours["data"].pop("autoencoder")  # ours: latent score models, off (training/latent.py)
    for key in ("num_workers", "cache", "alpha_background"):  # ours: image-folder loading
        ours["data"].pop(key)
    for key in ("skip_nonfinite", "max_skip_fraction"):  # ours: the non-finite guard
        ours["training"].pop(key)  # (training.nonfinite)
    # ours: improved-DDPM training and bits/dim, off by default (discrete_diffusion)
    assert [ours["training"].pop(k) for k in ("loss", "vlb_rescale", "vlb_importance_sampling")
            ] == ["simple", False, False]
    assert [ours["eval"].pop(k) for k in ("bpd_method", "vlb_spacing")] == ["ode", None]
    # ours: precision, compile and gradient accumulation (docs/precision.md)
    assert [ours["training"].pop(k) for k in ("precision", "compile", "grad_accum")
            ] == ["auto", False, 1]
    assert [ours["sampling"].pop(k) for k in ("precision", "compile")] == ["fp32", False]
    assert ours["eval"].pop("likelihood_precision") == "fp32"
    from configs.sampling import CLASS_KEYS, FAST_SAMPLER_OPTIONS

    for key in FAST_SAMPLER_OPTIONS:  # ours: the fast samplers' options, None = their default
        assert ours["sampling"].pop(key) is None, key
    # ours: class-conditional training and guidance, off by default (training/classes.py)
    assert ours["model"].pop("num_classes") == 0
    assert ours["model"].pop("learn_sigma") is False  # ours: improved DDPM's learned variances
    # ours: activation checkpointing and the channels_last layout, off (models.memory)
    assert [ours["model"].pop(k) for k in ("grad_checkpoint", "channels_last")] == [False, False]
    assert [ours["sampling"].pop(k) for k in CLASS_KEYS] == [None, None, False]
    flat = {k: v for k, v in _flat(ours).items()}
    assert flat == _flat(ref)


def _flat(d):
    out = {}
    for key in _leaves(d):
        value = d
        for part in key.split("."):
            value = value[part]
        out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


@pytest.mark.parametrize("variant, base", [
    ("vp_cifar_deep", "vp_cifar"), ("subvp_cifar_deep", "subvp_cifar"),
    ("ve_cifar_deep", "ve_cifar"), ("subvp_cifar", "vp_cifar"),
])
def test_variants_differ_from_their_base_only_where_the_reference_does(variant, base):
    diff = {k: (v, _flat(_load(base).to_dict()).get(k))
            for k, v in _flat(_load(variant).to_dict()).items()
            if v != _flat(_load(base).to_dict()).get(k)}
    expected = {"training.sde"} if variant == "subvp_cifar" else {
        "training.n_iters", "model.num_res_blocks"}
    assert set(diff) == expected
    if "model.num_res_blocks" in diff:
        assert diff["model.num_res_blocks"][0] == 8 and diff["training.n_iters"][0] == 950001


def test_every_config_key_is_read_somewhere():
    """Static check: each key's name occurs as ``.key``, ``['key']`` or ``"key"`` in our code."""
    sources = "".join(
        p.read_text() for p in REPO.rglob("*.py")
        if p.relative_to(REPO).parts[0] not in ("configs", "tests", "runs", "benchmarks")
        and not p.relative_to(REPO).parts[0].startswith(".")
    )
    unread, read = set(), {}  # read: field -> found (configs share most field names)
    for name in CONFIGS:
        for key in _leaves(_load(name).to_dict()):
            field = key.rsplit(".", 1)[-1]
            if field not in read:
                read[field] = bool(re.search(r"[.\['\"]" + re.escape(field) + r"\b", sources))
            if not read[field]:
                unread.add(key)
    assert unread <= set(PENDING), f"keys nobody reads: {sorted(unread - set(PENDING))}"
    assert set(PENDING) <= unread, f"now read, drop from PENDING: {sorted(set(PENDING) - unread)}"


def test_configs_do_not_import_torch():
    for path in (REPO / "configs").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+torch\b", path.read_text(), re.M), path


def _config_modules():
    return sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for p in (REPO / "configs").rglob("*.py")
        if p.name not in ("__init__.py", "registry.py", "sampling.py")
        and not p.name.startswith("default_")
    )


@pytest.mark.parametrize("module", _config_modules())
def test_every_config_builds_and_takes_a_training_step(module):
    """Each config file, shrunk (as the reference fixtures) and with few noise scales, builds its
    SDE and model, takes one finite training step with its own loss options and samples with
    its own sampler."""
    import torch

    from models.utils import create_model
    from score_sde import losses
    from score_sde.datasets import data_shape, get_data_scaler
    from score_sde.training.latent import latent_data_shape
    from score_sde.training.loop import get_step_fns
    from score_sde.training.sampling import generate, get_sde, sampling_options

    config = importlib.import_module(module).get_config()
    config.device = "cpu"
    # N, the PC samplers' step count; discrete VP needs beta_max / N < 1 (DDPM's beta table),
    # discrete VE (SMLD's sigma table) takes any N
    discrete_vp = not config.training.continuous and config.training.sde != "vesde"
    config.model.num_scales = 25 if discrete_vp else 4
    latent = config.data.autoencoder.name != "none"  # the network sees the latents
    if config.model.name == "dit":  # a DiT of the same kind, small (DiT-XL/2 has 675 M)
        config.model.update(hidden_size=32, depth=1, num_heads=2)
        config.data.image_size = 64 if config.data.autoencoder.name == "sd_vae" else 8
    elif config.data.get("dataset") != "digits" and "dim" not in config.data:
        config.model.nf = 16 if config.model.name.startswith("ncsnv2") else 32
        if "ch_mult" in config.model:
            config.model.ch_mult, config.model.num_res_blocks = (1, 2), 1
            config.model.attn_resolutions, config.data.image_size = (8,), 16
    torch.manual_seed(0)
    model = create_model(config)
    sde = get_sde(config)
    method, options = sampling_options(config)
    assert method == config.sampling.method and "method" not in options
    state = dict(model=model, step=0, ema=None,
                 optimizer=losses.get_optimizer(config, model.parameters()))
    train_step, _ = get_step_fns(config, sde)
    x = torch.randn(2, *latent_data_shape(config)) if latent else get_data_scaler(config)(
        torch.rand(2, *data_shape(config)))
    loss = train_step(state, x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and state["step"] == 1
    samples, info = generate(config, sde, model, tuple(x.shape), inverse_scaler=lambda y: y,
                             generator=torch.Generator().manual_seed(0))
    assert samples.shape == x.shape and torch.isfinite(samples).all() and info["nfe"] > 0
    if info.get("corrector") == "langevin":  # the reference's step rule, as get_pc_sampler
        assert info["step_rule"] == "batch"


@pytest.mark.parametrize("module", _config_modules())
def test_every_config_carries_the_full_sampling_section(module):
    """Every config file (the named ones and the reference's files under configs/) has the
    reference's sampling keys and a key for every option of every registered sampler (by its
    name or the reference's alias), so that any swap the README shows works on any config."""
    import samplers
    from configs.sampling import REFERENCE_KEYS
    from score_sde.training.sampling import config_key

    assert set(CONFIGS.values()) <= set(_config_modules())  # the named configs are among them
    sampling = importlib.import_module(module).get_config().sampling
    missing = [k for k in REFERENCE_KEYS if k not in sampling]
    for method in samplers.SAMPLERS.names():
        missing += [f"{config_key(method, o)} ({method})" for o in samplers.option_defaults(method)
                    if config_key(method, o) not in sampling]
    assert not missing, f"{module}: config.sampling lacks {sorted(set(missing))}"


def test_a_placeholder_option_is_left_to_the_sampler_and_a_set_one_is_passed():
    from score_sde.training.sampling import sampling_options, sampling_record

    config = _load("digits")
    config.sampling.method = "ddim"
    method, options = sampling_options(config)
    assert method == "ddim" and "eta" not in options and options["nfe"] == 30
    config.sampling.eta = 0.5
    assert sampling_options(config)[1]["eta"] == 0.5
    record = sampling_record(config, {"nfe": 30})
    # the options as the sampler ran them, its own defaults filled in
    assert record["options"] == {"eta": 0.5, "nfe": 30, "eps": 1e-3, "grid": "logsnr",
                                 "final_time_zero": False}
    # set for PC, which this method does not run: recorded as not applied
    assert record["not_applied"]["predictor"] == config.sampling.predictor
    assert "nfe" not in record["not_applied"] and "eta" not in record["not_applied"]


@pytest.mark.parametrize("name", ["ve_cifar", "digits"])
def test_adaptive_from_a_config_has_no_budget_unless_one_is_given(name):
    """sampling.adaptive_nfe is None in every config (digits' sampling.nfe = 30 is the fast
    samplers' budget): --config.sampling.method=adaptive runs without a budget (every step
    error-controlled); --config.sampling.adaptive_nfe=n caps it."""
    from score_sde.training import validation
    from score_sde.training.sampling import sampling_options, sampling_record

    config = _load(name)
    config.sampling.method = "adaptive"
    validation.validate_config(config)
    method, options = sampling_options(config)
    assert method == "adaptive" and "nfe" not in options
    assert options["eps"] == (1e-5 if name == "ve_cifar" else 1e-3)
    assert sampling_record(config, {"nfe": 0})["options"]["nfe"] is None
    config.sampling.adaptive_nfe = 400
    validation.validate_config(config)
    assert sampling_options(config)[1]["nfe"] == 400
    config.sampling.adaptive_nfe = 0
    with pytest.raises(ValueError, match="sampling.adaptive_nfe must be an integer >= 2"):
        validation.validate_config(config)
