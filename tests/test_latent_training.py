"""Latent score SDEs on the training side: ``--mode train_autoencoder``, latent training on
on-the-fly or cached posteriors, decoded samples, resume, evaluation, and the config errors
(test-sized runs of the digits: a tiny autoencoder, a tiny DDPM++ / DiT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from configs.digits_ae import get_config as get_ae_config
from configs.digits_latent import get_config as get_latent_config
from models.checkpoint import CheckpointError, safe_load
from models.utils import create_model
from score_sde import datasets
from score_sde.training import checkpoints, validation
from score_sde.training.autoencoder import train_autoencoder, validate_autoencoder_run
from score_sde.training.latent import (
    check_autoencoder_checkpoint,
    latent_data_shape,
    load_config_autoencoder,
)
from score_sde.training.latent_data import LatentIterator, latent_iterators
from score_sde.training.loop import build, train

TINY_AE = dict(latent_channels=2, channels=8, channel_mult=(1, 2), num_res_blocks=1)


def _shrink(config, workdir_steps: int = 2):
    t = config.training
    t.batch_size, t.n_iters = 16, workdir_steps
    t.snapshot_freq = t.snapshot_freq_for_preemption = t.log_freq = t.eval_freq = 2
    config.device, config.num_threads = "cpu", 1
    config.data.cache = "none"
    return config


def ae_config(steps: int = 2):
    config = _shrink(get_ae_config(), steps)
    config.data.autoencoder.update(TINY_AE)
    return config


def latent_config(ae_dir, steps: int = 2, model: str = "ncsnpp"):
    if model == "dit":
        from configs.dit_digits import get_config as get_dit_config

        config = get_dit_config()
        config.data.autoencoder = get_latent_config().data.autoencoder
        config.model.update(hidden_size=32, depth=1, num_heads=2, num_scales=50)
    else:
        config = get_latent_config()
        config.model.update(nf=16, num_res_blocks=1)
        config.model.num_scales = 10
    config = _shrink(config, steps)
    config.data.autoencoder.update(TINY_AE, checkpoint=str(ae_dir))
    config.sampling.nfe = 4
    return config


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    """A test-sized ``--mode train_autoencoder`` run (4 steps)."""
    workdir = tmp_path_factory.mktemp("ae")
    run_ae(ae_config(4), workdir)
    return workdir


def run_ae(config, workdir):
    torch.manual_seed(0)  # main.py seeds once at the entry; the initial weights draw from it
    return train_autoencoder(config, workdir, progress=False)


def run_latent(config, workdir):
    torch.manual_seed(0)
    return train(config, workdir, progress=False)


def _weights(path):
    return safe_load(path)["model"]


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_autoencoder_writes_checkpoints_grids_scalars(ae_dir):
    assert [n for n, _ in checkpoints.list_snapshots(ae_dir)] == [1, 2]
    ckpt = safe_load(checkpoints.meta_path(ae_dir))
    assert ckpt["step"] == 4 and set(ckpt) >= {"model", "ema", "optimizer", "rng", "data"}
    scale = ckpt["latent_scale"]
    assert scale["shift"] == 0.0 and 0.05 < scale["scale_factor"] < 20
    png = Image.open(ae_dir / "reconstructions" / "iter_4" / "reconstruction.png")
    assert png.size[0] > 2 * png.size[1]  # one row of 8 inputs over one of reconstructions
    assert any((ae_dir / "tensorboard").iterdir())
    assert json.loads((ae_dir / "config.json").read_text())["data"]["autoencoder"]["name"] == "kl"


def test_train_autoencoder_resumes_bit_for_bit(ae_dir, tmp_path):
    run_ae(ae_config(2), tmp_path)
    run_ae(ae_config(4), tmp_path)  # resumed at step 2
    assert _equal_states(_weights(checkpoints.meta_path(tmp_path)),
                         _weights(checkpoints.meta_path(ae_dir)))


def test_loaded_autoencoder_is_frozen_with_its_stored_scale(ae_dir):
    config = latent_config(ae_dir)
    ae = load_config_autoencoder(config)
    stored = safe_load(checkpoints.meta_path(ae_dir))["latent_scale"]["scale_factor"]
    assert ae.scale_factor == pytest.approx(stored) and not ae.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in ae.parameters())
    # the stored factor makes the model-space draws of the test images unit-variance: applied
    # once (twice or not at all would give std stored^{+-1}, far from 1 for this tiny model)
    x = datasets.get_dataset(config, "test").as_float(torch.arange(297))
    z = ae.sample_latent(2 * x - 1, generator=torch.Generator().manual_seed(1))
    assert z.shape == (297, *latent_data_shape(config)) == (297, 2, 4, 4)
    assert z.std().item() == pytest.approx(1.0, abs=0.05)
    assert abs(stored - 1.0) > 0.1  # so that the check above can tell
    config.data.autoencoder.scale_factor = 0.5  # an explicit value overrides the stored one
    assert load_config_autoencoder(config).scale_factor == 0.5


@pytest.mark.parametrize("flip", [False, True])
def test_cached_posteriors_give_the_on_the_fly_draws_bitwise(ae_dir, tmp_path, flip):
    config = latent_config(ae_dir)
    config.data.random_flip = flip
    ae = load_config_autoencoder(config)
    draws = {}
    for cache in ("none", str(tmp_path / "cache")):
        config.data.cache = cache
        images = {"train": datasets.get_data_iterator(config, "train")}
        gens = {"train": torch.Generator().manual_seed(3)}
        it = latent_iterators(config, ae, images, gens, tmp_path)["train"]
        assert isinstance(it, LatentIterator) and it.cached == (cache != "none")
        draws[cache] = [next(it) for _ in range(3)]
        assert it.state_dict()["batch"] == 3
    for a, b in zip(*draws.values()):
        assert a.shape == (16, 2, 4, 4) and torch.equal(a, b)
    if flip:  # the iterator's flips reach the cached posteriors: some draws differ unflipped
        config.data.random_flip = False
        it = latent_iterators(config, ae, {"train": datasets.get_data_iterator(config, "train")},
                              {"train": torch.Generator().manual_seed(3)}, tmp_path)["train"]
        assert not torch.equal(next(it), draws["none"][0])


def test_a_ranks_shard_reads_the_shared_cache_of_every_image(ae_dir, tmp_path, monkeypatch):
    """Under torchrun a rank's dataset reads zeros outside its rows of a global batch: the
    posterior cache that rank builds must still hold every image (one cache for all ranks), and
    the rank's rows of each batch must be the one-process run's draws."""
    from score_sde.training import latent_data
    from score_sde.training.distributed import ShardedDataset

    monkeypatch.setattr(latent_data, "ENCODE_BATCH", 16)  # encoder chunks = global batches
    config = latent_config(ae_dir)
    ae = load_config_autoencoder(config)

    def draws(cache, rows=None):
        config.data.cache = cache
        iterator = datasets.get_data_iterator(config, "train")
        if rows is not None:  # rank 1 of 2, global batch 16
            d = iterator.dataset
            iterator.dataset = ShardedDataset(d.data, d.labels, d.levels, d.classes, d.notes,
                                              rows=rows, batch_size=16)
        it = latent_iterators(config, ae, {"train": iterator},
                              {"train": torch.Generator().manual_seed(3)}, tmp_path)["train"]
        return torch.stack([next(it) for _ in range(3)])

    cache = str(tmp_path / "cache")
    shard = draws(cache, slice(8, 16))  # builds the cache
    on_the_fly = draws("none")
    assert torch.equal(shard[:, 8:], on_the_fly[:, 8:])
    assert torch.equal(draws(cache), on_the_fly)  # the cache the rank built holds every image
    assert len(list((tmp_path / "cache").rglob("*posteriors*"))) == 1


@pytest.mark.parametrize("model", ["ncsnpp", "dit"])
def test_latent_model_trains_samples_decoded_and_resumes(ae_dir, tmp_path, model):
    config = latent_config(ae_dir, 2, model)
    config.data.cache = "auto"
    a = tmp_path / "a"
    state = run_latent(config, a)
    assert state["autoencoder"].latent_shape((1, 8, 8)) == (2, 4, 4)
    samples = np.load(a / "samples" / "iter_2" / "sample.npz")["samples"]
    latents = np.load(a / "samples" / "iter_2" / "latents.npz")["latents"]
    assert samples.shape == (16, 8, 8, 1) and samples.dtype == np.uint8  # decoded digits
    assert latents.shape == (16, 2, 4, 4)
    assert any((a / "data_cache").glob("posteriors-*.npy"))
    # resume: 2 + 2 steps equal 4 steps
    b = tmp_path / "b"
    config4 = latent_config(ae_dir, 4, model)
    config4.data.cache = "auto"
    config4.training.snapshot_sampling = False  # the grids were checked above
    run_latent(config4, b)
    run_latent(config4, a)
    assert _equal_states(_weights(checkpoints.meta_path(a)), _weights(checkpoints.meta_path(b)))


def test_sample_decodes_and_eval_runs(ae_dir, tmp_path):
    from score_sde.cli import eval_inputs
    from score_sde.evaluation.run import evaluate
    from score_sde.training.inference import run_likelihood, run_sample

    config = latent_config(ae_dir, 2)
    run_latent(config, tmp_path)
    config.eval.batch_size = 3
    folder = run_sample(config, tmp_path, num_samples=5, progress=False)
    assert np.load(folder / "sample.npz")["samples"].shape == (5, 8, 8, 1)
    assert np.load(folder / "latents.npz")["latents"].shape == (5, 2, 4, 4)
    record = json.loads((folder / "info.json").read_text())["latents"]
    assert record["decoded"] is True and record["autoencoder"]["kind"] == "KLAutoencoder"
    assert (folder / "sample.png").is_file()
    config.eval.update(begin_ckpt=1, end_ckpt=1, num_samples=6, batch_size=297,
                       enable_loss=True, enable_bpd=True, enable_sampling=True, rtol=1e-3,
                       atol=1e-3)
    config.data.autoencoder.bound_draws = 1
    [path] = evaluate(config, eval_inputs(config, tmp_path), tmp_path, progress=False)
    record = json.loads(path.read_text())
    assert np.isfinite(record["metrics"]["eval_loss"]) and "fdd" in record["metrics"]
    assert record["autoencoder"]["kind"] == "KLAutoencoder"
    # eval's bits/dim is the data-space bound of --mode likelihood (same seed, same draws), never
    # the latents' own ODE bits/dim
    bound = json.loads(run_likelihood(config, tmp_path, "lik", progress=False).read_text())
    assert record["bpd"]["bpd_method"] == "latent_bound"
    assert record["bpd"]["network_precision"]["network"] == "fp32"  # eval.likelihood_precision
    assert record["metrics"]["bpd"] == pytest.approx(bound["bpd"], rel=1e-6)
    assert record["metrics"]["bpd_stderr"] == pytest.approx(bound["bpd_stderr"], rel=1e-6)
    assert record["bpd"]["num_images"] == bound["num_images"] > 0
    per_image = np.load(record["bpd"]["per_image"])["bpd"]
    assert per_image.shape == (bound["num_images"],) and np.isfinite(per_image).all()


def test_the_network_is_built_for_the_latent_shape(ae_dir):
    for model in ("ncsnpp", "dit"):
        config = latent_config(ae_dir, model=model)
        net = create_model(config)
        z = torch.randn(3, 2, 4, 4)
        out = net(z, torch.full((3,), 5.0 if model == "dit" else 0.5))
        assert out.shape[0] == 3 and out.shape[2:] == (4, 4)
    pixel = get_latent_config()
    pixel.data.autoencoder.name = "none"
    assert latent_data_shape(pixel) == (1, 8, 8)


def test_config_errors_name_the_key_and_the_fix(ae_dir, tmp_path):
    config = latent_config(ae_dir)
    config.data.autoencoder.name = "vqgan"
    with pytest.raises(ValueError, match=r"Unknown config.data.autoencoder.name 'vqgan'; "
                                         r"valid: none, kl, sd_vae"):
        validation.validate_config(config)
    config = latent_config(ae_dir)
    config.data.autoencoder.checkpoint = ""
    with pytest.raises(ValueError, match=r"checkpoint is empty.*--mode train_autoencoder"):
        check_autoencoder_checkpoint(config)
    config.data.autoencoder.checkpoint = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"does not exist: train the autoencoder there "
                                                r"first: python main.py --config digits_ae "
                                                r"--mode train_autoencoder --workdir"):
        validation.validate_run(config, tmp_path / "w", "train")
    config = latent_config(ae_dir)
    config.data.autoencoder.channels = 16  # not the trained architecture
    with pytest.raises(CheckpointError, match=r"does not match config.data.autoencoder's "
                                              r"architecture"):
        load_config_autoencoder(config)
    validate_autoencoder_run(ae_config(4), ae_dir)  # what main.py checks before a resume
    config = ae_config(4)
    config.data.autoencoder.latent_channels = 3
    with pytest.raises(CheckpointError, match=r"model does not fit KLAutoencoder"):
        validate_autoencoder_run(config, ae_dir)
    config = latent_config(ae_dir)
    config.data.autoencoder.scale_factor = 0.0
    with pytest.raises(ValueError, match=r"scale_factor must be a positive number"):
        validation.validate_config(config)
    config = latent_config(ae_dir)
    config.data.update(cache="auto", uniform_dequantization=True)
    with pytest.raises(ValueError, match=r"uniform_dequantization.*data.cache = 'none'"):
        build(config, tmp_path / "w")
    config = latent_config(ae_dir)
    config.data.autoencoder.name = "none"
    with pytest.raises(ValueError, match=r"train_autoencoder.*must be 'kl', got 'none'"):
        train_autoencoder(config, tmp_path / "ae2", progress=False)
    # --mode likelihood on a latent config reports the LSGM bound: tests/test_latent_bound.py


def test_an_official_dit_and_a_local_sd_vae_give_decoded_images(tmp_path):
    """imagenet256_dit_xl2's path, test-sized: a tiny official-layout DiT and a tiny
    AutoencoderKL in the diffusers layout (f = 8) sample 64 px images whose pixels are diffusers'
    own decode of the written latents at DiT's scale 0.18215 (the VAE's own 0.5 overridden)."""
    diffusers = pytest.importorskip(
        "diffusers", reason='diffusers is an optional extra (pip install -e ".[latent]")')
    from test_dit_configs import _save_official, _tiny_imagenet

    from score_sde.training.inference import run_sample

    released, _, _, _ = _save_official(tmp_path)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8,) * 4,
        latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=0.5).eval()
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    config = _tiny_imagenet()  # 64 px images, 4 x 8 x 8 latents
    config.data.autoencoder.path = str(tmp_path / "vae")
    config.sampling.classes = (207, 360)
    folder = run_sample(config, tmp_path / "run", checkpoint=str(released), num_samples=2,
                        progress=False)
    z = np.load(folder / "latents.npz")["latents"]
    images = np.load(folder / "sample.npz")["samples"]
    assert z.shape == (2, 4, 8, 8) and images.shape == (2, 64, 64, 3)
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(z) / 0.18215).sample
    ref = (((ref + 1) / 2).clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(images.astype(int) - ref.astype(int)).max() <= 1
    assert images.std() > 1  # not a constant image
    record = json.loads((folder / "info.json").read_text())["latents"]
    assert record["decoded"] is True and record["autoencoder"]["scale_factor"] == 0.18215
    assert record["autoencoder"]["vae_scaling_factor"] == 0.5


def test_train_autoencoder_on_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(24):
        folder = tmp_path / "images" / f"class{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(folder / f"{k}.png")
    config = ae_config(2)
    config.data.update(dataset="folder", root=str(tmp_path / "images"))
    state = run_ae(config, tmp_path / "ae")
    assert state["step"] == 2 and state["model"].latent_shape((1, 8, 8)) == (2, 4, 4)
    png = Image.open(tmp_path / "ae" / "reconstructions" / "iter_2" / "reconstruction.png")
    assert png.size[0] > 2 * png.size[1]


def test_the_own_autoencoder_is_loaded_with_its_ema_weights(ae_dir):
    from models.ema import ExponentialMovingAverage
    from score_sde.training.autoencoder import build_autoencoder_state

    ckpt = safe_load(checkpoints.meta_path(ae_dir))
    ae = load_config_autoencoder(latent_config(ae_dir))
    state = build_autoencoder_state(ae_config(4))
    raw = state["model"]
    raw.load_state_dict(ckpt["model"])
    ema = ExponentialMovingAverage(raw.parameters(), 0.999)
    ema.load_state_dict(ckpt["ema"])
    [p_raw, p_ae] = [dict(m.named_parameters())["encoder.0.weight"] for m in (raw, ae)]
    assert not torch.equal(p_ae, p_raw)  # after 4 steps the average differs from the weights
    ema.copy_to(raw.parameters())
    assert torch.equal(p_ae, dict(raw.named_parameters())["encoder.0.weight"])


@pytest.mark.slow  # three CLI processes; the same paths run in-process above
def test_the_two_commands_of_digits_latent_and_sampling(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    def run(*args):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.run([sys.executable, str(REPO / "main.py"), "--noprogress", *args],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    tiny = ["--config.training.n_iters=2", "--config.training.snapshot_freq=2",
            "--config.training.batch_size=16", "--config.data.autoencoder.channels=8"]
    ae = run("--config=digits_ae", "--mode=train_autoencoder", f"--workdir={tmp_path / 'ae'}",
             *tiny)
    assert ae.returncode == 0, ae.stderr[-2000:]
    latent = ["--config=digits_latent", f"--workdir={tmp_path / 'latent'}", *tiny,
              f"--config.data.autoencoder.checkpoint={tmp_path / 'ae'}",
              "--config.model.nf=16", "--config.sampling.nfe=4"]
    trained = run(*latent, "--mode=train")
    assert trained.returncode == 0, trained.stderr[-2000:]
    sampled = run(*latent, "--mode=sample", "--num_samples=4")
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    folder = tmp_path / "latent" / "eval" / "samples_step_2"
    assert np.load(folder / "sample.npz")["samples"].shape == (4, 8, 8, 1)
    assert np.load(folder / "latents.npz")["latents"].shape == (4, 2, 4, 4)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["none", "auto"])
def test_two_gloo_ranks_train_a_latent_model_like_one_process(ae_dir, tmp_path, cache):
    """torchrun with 2 Gloo ranks trains the latent model as one process does (on the fly, and
    through the posterior cache that rank 0 builds in the workdir)."""
    from test_distributed import _final, _main

    args = ["--config=digits_latent", "--config.model.nf=16", "--config.model.num_res_blocks=1",
            "--config.model.num_scales=10", "--config.training.batch_size=16",
            "--config.training.n_iters=3", "--config.training.snapshot_freq=3",
            "--config.training.snapshot_freq_for_preemption=3", "--config.training.log_freq=1",
            "--config.training.eval_freq=3", "--config.training.snapshot_sampling=False",
            f"--config.data.cache={cache}", f"--config.data.autoencoder.checkpoint={ae_dir}",
            *(f"--config.data.autoencoder.{k}={v}" for k, v in TINY_AE.items()
              if k != "channel_mult"),
            "--config.data.autoencoder.channel_mult=1,2", "--noprogress"]
    _main(*args, f"--workdir={tmp_path / 'two'}", nproc=2)
    _main(*args, f"--workdir={tmp_path / 'one'}")
    two, one = _final(tmp_path / "two"), _final(tmp_path / "one")
    assert two["step"] == one["step"] == 3 and two["data"] == one["data"]
    for name, a in one["model"].items():  # float round-off of sums in another order
        assert torch.allclose(a, two["model"][name], rtol=1e-4, atol=1e-6), name
    if cache == "auto":  # one cache per split, shared by the ranks, keyed as one process's
        names = {run: sorted(p.name for p in (tmp_path / run).rglob("posteriors-*"))
                 for run in ("one", "two")}
        assert len(names["two"]) == 2 and names["two"] == names["one"]


def test_the_bounds_settings_are_refused_before_any_network_loads(ae_dir, tmp_path):
    from configs.imagenet256_dit_xl2 import get_config as get_imagenet_config
    from score_sde.training.latent import bound_settings

    config = latent_config(ae_dir)
    config.eval.bpd_method = "vlb"
    with pytest.raises(ValueError, match="bpd_method ?= ?'vlb'"):
        validation.validate_run(config, tmp_path, "likelihood")
    config.eval.bpd_method = "ode"
    config.data.autoencoder.update(decoder_variance="fitted", decoder_fit_split="test")
    with pytest.raises(ValueError, match="decoder_fit_split = 'test' is the evaluated split"):
        validation.validate_run(config, tmp_path, "likelihood")
    config.data.autoencoder.decoder_fit_split = "trian"
    config.eval.update(enable_bpd=True)
    with pytest.raises(ValueError, match="Unknown config.data.autoencoder.decoder_fit_split"):
        validation.validate_run(config, tmp_path, "eval")
    imagenet = get_imagenet_config()  # the shipped latent configs pass
    assert bound_settings(imagenet, imagenet.eval.bpd_dataset)["decoder_variance"] == "auto"


def test_samples_are_decoded_in_chunks_of_the_eval_batch(ae_dir):
    from score_sde.training.latent import get_model_inverse_scaler

    config = latent_config(ae_dir)
    config.eval.batch_size = 2
    ae = load_config_autoencoder(config)
    calls = []
    decode = ae.decode
    ae.decode = lambda z: calls.append(z.shape[0]) or decode(z)
    z = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    images = get_model_inverse_scaler(config, ae)(z)
    assert calls == [2, 2, 1] and images.shape == (5, 1, 8, 8)
    torch.testing.assert_close(images, (decode(z) + 1) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key,value", [("precision", "bf16"), ("compile", True),
                                       ("grad_accum", 2), ("skip_nonfinite", True)])
def test_train_autoencoder_refuses_the_score_loops_options_it_would_ignore(key, value):
    from score_sde.training.autoencoder import check_autoencoder_training_config

    config = ae_config()
    check_autoencoder_training_config(config)  # the defaults pass
    config.training[key] = value
    with pytest.raises(ValueError, match=f"config.training.{key}={value!r} is not supported by "
                                         "--mode train_autoencoder"):
        check_autoencoder_training_config(config)
