"""Configs: names and reference paths resolve to the same data, the reference's values, every key
read somewhere, no torch."""

from __future__ import annotations

import importlib
import re

import pytest
from conftest import REPO

import main
from configs.registry import CONFIGS, module_path

# Keys no code reads yet, each with the reason; the test fails when one is read (remove it here)
# or when a new unread key appears.
PENDING = {
    "eval.begin_ckpt": "--mode eval, issue 8",
    "eval.end_ckpt": "--mode eval, issue 8",
    "eval.enable_sampling": "--mode eval, issue 8",
    "eval.enable_loss": "--mode eval, issue 8",
    "eval.enable_bpd": "--mode eval, issue 8",
    "model.attention_type": "NCSN++ implements 'ddpm' attention only and does not check the key",
    "optim.amsgrad": "losses.get_optimizer ignores it (NCSNv2's value is False, Adam's default)",
}


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
    unread = set()
    for name in CONFIGS:
        for key in _leaves(_load(name).to_dict()):
            field = key.rsplit(".", 1)[-1]
            if not re.search(r"[.\['\"]" + re.escape(field) + r"\b", sources):
                unread.add(key)
    assert unread <= set(PENDING), f"keys nobody reads: {sorted(unread - set(PENDING))}"
    assert set(PENDING) <= unread, f"now read, drop from PENDING: {sorted(set(PENDING) - unread)}"


def test_configs_do_not_import_torch():
    for path in (REPO / "configs").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+torch\b", path.read_text(), re.M), path
