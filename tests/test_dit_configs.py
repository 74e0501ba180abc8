"""The DiT configs: ``dit_digits`` (train, guided per-class sampling, resume) and
``imagenet256_dit_xl2`` (the official DiT-XL/2; sampling an official checkpoint, the latent stop,
training refused), with tiny overrides so that each test takes seconds."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from models.checkpoint import CheckpointError
from models.dit import DIT_SIZES, DiT, build_dit, dit_kwargs, dit_parameter_count
from models.latent_space import model_space_config
from score_sde.training import checkpoints, validation
from score_sde.training.inference import LATENT_STOP, load_ema_model, run_sample
from score_sde.training.loop import train
from score_sde.training.official_dit import dit_architecture, official_dit_layout
from score_sde.training.sampling import generate, get_sde

#: a DiT small enough for a test, in place of each config's (hidden 128 x 4 / 1152 x 28)
TINY = dict(hidden_size=32, depth=2, num_heads=2)


def _config(name: str):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.device = "cpu"
    return config


def _tiny_digits(n_iters: int = 4):
    config = _config("dit_digits")
    config.model.update(TINY)
    t = config.training
    t.n_iters, t.batch_size, t.snapshot_sampling = n_iters, 8, False
    t.snapshot_freq, t.snapshot_freq_for_preemption, t.log_freq, t.eval_freq = 100, 2, 1, 2
    config.sampling.nfe = 4
    config.eval.batch_size = 10
    return config


def _tiny_imagenet():
    config = _config("imagenet256_dit_xl2")
    config.model.update(TINY)
    config.data.image_size = 64  # 64 px images: 4 x 8 x 8 SD-VAE latents, 16 tokens
    config.sampling.nfe = 4
    return config


def _official_dit(seed: int, **overrides) -> DiT:
    """A DiT of the official kind (1000 classes, learned sigma) with TINY sizes, its weights
    randomised (a fresh DiT outputs zeros: adaLN-Zero)."""
    torch.manual_seed(seed)
    model = DiT(**{"input_size": 8, "patch_size": 2, **TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _save_official(tmp_path):
    """A released file (the EMA weights' state dict) and an official training checkpoint
    {'model', 'ema', 'opt', 'args'} whose raw weights differ from its EMA."""
    ema, raw = _official_dit(0), _official_dit(1)
    released, training = tmp_path / "DiT-tiny.pt", tmp_path / "0000100.pt"
    torch.save(ema.state_dict(), released)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(),
                "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=1000,
                                           global_batch_size=256)}, training)
    return released, training, ema, raw


# -- the configs --------------------------------------------------------------------------------


def test_dit_digits_is_a_small_class_conditional_dit_with_the_ddpm_table():
    config = _config("dit_digits")
    validation.validate_config(config)
    model = importlib.import_module("models.utils").create_model(config)
    assert isinstance(model, DiT) and model.num_classes == 10 and model.null_label == 10
    assert 0.9e6 < sum(p.numel() for p in model.parameters()) < 1.5e6  # 1,274,888
    assert (model.patch_size, model.in_channels, model.input_size) == (2, 1, 8)
    assert model.class_dropout_prob == 0.1 and model.learn_sigma is True
    assert config.training.loss == "hybrid" and config.eval.bpd_method == "vlb"
    assert (config.training.sde, config.training.continuous) == ("discrete_vpsde", False)
    sde = get_sde(config)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(sde.discrete_betas, betas, rtol=1e-12, atol=0)
    s = config.sampling
    assert (s.method, s.nfe) == ("dpm_solver++_2m", 20) and 2 <= s.cfg_scale <= 4
    assert s.cfg_official is False  # one channel: the official rule guides channels 0-2


def test_imagenet256_dit_xl2_is_the_official_dit_xl2():
    config = _config("imagenet256_dit_xl2")
    validation.validate_config(config)
    with torch.device("meta"):  # 675 M parameters: shapes only
        model = DiT.from_config(model_space_config(config))  # for the 4x32x32 latents
        official = build_dit("DiT-XL/2", input_size=32)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert dit_parameter_count("DiT-XL/2") == 675_129_632
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert dit_architecture(model.state_dict()) == {
        **{k: v for k, v in dit_kwargs("DiT-XL/2").items() if k != "num_heads"},
        "mlp_ratio": 4.0, "in_channels": 4, "input_size": 32, "label_rows": 1001,
        "learn_sigma": True}
    torch.testing.assert_close(get_sde(config).discrete_betas,
                               torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    s = config.sampling
    assert (s.method, s.nfe, s.cfg_scale, s.cfg_official) == ("dpm_solver++_2m", 20, 4.0, True)
    ae = config.data.autoencoder
    assert (ae.name, ae.path, ae.scale_factor) == ("sd_vae", "", 0.18215)
    assert (config.data.image_size, config.data.num_channels) == (256, 3)  # images; 4x32x32 z


def test_imagenet256_dit_xl2_refuses_training_before_any_work(tmp_path):
    config = _config("imagenet256_dit_xl2")
    with pytest.raises(ValueError, match=r"data.autoencoder.path is empty: --mode train .*"
                       r"needs the SD VAE on disk: download stabilityai/sd-vae-ft-ema"):
        validation.validate_run(config, tmp_path / "run", "train")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(DIT_SIZES))
def test_the_architecture_read_from_a_state_dict_is_the_named_size(name):
    with torch.device("meta"):
        state = build_dit(name, input_size=32).state_dict()
    arch = dit_architecture(state)
    assert {k: arch[k] for k in ("depth", "hidden_size", "patch_size")} == {
        k: v for k, v in DIT_SIZES[name].items() if k != "num_heads"}


def test_dit_takes_the_toolkits_class_labels_keyword():
    """``models.utils.get_model_fn`` binds labels as ``class_labels=``; DiT's own name is y."""
    model = _official_dit(0).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([3, 999])
    with torch.no_grad():
        assert torch.equal(model(x, t, class_labels=y), model(x, t, y))
        assert not torch.equal(model(x, t, class_labels=y), model(x, t))  # the null label
    with pytest.raises(ValueError, match="not both"):
        model(x, t, y, class_labels=y)


# -- dit_digits: train, sample per class with guidance, resume -----------------------------------


class Preempted(Exception):
    pass


def test_dit_digits_trains_resumes_and_samples_each_class_with_guidance(tmp_path):
    torch.manual_seed(0)
    whole = train(_tiny_digits(4), tmp_path / "a", progress=False)

    def stop_at_3(state):
        if state["step"] == 3:
            raise Preempted

    torch.manual_seed(0)
    with pytest.raises(Preempted):
        train(_tiny_digits(4), tmp_path / "b", hooks=[stop_at_3], progress=False)
    torch.manual_seed(99)  # the checkpoint, not the seed, must restore the run
    resumed = train(_tiny_digits(4), tmp_path / "b", progress=False)
    for a, b in zip(whole["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    trained = resumed["model"].y_embedder.embedding_table.weight
    torch.manual_seed(0)
    fresh = importlib.import_module("models.utils").create_model(_tiny_digits())
    moved = (trained - fresh.y_embedder.embedding_table.weight).abs().amax(dim=1)
    assert moved[:10].max() > 0  # the data's labels reached the label table (adaLN-Zero: the
    # gradient reaches it once the modulations have left zero, so not every row moves in 4 steps)

    config = _tiny_digits(4)
    folder = run_sample(config, tmp_path / "b", num_samples=20, progress=False)
    npz = np.load(folder / "sample.npz")
    assert npz["samples"].shape == (20, 8, 8, 1) and npz["samples"].dtype == np.uint8
    assert npz["labels"].tolist() == [i % 10 for i in range(20)]
    record = json.loads((folder / "info.json").read_text())
    guidance = record["sampling"]["guidance"]
    assert (guidance["cfg_scale"], guidance["w"], guidance["batched"]) == (2.0, 1.0, True)
    assert record["nfe"] == 2 * 4  # two batches of 10 (eval.batch_size), 4 NFE each

    # the config's guidance reaches the DiT: it changes the samples (of a perturbed copy: four
    # steps leave the adaLN modulations, through which the labels act, at about zero)
    model = resumed["model"].eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    y = torch.arange(10)
    x = {}
    for s in (3.0, 1.0):  # s = 1: the conditional model alone
        config.sampling.cfg_scale = s
        x[s], _ = generate(config, get_sde(config), model, (10, 1, 8, 8),
                           inverse_scaler=lambda v: v, class_labels=y,
                           generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x[3.0]).all() and (x[3.0] - x[1.0]).abs().max() > 0.1


# -- official DiT checkpoints -------------------------------------------------------------------


def test_official_layouts_are_told_apart(tmp_path):
    released, training, _, _ = _save_official(tmp_path)
    assert official_dit_layout(released) == "state_dict"
    assert official_dit_layout(training) == "training"
    ours = tmp_path / "ours"
    train(_tiny_digits(2), ours, progress=False)
    assert official_dit_layout(checkpoints.latest_checkpoint(ours)) is None
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert official_dit_layout(tmp_path / "junk.pt") is None


def test_official_files_load_their_ema_weights_and_sample_latents(tmp_path, caplog):
    released, training, ema, raw = _save_official(tmp_path)
    config = _tiny_imagenet()
    for path in (released, training):
        model, step = load_ema_model(config, path)
        assert step == 0 and not model.training
        for k, v in model.state_dict().items():
            assert torch.equal(v, ema.state_dict()[k]), k  # the EMA, never the raw weights

    config.sampling.classes = (207, 360, 387)
    with caplog.at_level(logging.INFO):
        folder = run_sample(config, tmp_path / "run", checkpoint=str(released), num_samples=6,
                            progress=False)
    assert folder.name == "samples_DiT-tiny" and not (folder / "sample.png").exists()
    z = np.load(folder / "latents.npz")
    assert z["latents"].shape == (6, 4, 8, 8) and z["latents"].dtype == np.float32
    assert z["labels"].tolist() == [207, 360, 387] * 2
    assert np.isfinite(z["latents"]).all() and z["latents"].std() > 0.1  # not [0, 1] images
    record = json.loads((folder / "info.json").read_text())
    assert record["latents"] == {"file": "latents.npz", "decoded": False, "note": LATENT_STOP,
                                 "autoencoder": {"name": "sd_vae", "path": ""}}
    assert record["checkpoint_layout"].startswith("official DiT weights")
    assert record["sampling"]["guidance"]["official_dit"] is True
    stops = [r.getMessage() for r in caplog.records if "latents written to" in r.getMessage()]
    assert stops == [f"latents written to {folder / 'latents.npz'}; {LATENT_STOP}"]

    # the training checkpoint's EMA gives the released file's samples; its raw weights do not
    again = run_sample(config, tmp_path / "run", checkpoint=str(training), num_samples=6,
                       progress=False)
    assert np.array_equal(np.load(again / "latents.npz")["latents"], z["latents"])
    torch.save(raw.state_dict(), tmp_path / "raw.pt")
    other = run_sample(config, tmp_path / "run", checkpoint=str(tmp_path / "raw.pt"),
                       num_samples=6, progress=False)
    assert not np.allclose(np.load(other / "latents.npz")["latents"], z["latents"])


@pytest.mark.parametrize("change, message", [
    (dict(hidden_size=64), r"hidden_size 64 -> 32 \(--config.model.hidden_size\)"),
    (dict(depth=3), r"depth 3 -> 2 \(--config.model.depth\)"),
    (dict(learn_sigma=False), r"learn_sigma False -> True \(--config.model.learn_sigma\)"),
    (dict(num_classes=10), r"label_rows 11 -> 1001 \(--config.model.num_classes\)"),
])
def test_a_checkpoint_of_another_architecture_is_refused_naming_both(tmp_path, change, message):
    released, _, _, _ = _save_official(tmp_path)
    config = _tiny_imagenet()
    config.model.update(change)
    with pytest.raises(CheckpointError, match=r"holds a DiT with hidden_size=32, depth=2.*"
                       r"but the config builds one with .*" + message):
        load_ema_model(config, released)


def test_an_official_file_needs_a_dit_config(tmp_path):
    released, _, _, _ = _save_official(tmp_path)
    with pytest.raises(CheckpointError, match=r"official DiT weights .* needs a config with "
                       r"config.model.name='dit', got 'ncsnpp'"):
        load_ema_model(_config("digits"), released)


def _run_main(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "main.py"), "--noprogress", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # two CLI processes (the same path runs in-process in the tests above)
def test_cli_samples_an_official_checkpoint_and_refuses_a_mismatch(tmp_path):
    released, _, _, _ = _save_official(tmp_path)
    tiny = ["--config=imagenet256_dit_xl2", "--mode=sample", f"--checkpoint={released}",
            "--config.model.hidden_size=32", "--config.model.num_heads=2",
            "--config.data.image_size=64", "--config.sampling.nfe=4", "--num_samples=2"]
    ok = _run_main(*tiny, "--config.model.depth=2", f"--workdir={tmp_path / 'run'}",
                   "--classes=207,360")
    assert ok.returncode == 0, ok.stderr[-2000:]
    folder = tmp_path / "run" / "eval" / "samples_DiT-tiny"
    assert f"latents written to {folder / 'latents.npz'}" in ok.stderr
    assert np.load(folder / "latents.npz")["labels"].tolist() == [207, 360]
    bad = _run_main(*tiny, "--config.model.depth=28", f"--workdir={tmp_path / 'bad'}")
    assert bad.returncode == 1
    last = bad.stderr.strip().splitlines()[-1]
    assert "depth 28 -> 2 (--config.model.depth)" in last and "Traceback" not in bad.stderr
    none = _run_main("--config=imagenet256_dit_xl2", "--mode=sample", f"--workdir={tmp_path}/x")
    assert none.returncode == 1 and not (tmp_path / "x").exists()
    assert none.stderr.strip().splitlines()[-1].endswith(
        "a DiT config also samples an official DiT file: --checkpoint /path/DiT-XL-2-256x256.pt")
