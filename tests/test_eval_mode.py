"""``main.py --mode eval`` (``evaluation.run``) on a tiny digits model: the JSON record, resuming
an interrupted sampling job, bits/dim with its standard error (and the dequantisation against a
closed form), the Inception path with random weights, and the offline weights error."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

import samplers
import sde_lib
from score_sde import cli as main
from score_sde import datasets
from score_sde.evaluation import bits_per_dim, inception, run
from score_sde.evaluation.inception import FID_WEIGHTS_NAME, FIDInceptionV3
from score_sde.training import checkpoints
from score_sde.training.events import EventLog
from score_sde.training.loop import build, get_step_fns

OVERRIDES = {"model.nf": 8, "sampling.nfe": 4, "eval.batch_size": 8, "eval.num_samples": 20,
             "eval.begin_ckpt": 1, "eval.end_ckpt": 1, "eval.enable_sampling": True,
             "eval.enable_loss": True, "eval.enable_bpd": False, "eval.rtol": 1e-2,
             "eval.atol": 1e-2}


def tiny_config(**changes):
    config = importlib.import_module("configs.digits").get_config()
    config.device = "cpu"
    for key, value in {**OVERRIDES, **changes}.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir holding ``checkpoints/checkpoint_1.pth`` of the tiny model after 2 steps."""
    workdir = tmp_path_factory.mktemp("trained")
    config = tiny_config(**{"training.batch_size": 8})
    torch.manual_seed(0)
    state, sde = build(config)
    train_step, _ = get_step_fns(config, sde)
    scaler = datasets.get_data_scaler(config)
    for _ in range(2):
        batch = scaler(next(state["iterators"]["train"]))
        train_step(state, batch, generator=state["generators"]["train"])
    checkpoints.save_checkpoint(checkpoints.snapshot_path(workdir, 1), state)
    return workdir


def evaluate(config, workdir, **kwargs):
    return run.evaluate(config, main.eval_inputs(config, workdir), workdir, progress=False,
                        **kwargs)


def fresh_workdir(trained, tmp_path, name="run"):
    workdir = tmp_path / name
    shutil.copytree(trained / "checkpoints", workdir / "checkpoints")
    return workdir


@pytest.fixture
def count_draws(monkeypatch):
    """Counts the sample batches actually drawn (``samplers.sample`` calls)."""
    calls = []
    original = samplers.sample

    def counted(*args, **kwargs):
        calls.append(args[2][0])  # batch size of the (B, *D) shape
        return original(*args, **kwargs)

    monkeypatch.setattr(samplers, "sample", counted)
    return calls


def test_cli_writes_the_record_and_skips_it_on_a_rerun(trained, tmp_path, caplog):
    workdir = fresh_workdir(trained, tmp_path)
    flags = ["--config=digits", *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
             f"--workdir={workdir}", "--mode=eval", "--noprogress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO / "main.py"), *flags], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    path = run.record_path(workdir, "eval", 1)
    record = json.loads(path.read_text())
    assert record["format"] == "score-sde-toolkit/eval-record-v1"
    assert record["checkpoint"]["n"] == 1 and record["checkpoint"]["step"] == 2
    assert len(record["checkpoint"]["sha256"]) == 64
    metrics = record["metrics"]
    assert set(metrics) == {"eval_loss", "fdd", "classifier_score"}
    assert metrics["fdd"] > 0 and 1 <= metrics["classifier_score"] <= 10
    assert record["loss"]["per_batch"] and metrics["eval_loss"] == pytest.approx(
        np.mean(record["loss"]["per_batch"]))
    assert record["num_samples"] == 20
    assert record["seeds"] == {"base": 42, "first": 42, "last": 61,
                               "rule": "sample k uses seed base + k"}
    sampler = record["sampler"]
    assert sampler["method"] == "dpm_solver++_2m" and sampler["options"]["nfe"] == 4
    assert sampler["batch_size"] == 8 and sampler["shape_per_sample"] == [1, 8, 8]
    assert "eps" in sampler["options"] and "lower_order_final" in sampler["options"]
    # the digits config's PC keys are set but not read by dpm_solver++_2m: not applied
    assert sampler["not_applied"]["predictor"] == "euler_maruyama"
    assert "nfe" not in sampler["not_applied"] and "method" not in sampler["not_applied"]
    assert record["nfe"] == 4 and record["nfe_per_batch"] == [4, 4, 4]
    assert record["nfe_total"] == 12 and record["resumed_batches"] == 0
    assert record["sample_metric"]["name"] == "digits"
    assert len(record["sample_metric"]["classifier"]["sha256"]) == 64
    assert record["eval"]["num_samples"] == 20 and record["sampling_config"]["nfe"] == 4
    assert record["sample_precision"]["network"] == "fp32"
    assert sorted(p.name for p in (workdir / "eval" / "ckpt_1").iterdir()) == [
        "samples_00000.npz", "samples_00001.npz", "samples_00002.npz"]
    _check_eval_scalars(workdir / "eval" / "tensorboard", metrics, step=2)
    # the rerun in this process (the skip is run.evaluate's; main.py's exit status is above)
    with caplog.at_level("INFO"):
        evaluate(tiny_config(), workdir,
                 event_log=lambda: EventLog(workdir / "eval" / "tensorboard"))  # as main.py
    assert "checkpoints [1] already have records" in caplog.text
    assert json.loads(path.read_text()) == record
    assert len(list((workdir / "eval" / "tensorboard").iterdir())) == 1  # nothing new to log


def _check_eval_scalars(folder, metrics, step):
    """The record's metrics as TensorBoard scalars at the checkpoint's training step, read back
    with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(metrics)
    for name, value in metrics.items():
        (scalar,) = events.Scalars(name)
        assert scalar.step == step and scalar.value == pytest.approx(value, rel=1e-6)


def _samples(workdir):
    files = sorted((workdir / "eval" / "ckpt_1").glob("samples_*.npz"))
    return np.concatenate([np.load(f)["samples"] for f in files])


def test_eval_samples_run_the_network_in_sampling_precision(trained, tmp_path):
    """``sampling.precision='bf16'`` applies to the eval samples (autocast network, float32
    solver state) and the record says so; fp32 is the default."""
    drawn = {}
    for precision in ("fp32", "bf16"):
        workdir = fresh_workdir(trained, tmp_path, precision)
        config = tiny_config(**{"eval.enable_loss": False, "sampling.precision": precision})
        (path,) = evaluate(config, workdir)
        record = json.loads(path.read_text())
        assert record["sample_precision"]["network"] == precision
        drawn[precision] = _samples(workdir).astype(np.float64)
    gap = np.abs(drawn["bf16"] - drawn["fp32"]).max()
    assert 0 < gap < 64  # bf16 ran (not bitwise fp32) and sampled the same digits roughly


def test_an_interrupted_run_resumes_and_equals_an_uninterrupted_one(trained, tmp_path,
                                                                    count_draws):
    config = tiny_config()
    whole = fresh_workdir(trained, tmp_path, "whole")
    evaluate(config, whole)
    assert count_draws == [8, 8, 4]

    count_draws.clear()
    parts = fresh_workdir(trained, tmp_path, "parts")

    def interrupt(x):
        raise KeyboardInterrupt  # after the first batch was drawn and saved

    with pytest.raises(KeyboardInterrupt):
        evaluate(config, parts, on_batch=interrupt)
    assert count_draws == [8] and not run.record_path(parts, "eval", 1).exists()
    count_draws.clear()
    evaluate(config, parts)
    assert count_draws == [8, 4]  # only the remaining batches are drawn
    np.testing.assert_array_equal(_samples(parts), _samples(whole))
    a, b = (json.loads(run.record_path(w, "eval", 1).read_text()) for w in (whole, parts))
    assert b["resumed_batches"] == 1 and a["resumed_batches"] == 0
    assert a["metrics"] == b["metrics"] and a["seeds"] == b["seeds"]

    count_draws.clear()
    evaluate(config, parts)  # finished: skipped
    assert count_draws == []


def test_bits_per_dim_mean_and_standard_error_reused_on_a_rerun(trained, tmp_path,
                                                                 monkeypatch):
    config = tiny_config(**{"eval.enable_sampling": False, "eval.enable_loss": False,
                            "eval.enable_bpd": True, "eval.batch_size": 100})
    workdir = fresh_workdir(trained, tmp_path)
    record = json.loads(evaluate(config, workdir)[0].read_text())
    bpd = np.load(workdir / "eval" / "bpd_ckpt_1_test.npz")["bpd"]
    assert bpd.shape == (297,) and np.isfinite(bpd).all()
    assert bpd.min() > 0  # an upper bound on a discrete distribution's bits/dim
    assert record["metrics"]["bpd"] == pytest.approx(bpd.mean(), rel=1e-12)
    assert record["metrics"]["bpd_stderr"] == pytest.approx(bpd.std(ddof=1) / math.sqrt(297),
                                                            rel=1e-12)
    assert record["bpd"]["num_images"] == 297 and record["bpd"]["levels"] == 17
    assert record["bpd"]["nfe"] > 0 and "num_samples" not in record

    def solve(*args, **kwargs):
        raise AssertionError("bits/dim solved again")

    run.record_path(workdir, "eval", 1).unlink()  # as if interrupted after the bits/dim pass
    monkeypatch.setattr(bits_per_dim, "dequantized_bits_per_dim", solve)
    again = json.loads(evaluate(config, workdir)[0].read_text())
    assert again["bpd"] == record["bpd"] and again["metrics"] == record["metrics"]


def test_dequantized_bits_per_dim_equals_the_closed_form():
    """N(0, I) data under the VP SDE has the exact score -x and a zero probability-flow drift,
    so z = y and log p(y) = log N(y; 0, I): bits/dim = -(log N(y) + D log a) / (D log 2)
    + log2 L, with y = a (k + u) / L + c, u in [0, 1), for L = 17 (not a power of 2)."""
    sde = sde_lib.VPSDE()
    levels, a, c = 17, 2.0, -1.0
    k = torch.randint(0, levels, (5, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    x = k / (levels - 1)
    bpd, info = bits_per_dim.dequantized_bits_per_dim(
        sde, lambda y, t: -y, x, lambda y: (y - c) / a, levels, divergence="exact",
        generator=torch.Generator().manual_seed(1))
    z = info["z"][0]  # (B, 1, 8, 8)
    u = (z - c) / a * levels - k
    assert u.min() >= -1e-5 and u.max() < 1 + 1e-5 and u.std() > 0.2  # uniform on [0, 1)
    D = 64
    log_normal = -0.5 * (z**2).flatten(1).sum(1) - D / 2 * math.log(2 * math.pi)
    expected = -(log_normal + D * math.log(a)) / (D * math.log(2)) + math.log2(levels)
    torch.testing.assert_close(bpd, expected, rtol=1e-5, atol=1e-5)
    nats_bpd, info = bits_per_dim.dequantized_bits_per_dim(  # continuous data: -log2 p(x) / D
        sde, lambda y, t: -y, x, lambda y: (y - c) / a, None, divergence="exact")
    y = a * x + c
    log_normal = -0.5 * (y**2).flatten(1).sum(1) - D / 2 * math.log(2 * math.pi)
    torch.testing.assert_close(nats_bpd, -(log_normal + D * math.log(a)) / (D * math.log(2)),
                               rtol=1e-5, atol=1e-5)


def _image_folder(root, n=10):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_inception_metrics_with_random_weights(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("SCORE_SDE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "load_fid_inception",
                        lambda: FIDInceptionV3().eval().requires_grad_(False))
    config = tiny_config(**{"data.dataset": "folder", "eval.num_samples": 6,
                            "eval.enable_loss": False})
    config.data.root = str(_image_folder(tmp_path / "images"))
    workdir = fresh_workdir(trained, tmp_path)
    record = json.loads(evaluate(config, workdir)[0].read_text())
    metrics = record["metrics"]
    assert set(metrics) == {"fid", "inception_score", "inception_score_std", "kid", "kid_std"}
    assert metrics["fid"] > 0 and metrics["inception_score"] >= 1
    info = record["sample_metric"]
    assert info["name"] == "inception" and info["num_reference"] == 10
    assert info["weights"] == FID_WEIGHTS_NAME
    name = info["reference"]
    assert (tmp_path / "cache" / f"fid_features_{name}.npz").is_file()
    assert (tmp_path / "cache" / f"fid_stats_{name}.npz").is_file()


def test_offline_inception_error_comes_before_any_sampling(trained, tmp_path, monkeypatch,
                                                           count_draws):
    monkeypatch.setenv("SCORE_SDE_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)

    def offline(*args, **kwargs):
        raise FileNotFoundError(inception._missing_weights_message("download failed: offline"))

    monkeypatch.setattr(inception, "download_fid_weights", offline)
    loaded = []
    config = tiny_config(**{"data.dataset": "CIFAR10"})
    workdir = fresh_workdir(trained, tmp_path)
    inputs = dataclasses.replace(main.eval_inputs(config, workdir), load_model=loaded.append)
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_NAME) as error:
        run.evaluate(config, inputs, workdir, progress=False)
    assert str(tmp_path / "empty_cache") in str(error.value)
    assert count_draws == [] and loaded == []  # no checkpoint loaded, no batch drawn


def test_missing_eval_keys_and_bad_values_are_named():
    config = importlib.import_module("configs.toy_2d").get_config()
    with pytest.raises(ValueError, match=r"config.eval.\{begin_ckpt, end_ckpt, enable_sampling"):
        run.check_eval_config(config)
    with pytest.raises(ValueError, match="begin_ckpt=3 > end_ckpt=2"):
        run.check_eval_config(tiny_config(**{"eval.begin_ckpt": 3, "eval.end_ckpt": 2}))
    with pytest.raises(ValueError, match="num_samples must be a positive int, got 0"):
        run.check_eval_config(tiny_config(**{"eval.num_samples": 0}))
