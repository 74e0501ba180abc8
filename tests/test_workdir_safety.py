"""Safety of a training workdir: one writer at a time (the workdir lock), a snapshot killed
mid-write is redone on resume, and every output file is atomic with a one-line error on a full
disk (config.json, samples, likelihood records, TensorBoard)."""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import REPO

from models.checkpoint import safe_load
from score_sde.training import checkpoints, distributed
from score_sde.training import lock as lock_module
from score_sde.training.inference import write_likelihood_record
from score_sde.training.lock import WorkdirLock, WorkdirLockedError
from score_sde.training.loop import train, write_config, write_samples
from score_sde.utils import WriteError

TOY = [  # a tiny MLP on 2-D points: a step takes about a millisecond
    "--config=toy_2d", "--config.model.nf=8", "--config.training.batch_size=16",
    "--config.data.num_samples=128", "--config.training.log_freq=2",
    "--config.training.eval_freq=1000", "--config.sampling.nfe=2", "--noprogress",
]
FULL_DISK = (  # python -c prelude: os.replace fails with ENOSPC for files named in sys.argv[1]
    "import errno, os, sys\n"
    "names, sys.argv = sys.argv[1].split(','), ['main.py', *sys.argv[2:]]\n"
    "real = os.replace\n"
    "def replace(src, dst):\n"
    "    if os.path.basename(dst) in names:\n"
    "        {action}\n"
    "    return real(src, dst)\n"
    "os.replace = replace\n"
    "import runpy\n"
    "runpy.run_path('main.py', run_name='__main__')\n"
)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _main(*args, prelude=None, names=""):
    command = [sys.executable, "-c", prelude, names] if prelude else [
        sys.executable, str(REPO / "main.py")]
    return subprocess.run([*command, *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)


def _temporaries(folder):
    return [p for p in folder.rglob("*.tmp")]


def _toy_config(n_iters=2):
    config = importlib.import_module("configs.toy_2d").get_config()
    config.device = "cpu"
    config.model.nf, config.data.num_samples = 8, 128
    t = config.training
    t.n_iters, t.batch_size, t.snapshot_sampling = n_iters, 16, False
    t.snapshot_freq = t.snapshot_freq_for_preemption = t.log_freq = t.eval_freq = 100
    return config



# -- one writer per workdir -----------------------------------------------------------------------


def test_a_second_trainer_is_refused_while_the_first_runs_and_accepted_once_it_is_killed(
        tmp_path):
    workdir = tmp_path / "run"
    long_run = [*TOY, "--config.training.n_iters=1000000", "--config.training.snapshot_freq=500000",
                "--config.training.snapshot_freq_for_preemption=1", f"--workdir={workdir}"]
    # the first run writes its step-1 checkpoint, then waits (holding the lock) until killed:
    # a live trainer that leaves the CPU to the second one
    hold = FULL_DISK.format(action="real(src, dst)\n        __import__('time').sleep(600)")
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen([sys.executable, "-c", hold, checkpoints.META_FILE, *long_run],
                                 cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=log)
    try:
        meta = checkpoints.meta_path(workdir)
        while not meta.exists() and first.poll() is None:
            time.sleep(0.01)  # the first run trains (holds the lock) once it wrote a checkpoint
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        second = _main(*long_run[:-1], "--config.training.n_iters=7", f"--workdir={workdir}")
        assert second.returncode == 1
        last_line = second.stderr.strip().splitlines()[-1]
        assert "is in use by another training run" in last_line
        assert f"PID {first.pid} on host {socket.gethostname()}" in last_line
        assert "Traceback" not in second.stderr
        config = json.loads((workdir / "config.json").read_text())
        assert config["training"]["n_iters"] == 1000000  # the live run's config, untouched
    finally:
        first.send_signal(signal.SIGKILL)  # the OS releases its lock
        first.wait(timeout=30)
    step = safe_load(checkpoints.meta_path(workdir))["step"]
    third = _main(*long_run[:-1], f"--config.training.n_iters={step + 2}",
                  f"--workdir={workdir}")
    assert third.returncode == 0, third.stderr[-3000:]
    assert safe_load(checkpoints.meta_path(workdir))["step"] == step + 2
    assert json.loads((workdir / "config.json").read_text())["training"]["n_iters"] == step + 2


def test_the_lock_names_its_holder_and_is_free_again_once_released(tmp_path):
    holder = WorkdirLock(tmp_path).acquire()
    assert holder.held and (tmp_path / lock_module.LOCK_FILE).is_file()
    with pytest.raises(WorkdirLockedError,
                       match=f"in use by another training run \\(PID {os.getpid()} on host "):
        WorkdirLock(tmp_path).acquire()
    with pytest.raises(WorkdirLockedError):  # train() refuses before writing anything
        train(_toy_config(), tmp_path, progress=False)
    assert not (tmp_path / "config.json").exists()
    holder.release()
    assert train(_toy_config(), tmp_path, progress=False)["step"] == 2
    with WorkdirLock(tmp_path) as again:  # train() released it
        assert again.held


def test_a_file_system_without_locks_warns_once_and_goes_on(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock_module.fcntl, "flock", no_locks)
    monkeypatch.setattr(lock_module, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=lock_module.__name__):
        first, second = WorkdirLock(tmp_path).acquire(), WorkdirLock(tmp_path).acquire()
    assert not first.held and not second.held
    warnings = [r for r in caplog.records if "does not support locks" in r.getMessage()]
    assert len(warnings) == 1 and "No locks available" in warnings[0].getMessage()


# -- a snapshot killed mid-write ------------------------------------------------------------------


def test_a_kill_during_the_final_snapshot_is_redone_on_resume(tmp_path):
    """SIGKILL when the last numbered checkpoint is renamed into place: the preemption
    checkpoint of that step must not exist yet, so the rerun redoes the step and writes the
    numbered checkpoint and its sample grid."""
    workdir = tmp_path / "run"
    args = [*TOY, "--config.training.n_iters=6", "--config.training.snapshot_freq=3",
            "--config.training.snapshot_freq_for_preemption=2",
            "--config.training.snapshot_sampling=True", f"--workdir={workdir}"]
    kill = FULL_DISK.format(action="os.kill(os.getpid(), 9)")
    killed = _main(*args, prelude=kill, names="checkpoint_2.pth")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [n for n, _ in checkpoints.list_snapshots(workdir)] == [1]
    assert safe_load(checkpoints.meta_path(workdir))["step"] == 4  # step 6 is not marked done

    rerun = _main(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    snapshots = dict(checkpoints.list_snapshots(workdir))
    assert sorted(snapshots) == [1, 2]
    final = torch.load(snapshots[2], weights_only=True)
    meta = torch.load(checkpoints.meta_path(workdir), weights_only=True)
    assert final["step"] == meta["step"] == 6
    assert all(torch.equal(final["model"][k], meta["model"][k]) for k in meta["model"])
    for step in (3, 6):
        assert (workdir / "samples" / f"iter_{step}" / "sample.png").is_file()
        assert np.load(workdir / "samples" / f"iter_{step}" / "sample.npz")["samples"].shape \
            == (16, 2)
    assert not _temporaries(workdir)


# -- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def full_disk(monkeypatch):
    """``os.replace`` fails with ENOSPC (the temporary file was written in full)."""

    def replace(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", replace)


def _assert_one_line_enospc(error: WriteError, what: str):
    message = str(error)
    assert "\n" not in message and error.errno == errno.ENOSPC
    assert f"cannot write {what}" in message and "No space left on device" in message


def test_config_json_is_atomic_and_a_full_disk_keeps_the_old_one(tmp_path, full_disk):
    (tmp_path / "config.json").write_text('{"old": 1}\n')
    with pytest.raises(WriteError) as info:
        write_config(_toy_config(), tmp_path)
    _assert_one_line_enospc(info.value, "the resolved config")
    assert "is intact" in str(info.value)
    assert (tmp_path / "config.json").read_text() == '{"old": 1}\n'
    assert not _temporaries(tmp_path)


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (5, 2)], ids=["image grid", "2-D scatter"])
def test_samples_png_and_npz_are_atomic(tmp_path, monkeypatch, shape):
    x = torch.rand(shape)
    write_samples(x, tmp_path / "ok")
    assert (tmp_path / "ok" / "sample.png").stat().st_size > 0
    assert np.load(tmp_path / "ok" / "sample.npz")["samples"].shape[0] == shape[0]

    real = os.replace
    for name, what in (("sample.png", "a PNG image"), ("sample.npz", "the samples")):
        def replace(src, dst, name=name):
            if os.path.basename(dst) == name:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        folder = tmp_path / name
        with pytest.raises(WriteError) as info:
            write_samples(x, folder)
        _assert_one_line_enospc(info.value, what)
        assert not (folder / name).exists() and not _temporaries(folder)


def test_likelihood_records_are_atomic(tmp_path, full_disk):
    stem = tmp_path / "eval" / "likelihood_test_step_3"
    with pytest.raises(WriteError) as info:
        write_likelihood_record(stem, np.ones(3), np.zeros(3, np.int64), {"bpd": 1.0})
    _assert_one_line_enospc(info.value, "the per-image bits/dim")
    assert not stem.with_suffix(".npz").exists() and not stem.with_suffix(".json").exists()
    assert not _temporaries(tmp_path)


def test_a_full_disk_under_tensorboard_ends_with_one_line(tmp_path, monkeypatch):
    from tensorboard.summary.writer import record_writer

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    with pytest.raises(WriteError) as info:
        train(_toy_config(2), tmp_path, progress=False)
    _assert_one_line_enospc(info.value, "the TensorBoard events")
    assert str(tmp_path / "tensorboard") in str(info.value)
    assert not thread_errors  # caught in TensorBoard's writer thread, not printed there


class _FullDisk:
    """A file object on a full disk: every write fails with ENOSPC."""

    def __init__(self):
        self.writes = 0

    def write(self, text):
        self.writes += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        pass

    def close(self):
        pass


def test_a_full_disk_under_the_log_file_is_one_line_not_a_traceback_per_line(tmp_path, capsys):
    """stdout.txt is appended line by line: on ENOSPC one line on stderr names it, no
    'Logging error' traceback (logging's default, repeated for every later line), and the file
    is not written to again; the CLI logs to the file through this handler."""
    from score_sde import cli
    from score_sde.utils import LogFileHandler

    root = logging.getLogger()
    before = list(root.handlers)
    cli._log_to_file(tmp_path)
    try:
        (handler,) = [h for h in root.handlers if h not in before]
    finally:
        for h in root.handlers[len(before):]:
            root.removeHandler(h)
    assert isinstance(handler, LogFileHandler)
    assert handler.baseFilename == str(tmp_path / "stdout.txt")
    handler.stream, full = _FullDisk(), handler.stream
    full.close()
    log = logging.getLogger("test_workdir_safety.full_log")
    log.addHandler(handler)
    try:
        for step in range(3):
            log.warning("step %d", step)
    finally:
        log.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.splitlines() == [
        f"cannot write the log to {tmp_path / 'stdout.txt'}: No space left on device; later log "
        "lines go to the terminal only."]
    assert handler.failed and handler.stream.writes == 1


def test_the_cli_turns_a_full_disk_into_one_line(tmp_path):
    fail = FULL_DISK.format(action="raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))")
    result = _main(*TOY, "--config.training.n_iters=2", f"--workdir={tmp_path}",
                   prelude=fail, names="config.json")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert f"cannot write the resolved config to {tmp_path / 'config.json'}: No space left on " \
           "device; nothing was written." in last_line
    assert not (tmp_path / "config.json").exists() and not _temporaries(tmp_path)
