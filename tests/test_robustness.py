"""Crash safety of training: SIGKILL at random points then restart gives bitwise the same run, no
checkpoint file is ever partial, NaN/inf losses and gradients stop the run naming the step (or
are skipped), a full disk leaves the previous checkpoint intact."""

from __future__ import annotations

import errno
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import ml_collections
import pytest
import torch
from conftest import REPO

from models.checkpoint import safe_load
from score_sde import utils
from score_sde.training import checkpoints, distributed, loop, validation
from score_sde.training.checkpoints import CheckpointWriteError
from score_sde.training.loop import train
from score_sde.training.nonfinite import NonFiniteGuard

STEPS = 150
TOY = [
    "--config=toy_2d", "--config.model.nf=16", f"--config.training.n_iters={STEPS}",
    "--config.training.batch_size=32", "--config.data.num_samples=256",
    "--config.training.snapshot_freq=40", "--config.training.snapshot_freq_for_preemption=1",
    "--config.training.log_freq=25", "--config.training.eval_freq=30",
    "--config.training.snapshot_sampling=False", "--noprogress",
]


def _start(workdir):
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, str(REPO / "main.py"), *TOY, f"--workdir={workdir}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _checkpoint_files(workdir):
    return [p for d in (checkpoints.META_DIR, checkpoints.SNAPSHOT_DIR)
            if (workdir / d).is_dir() for p in sorted((workdir / d).iterdir())]


def _assert_every_checkpoint_loads(workdir):
    for path in _checkpoint_files(workdir):
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue  # a killed writer's temporary: never read, removed on restart
        ckpt = safe_load(path)  # raises on a partial file
        validation.validate_training_checkpoint(ckpt, path)


def _assert_bitwise_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{k}]")
    else:
        assert a == b, where


def _race_until(process, meta, step):
    """Read the checkpoint while ``process`` writes it (a reader never sees a partial file)
    until it records ``step`` or the process ends; returns the number of reads."""
    reads = 0
    while process.poll() is None:
        ckpt = safe_load(meta)
        reads += 1
        assert isinstance(ckpt["step"], int)
        if ckpt["step"] >= step:
            break
    return reads


def test_sigkill_at_random_points_then_restart_is_bitwise_equal(tmp_path):
    """Kills at random steps (and at a random point within the step: during its computation or
    its checkpoint write), then a restart that runs to the end: every checkpoint file loads at
    every moment, and the run ends bitwise equal to an uninterrupted one (trained in this
    process from the killed run's own resolved config.json, which equals a main.py run)."""
    rng = random.Random(int(os.environ.get("KILL_SEED", "2026")))
    killed = tmp_path / "b"
    meta = checkpoints.meta_path(killed)
    kills, reads = 0, 0
    for _ in range(3):
        process = _start(killed)
        start = meta.stat().st_mtime if meta.exists() else None
        while process.poll() is None and (not meta.exists() or meta.stat().st_mtime == start):
            time.sleep(0.005)  # wait until this process trains (writes a checkpoint)
        now = safe_load(meta)["step"]
        reads += _race_until(process, meta, rng.randint(now + 1, now + max(1, int(
            0.8 * (STEPS - now)))))
        deadline = time.perf_counter() + rng.uniform(0.0, 0.03)  # a step takes ~10 ms
        while time.perf_counter() < deadline and process.poll() is None:
            reads += _race_until(process, meta, 0)  # one read
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stderr.close()
        kills += 1
        _assert_every_checkpoint_loads(killed)
        print(f"killed at step {safe_load(meta)['step']} of {STEPS}")
        if kills == 2:
            break
    assert kills >= 1 and reads > 0
    process = _start(killed)  # the final restart runs to the end
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()[-3000:]
    _assert_every_checkpoint_loads(killed)
    assert not [p for p in _checkpoint_files(killed) if p.name.endswith(".tmp")]

    config = ml_collections.ConfigDict(json.loads((killed / "config.json").read_text()))
    torch.manual_seed(config.seed)  # as main.py
    train(config, tmp_path / "a", progress=False)
    final_a = torch.load(checkpoints.meta_path(tmp_path / "a"), weights_only=True)
    final_b = torch.load(meta, weights_only=True)
    assert final_b["step"] == STEPS
    _assert_bitwise_equal(final_a, final_b, "checkpoint")
    snapshots_a, snapshots_b = (checkpoints.list_snapshots(w) for w in (tmp_path / "a", killed))
    assert [n for n, _ in snapshots_a] == [n for n, _ in snapshots_b] == [1, 2, 3, 4]
    for (n, a), (_, b) in zip(snapshots_a, snapshots_b):
        _assert_bitwise_equal(torch.load(a, weights_only=True), torch.load(b, weights_only=True),
                              f"snapshot {n}")


# -- non-finite guard -----------------------------------------------------------------------------


def _tiny(n_iters=6, **training):
    config = importlib.import_module("configs.toy_2d").get_config()
    config.device = "cpu"
    config.model.nf = 8
    config.data.num_samples = 128
    t = config.training
    t.n_iters, t.batch_size, t.snapshot_sampling = n_iters, 16, False
    t.snapshot_freq, t.snapshot_freq_for_preemption, t.log_freq, t.eval_freq = 100, 2, 4, 100
    for key, value in training.items():
        t[key] = value
    return config


def _poison_batch(monkeypatch, at_batch):
    """The ``at_batch``-th training batch (1-based) holds a NaN."""
    _poison(monkeypatch, lambda n: n == at_batch)


def _poison(monkeypatch, bad):
    """Training batch n (1-based) holds a NaN where ``bad(n)``."""
    real_build = loop.build

    def build(config, *args, **kwargs):
        state, sde = real_build(config, *args, **kwargs)
        iterator, count = state["iterators"]["train"], [0]

        class Poisoned:
            def __next__(self):
                count[0] += 1
                batch = next(iterator)
                if bad(count[0]):
                    batch = batch.clone()
                    batch[0, 0] = float("nan")
                return batch

            def state_dict(self):
                return iterator.state_dict()

            def load_state_dict(self, s):
                iterator.load_state_dict(s)

            def close(self):
                iterator.close()

        state["iterators"]["train"] = Poisoned()
        return state, sde

    monkeypatch.setattr(loop, "build", build)


def _assert_finite_checkpoint(path, step):
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == step
    for section in ("model", "ema", "optimizer"):
        for name, value in _leaves(ckpt[section]):
            if value.is_floating_point():
                assert torch.isfinite(value).all(), (section, name)


def _leaves(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for k, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}[{k}]")


def test_a_nan_in_the_data_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    _poison_batch(monkeypatch, at_batch=3)
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 3;"):
        train(_tiny(), tmp_path, progress=False)
    # checked at step 4 (log and checkpoint): the step-4 checkpoint was never written
    _assert_finite_checkpoint(checkpoints.meta_path(tmp_path), 2)
    assert not checkpoints.list_snapshots(tmp_path)


def test_an_infinite_gradient_with_a_finite_loss_stops_the_run(tmp_path, monkeypatch):
    real_build = loop.build

    def build(config, *args, **kwargs):
        state, sde = real_build(config, *args, **kwargs)
        weight = next(state["model"].parameters())
        weight.register_hook(lambda g: g.clone().fill_(float("inf")) if state["step"] == 4 else g)
        return state, sde

    monkeypatch.setattr(loop, "build", build)
    with pytest.raises(FloatingPointError, match="at step 5;"):
        train(_tiny(8), tmp_path, progress=False)
    _assert_finite_checkpoint(checkpoints.meta_path(tmp_path), 4)


def test_skip_nonfinite_skips_the_step_and_finishes(tmp_path, monkeypatch, caplog):
    _poison_batch(monkeypatch, at_batch=3)
    with caplog.at_level("WARNING"):
        state = train(_tiny(skip_nonfinite=True), tmp_path, progress=False)
    assert "step 3: non-finite gradient, step skipped (1 so far)" in caplog.text
    assert state["step"] == 6
    _assert_finite_checkpoint(checkpoints.meta_path(tmp_path), 6)


def _poison_from(monkeypatch, first_batch):
    """Every training batch from the ``first_batch``-th (1-based) on holds a NaN."""
    _poison(monkeypatch, lambda n: n >= first_batch)


def test_skipping_stops_once_too_many_recent_steps_were_skipped(tmp_path, monkeypatch):
    _poison_from(monkeypatch, first_batch=3)  # steps 3, 4, ... are skipped
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step 12; the "
                       r"run stopped before writing a checkpoint of it \(10 of the last 12 steps "
                       r"were skipped, more than config.training.max_skip_fraction=0.01\)"):
        train(_tiny(40, skip_nonfinite=True), tmp_path, progress=False)
    _assert_finite_checkpoint(checkpoints.meta_path(tmp_path), 10)  # the last even step


def _guarded_optimizer(max_skip_fraction):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    state = {"step": 0}
    NonFiniteGuard("cpu", skip=True, max_skip_fraction=max_skip_fraction).protect(
        optimizer, state)

    def take(bad):
        param.grad = torch.full((1,), float("nan") if bad else 1.0)
        optimizer.step()
        state["step"] += 1

    return take, param


def test_the_skip_cap_counts_the_last_1000_steps_and_at_least_10_skips():
    take, param = _guarded_optimizer(0.01)
    for _ in range(990):
        take(False)
    for _ in range(10):  # 10 of the last 1000: not more than 1%
        take(True)
    with pytest.raises(FloatingPointError, match="at step 1001;.*11 of the last 1000 steps"):
        take(True)  # the window dropped a good step: 11 of 1000
    assert float(param.detach()) == pytest.approx(-0.1 * 990, rel=1e-4)  # skips: no update

    take, _ = _guarded_optimizer(0.01)
    for _ in range(9):  # 9 of 9 steps: fewer than 10 skips never stop a run
        take(True)
    with pytest.raises(FloatingPointError, match="at step 10;.*10 of the last 10 steps"):
        take(True)

    take, _ = _guarded_optimizer(1.0)  # a fraction of 1 never stops
    for _ in range(20):
        take(True)


def test_max_skip_fraction_is_validated():
    config = _tiny(skip_nonfinite=True, max_skip_fraction=1.5)
    with pytest.raises(ValueError, match=r"config.training.max_skip_fraction must be a number in "
                                         r"\[0.0, 1.0\], got 1.5"):
        validation.validate_config(config)


def test_a_non_finite_state_is_never_written(tmp_path):
    state = train(_tiny(2), tmp_path, progress=False)
    path = checkpoints.meta_path(tmp_path)
    before = path.read_bytes()
    with torch.no_grad():
        next(state["model"].parameters())[0] = float("inf")
    with pytest.raises(FloatingPointError, match="refusing to write a checkpoint at step 2: "
                                                 "model entry '.*' has non-finite values"):
        checkpoints.save_checkpoint(path, state)
    assert path.read_bytes() == before


# -- a full disk ----------------------------------------------------------------------------------


def _full_disk_fdopen(real_fdopen):
    """``os.fdopen`` whose files write half of the data, then fail with ENOSPC."""

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)

        class FullDisk:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                f.write(bytes(memoryview(data)[: len(data) // 2]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def flush(self):
                f.flush()

            def fileno(self):
                return f.fileno()

        return FullDisk()

    return fdopen


def test_a_full_disk_keeps_the_previous_checkpoint_and_ends_clearly(tmp_path, monkeypatch):
    config = _tiny(8, snapshot_freq_for_preemption=1)
    torch.manual_seed(0)
    uninterrupted = train(config, tmp_path / "a", progress=False)
    saved = {}

    def fill_the_disk(state):
        if state["step"] == 3:
            saved["bytes"] = checkpoints.meta_path(tmp_path / "b").read_bytes()
            monkeypatch.setattr(utils.io.os, "fdopen", _full_disk_fdopen(os.fdopen))

    torch.manual_seed(0)
    with pytest.raises(CheckpointWriteError) as info:
        train(config, tmp_path / "b", hooks=[fill_the_disk], progress=False)
    message = str(info.value)
    assert "cannot write the checkpoint of step 4" in message
    assert "No space left on device" in message and "is intact" in message
    assert info.value.errno == errno.ENOSPC
    meta = checkpoints.meta_path(tmp_path / "b")
    assert meta.read_bytes() == saved["bytes"]  # the previous checkpoint, untouched
    assert safe_load(meta)["step"] == 3
    assert not [p for p in _checkpoint_files(tmp_path / "b") if p.name.endswith(".tmp")]

    monkeypatch.undo()  # space freed
    resumed = train(config, tmp_path / "b", progress=False)  # space freed: resume from step 3
    for a, b in zip(uninterrupted["model"].state_dict().values(),
                    resumed["model"].state_dict().values()):
        assert torch.equal(a, b)

