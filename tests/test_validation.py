"""Validation before work (training.validation) and a seeded fuzz over config fields and over the
bytes of checkpoints and dataset files: every case ends in one of our clear errors (or loads
cleanly), never a traceback from deep inside torch or a hang, and nothing on disk is lost."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import math
import pickle
import random
import signal
import tarfile

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import CheckpointError
from score_sde.datasets import cifar10
from score_sde.training import checkpoints, validation
from score_sde.training.loop import build, train
from score_sde.training.validation import DatasetError

OUR_CONFIG_ERRORS = (TypeError, ValueError)


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _config(name: str, **overrides) -> ml_collections.ConfigDict:
    config = importlib.import_module(f"configs.{name}").get_config()
    config.device = "cpu"
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def _untyped(config) -> ml_collections.ConfigDict:
    """A copy without ml_collections' type safety, so a fuzz case can put any value anywhere
    (as a config built in Python, rather than by the CLI, could)."""
    return ml_collections.ConfigDict(config.to_dict(), type_safe=False)


def _set(config, key: str, value) -> None:
    *path, field = key.split(".")
    node = config
    for part in path:
        node = node[part]
    node[field] = value


# -- config values --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["toy_2d", "digits", "vp_cifar", "ve_cifar", "ddpm_cifar",
                                  "ncsn_cifar", "subvp_cifar_deep"])
def test_the_shipped_configs_are_valid(name):
    from configs.registry import CONFIGS

    config = importlib.import_module(CONFIGS[name]).get_config()
    validation.validate_config(config)
    validation.validate_config(config, world_size=config.training.batch_size)


@pytest.mark.parametrize("key, value, error, words", [
    ("training.batch_size", 0, ValueError, "config.training.batch_size must be an integer >= 1"),
    ("training.batch_size", 6.5, TypeError, "got float 6.5"),
    ("optim.lr", -1e-4, ValueError, "config.optim.lr must be a finite number > 0"),
    ("optim.lr", math.nan, ValueError, "config.optim.lr"),
    ("training.sde", "vp", ValueError,
     "valid: cosine_vpsde, discrete_vpsde, subvpsde, vesde, vpsde"),
    ("model.name", "unet", ValueError, "Unknown model 'unet'; valid: ddpm, dit, mlp, ncsnpp"),
    ("sampling.method", "heun", ValueError, "Unknown sampler 'heun'; valid: adaptive"),
    ("model.attn_resolutions", (16,), ValueError, "the resolutions of image_size 8"),
    ("model.ch_mult", (1, 2, 2, 2, 2), ValueError, "must be divisible by 16"),
    ("data.random_flip", "no", TypeError, "config.data.random_flip must be True or False"),
    ("device", "gpu", ValueError, "config.device='gpu' is not a device"),
])
def test_bad_values_are_named_with_what_is_allowed(key, value, error, words):
    config = _untyped(_config("digits"))
    _set(config, key, value)
    with pytest.raises(error, match=None) as info:
        validation.validate_config(config)
    assert words in str(info.value)


def test_the_global_batch_must_split_evenly_over_the_ranks():
    config = _config("digits", **{"training.batch_size": 63})
    validation.validate_config(config, world_size=1)
    with pytest.raises(ValueError, match=r"batch_size=63 \(the global batch\) must be divisible "
                                         r"by the world size 2; use e.g. 62 or 64"):
        validation.validate_config(config, world_size=2)


def test_pc_sampler_names_are_checked():
    config = _untyped(_config("digits"))
    _set(config, "sampling.method", "pc")
    _set(config, "sampling.predictor", "euler")
    with pytest.raises(ValueError, match="sampling.predictor: Unknown predictor 'euler'"):
        validation.validate_config(config)


BAD = {
    "pos_int": [0, -3, 2.5, "8", None, True, math.nan],
    "nonneg_int": [-1, 1.5, "0", None, False],
    "bool": ["yes", 1, None, 0.0],
    "pos_real": [0, -1e-4, math.nan, math.inf, "0.1", None, True],
    "unit": [-0.1, 1.5, math.nan, "0.9", None],
    "name": ["foo", "", 3, None],
    "device": ["gpu0", 3, None, "cuda:x"],
    "ch_mult": [(), (1, 0), "12", (1, 2.0), (1, 2, 2, 2, 2)],
    "attn": [(3,), (16,), "8", (8.0,)],
}
FIELDS = {
    "training.batch_size": "pos_int", "training.n_iters": "pos_int",
    "training.snapshot_freq": "pos_int", "training.snapshot_freq_for_preemption": "pos_int",
    "training.log_freq": "pos_int", "training.eval_freq": "pos_int", "eval.batch_size": "pos_int",
    "training.continuous": "bool", "training.reduce_mean": "bool", "data.centered": "bool",
    "training.snapshot_sampling": "bool", "data.uniform_dequantization": "bool",
    "optim.lr": "pos_real", "optim.eps": "pos_real", "model.beta_max": "pos_real",
    "model.ema_rate": "unit", "optim.beta1": "unit", "optim.warmup": "nonneg_int",
    "seed": "nonneg_int", "training.sde": "name", "model.name": "name",
    "optim.optimizer": "name", "data.dataset": "name", "sampling.method": "name",
    "device": "device", "model.nf": "pos_int",
}
DIGITS_ONLY = {"model.ch_mult": "ch_mult", "model.attn_resolutions": "attn",
               "data.image_size": "pos_int", "data.num_channels": "pos_int",
               "model.num_res_blocks": "pos_int", "data.random_flip": "bool"}


def test_fuzz_config_fields_always_get_a_clear_error():
    rng = random.Random(20261127)
    bases = {"toy_2d": _config("toy_2d"), "digits": _config("digits")}
    for case in range(200):
        name = rng.choice(sorted(bases))
        fields = dict(FIELDS, **(DIGITS_ONLY if name == "digits" else {}))
        chosen = rng.sample(sorted(fields), rng.choice([1, 1, 2]))
        config = _untyped(bases[name])
        for key in chosen:
            value = rng.choice(BAD[fields[key]])
            _set(config, key, value)
            stored = validation._get(config, key)[1]
            if type(stored) is not type(value):  # ml_collections coerced it (True -> 1.0)
                _set(config, key, value := "not a " + fields[key])
        label = f"case {case}: {name} with " + ", ".join(
            f"{k}={validation._get(config, k)[1]!r}" for k in chosen)
        with deadline(10):
            with pytest.raises(OUR_CONFIG_ERRORS, match=None) as info:
                try:
                    validation.validate_config(config)
                except OUR_CONFIG_ERRORS:
                    raise
                else:
                    raise AssertionError(f"{label}: accepted")
        message = str(info.value)
        assert any(key.split(".")[-1] in message for key in chosen), (label, message)
        assert "Traceback" not in message and len(message.splitlines()) == 1, (label, message)


# -- checkpoints ----------------------------------------------------------------------------------


def _tiny_toy(n_iters=2):
    config = _config("toy_2d", **{
        "model.nf": 8, "training.batch_size": 16, "data.num_samples": 64,
        "training.snapshot_freq": 1, "training.snapshot_freq_for_preemption": 1,
        "training.snapshot_sampling": False, "training.log_freq": 1, "training.eval_freq": 100,
    })
    config.training.n_iters = n_iters
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    config = _tiny_toy()
    torch.manual_seed(0)
    train(config, workdir, progress=False)
    return config, workdir


def _mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One seeded corruption: truncation, flipped bytes, an overwritten or deleted range,
    zeros, garbage, or nothing at all."""
    kind = rng.choice(["truncate", "flip", "overwrite", "delete", "zeros", "garbage", "empty",
                       "append"])
    n = len(data)
    a = rng.randrange(n)
    b = min(n, a + rng.choice([1, 8, 64, 512, 4096]))
    if kind == "truncate":
        return kind, data[:a]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.choice([1, 4, 32])):
            out[rng.randrange(n)] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    if kind == "overwrite":
        return kind, data[:a] + rng.randbytes(b - a) + data[b:]
    if kind == "delete":
        return kind, data[:a] + data[b:]
    if kind == "zeros":
        return kind, data[:a] + bytes(b - a) + data[b:]
    if kind == "garbage":
        return kind, rng.randbytes(rng.choice([0, 1, 100, n]))
    if kind == "append":
        return kind, data + rng.randbytes(b - a)
    return kind, b""


def _snapshot_bytes(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "tensorboard" not in p.parts}


def test_fuzz_corrupted_checkpoints_get_a_clear_error(trained, tmp_path):
    config, workdir = trained
    good = checkpoints.meta_path(workdir).read_bytes()
    before = _snapshot_bytes(workdir)
    rng = random.Random(9)
    state, _ = build(config)
    outcomes = {"refused": 0, "loaded": 0}
    for case in range(120):
        kind, data = _mutate(good, rng)
        path = tmp_path / f"case_{case}.pth"
        path.write_bytes(data)
        with deadline(20):
            for check, target in ((validation.validate_checkpoint_file, config),
                                  (checkpoints.restore_checkpoint, state)):
                try:
                    check(path, target)
                    outcomes["loaded"] += 1
                except CheckpointError as e:
                    outcomes["refused"] += 1
                    assert str(path) in str(e), (case, kind, str(e))
                    assert len(str(e).splitlines()) <= 2, (case, kind, str(e))
        assert path.read_bytes() == data  # reading never rewrites the file
    assert outcomes["refused"] >= 150, outcomes  # most corruptions are caught
    assert _snapshot_bytes(workdir) == before


def test_a_corrupted_resume_checkpoint_stops_training_and_is_kept(trained, tmp_path):
    import shutil

    config, workdir = trained
    rng = random.Random(3)
    for case in range(12):
        run = tmp_path / f"run_{case}"
        shutil.copytree(workdir, run)
        meta = checkpoints.meta_path(run)
        kind, data = _mutate(meta.read_bytes(), rng)
        meta.write_bytes(data)
        before = _snapshot_bytes(run)
        with deadline(30):
            try:
                train(config, run, progress=False)
            except CheckpointError as e:
                assert str(meta) in str(e)
                assert _snapshot_bytes(run) == before, (case, kind)


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_key(trained):
    config, workdir = trained
    wider = _tiny_toy()
    wider.model.nf = 16
    with pytest.raises(CheckpointError, match="shape mismatches"):
        validation.validate_checkpoint_file(checkpoints.meta_path(workdir), wider)


def test_a_non_finite_checkpoint_is_refused(trained, tmp_path):
    config, workdir = trained
    ckpt = torch.load(checkpoints.meta_path(workdir), weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = ckpt["model"][name].clone().fill_(math.nan)
    path = tmp_path / "nan.pth"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=f"model.{name} has NaN or inf"):
        validation.validate_checkpoint_file(path, config)


# -- dataset files --------------------------------------------------------------------------------


def _cifar_config(root):
    config = _config("digits")  # a small model, with CIFAR-10's data keys
    config.data.dataset, config.data.image_size, config.data.num_channels = "CIFAR10", 32, 3
    config.data.root = str(root)
    config.model.ch_mult = (1, 2)
    config.training.batch_size = 2
    return config


def _cifar_tarball(n=3) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"labels": [int(v) for v in rng.integers(0, 10, n)],
                     b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
            raw = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buffer.getvalue()


def test_fuzz_corrupted_cifar_tarballs_get_a_dataset_error(tmp_path, monkeypatch):
    good = _cifar_tarball()
    path = tmp_path / cifar10.FILENAME
    config = _cifar_config(tmp_path)
    monkeypatch.setattr(cifar10, "MD5", hashlib.md5(good).hexdigest())
    path.write_bytes(good)
    validation.validate_dataset(config, ("train", "test"))
    rng = random.Random(11)
    refused = 0
    for case in range(80):
        kind, data = _mutate(good, rng)
        path.write_bytes(data)
        # half the cases pass the checksum, so the tar, gzip and pickle readers see the damage
        if case % 2:
            monkeypatch.setattr(cifar10, "MD5", hashlib.md5(data).hexdigest())
        with deadline(20):
            try:
                validation.validate_dataset(config, ("train", "test"))
            except DatasetError as e:
                refused += 1
                assert "dataset 'CIFAR10'" in str(e), (case, kind, str(e))
        assert path.read_bytes() == data  # validation only reads
        monkeypatch.setattr(cifar10, "MD5", hashlib.md5(good).hexdigest())
    assert refused >= 60


def test_dataset_errors_name_the_problem(tmp_path):
    config = _cifar_config(tmp_path / "nowhere")
    config.data.dataset, config.data.root = "folder", str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="image folder .*nowhere does not exist"):
        validation.validate_dataset(config)
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.full((12, 12, 3), 40 * k, np.uint8)).save(folder / f"{k}.png")
    config.data.root = str(folder)
    validation.validate_dataset(config)
    (folder / "1.png").write_bytes((folder / "1.png").read_bytes()[:30])
    with pytest.raises(DatasetError, match=r"image .*1\.png is corrupt"):
        validation.validate_dataset(config)
    digits = _config("digits", **{"data.image_size": 8})
    digits.data.num_channels = 3
    with pytest.raises(DatasetError, match="num_channels must be 1"):
        validation.validate_dataset(digits)
    toy = _config("toy_2d", **{"data.num_samples": 8})
    with pytest.raises(DatasetError, match="8 training samples, fewer than"):
        validation.validate_dataset(toy)


def test_validate_run_checks_mode_config_data_and_the_resume_checkpoint(trained, tmp_path):
    import shutil

    config, workdir = trained
    with pytest.raises(ValueError, match="--mode sample runs in one process; only --mode train"):
        validation.validate_run(config, workdir, "sample", world_size=2)
    validation.validate_run(config, workdir, "train", world_size=2)
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    last = checkpoints.list_snapshots(run)[-1][1]
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{last}: cannot read checkpoint"):
        validation.validate_run(config, run, "train")


def test_fuzz_corrupted_images_are_refused_or_decode(tmp_path, monkeypatch):
    """PIL's ``verify`` passes many damaged JPEGs; validation decodes each file once, so every
    image it accepts also decodes in training."""
    from score_sde.datasets.folder import load_image

    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    encoded = {}
    for ext, fmt in ((".png", "PNG"), (".jpg", "JPEG")):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        encoded[ext] = buffer.getvalue()
        (folder / f"good{ext}").write_bytes(encoded[ext])
    config = _cifar_config(tmp_path)
    config.data.dataset, config.data.root, config.data.image_size = "folder", str(folder), 8
    rng = random.Random(5)
    refused = 0
    for case in range(60):
        ext = (".png", ".jpg")[case % 2]
        kind, data = _mutate(encoded[ext], rng)
        for old in folder.glob("z.*"):
            old.unlink()
        path = folder / f"z{ext}"
        path.write_bytes(data)
        with deadline(20):
            try:
                validation.validate_dataset(config, verified=tmp_path / "verified.json")
            except DatasetError as e:
                refused += 1
                assert f"image {path} is corrupt" in str(e), (case, kind, str(e))
                continue
        assert load_image(path, 8, 3).shape == (3, 8, 8), (case, kind)
    assert refused >= 30

    path.unlink()
    validation.validate_dataset(config, verified=tmp_path / "verified.json")
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda im: decoded.append(im.filename) or real_load(im))
    validation.validate_dataset(config, verified=tmp_path / "verified.json")
    # a restart does not decode the folder again (loading reads only the headers, for the depth)
    assert decoded == []
