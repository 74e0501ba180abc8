"""The CLI end to end on tiny configs (train, sample, likelihood), its errors, and bitwise resume
from the preemption checkpoint."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from score_sde.cli import resolve_config_path
from score_sde.training import checkpoints
from score_sde.training.inference import find_checkpoint
from score_sde.training.loop import train

TINY_DIGITS = [  # a tiny DDPM++ on the 8x8 digits: a few steps, a few samples
    "--config=digits", "--config.model.nf=8", "--config.training.n_iters=4",
    "--config.training.batch_size=8", "--config.training.snapshot_freq=2",
    "--config.training.snapshot_freq_for_preemption=2", "--config.training.log_freq=2",
    "--config.training.eval_freq=2", "--config.sampling.nfe=4", "--config.eval.batch_size=8",
    "--config.eval.rtol=1e-2", "--config.eval.atol=1e-2",
]
TINY_TOY = [
    "--config=toy_2d", "--config.model.nf=16", "--config.training.n_iters=3",
    "--config.training.batch_size=32", "--config.training.snapshot_freq=3",
    "--config.data.num_samples=256", "--config.sampling.nfe=4", "--config.eval.batch_size=64",
]


def run_main(*args, check=True, progress=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    flags = [] if progress else ["--noprogress"]
    result = subprocess.run([sys.executable, str(REPO / "main.py"), *flags, *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"main.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def _check_training_outputs(workdir):
    config = json.loads((workdir / "config.json").read_text())
    assert config["device"] == "cpu"
    t = config["training"]
    assert torch.load(checkpoints.meta_path(workdir), weights_only=True)["step"] == t["n_iters"]
    assert [n for n, _ in checkpoints.list_snapshots(workdir)] == list(
        range(1, t["n_iters"] // t["snapshot_freq"] + 1))
    assert (workdir / "samples" / f"iter_{t['n_iters']}" / "sample.png").is_file()
    assert list((workdir / "tensorboard").iterdir()) and (workdir / "stdout.txt").is_file()
    return t["n_iters"]


def _check_likelihood_outputs(folder, step, n):
    record = json.loads((folder / f"likelihood_test_step_{step}.json").read_text())
    bpd = np.load(folder / f"likelihood_test_step_{step}.npz")["bpd"]
    assert bpd.shape == (n,) and np.isfinite(bpd).all()
    assert record["num_images"] == n and record["bpd"] == pytest.approx(bpd.mean())


#: The shared digits run: 2 steps, one numbered snapshot (with its sample grid) at step 2.
DIGITS_RUN = [*TINY_DIGITS, "--config.training.n_iters=2"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One tiny digits training through main.py, shared by the tests that read its log and
    outputs or sample from it (each main.py start costs seconds of imports): (workdir, result).
    Run with the progress flag on; stderr is a pipe, so the bar is off."""
    workdir = tmp_path_factory.mktemp("digits") / "run"
    return workdir, run_main(*DIGITS_RUN, f"--workdir={workdir}", progress=True)


def test_digits_train_sample_likelihood(digits_run):
    """Training outputs; the default sampler's samples; the likelihood's per-image bits/dim and
    a record holding the resolved options, the counted NFE, step, seed and device."""
    workdir, _ = digits_run
    step = _check_training_outputs(workdir)
    run_main(*DIGITS_RUN, f"--workdir={workdir}", "--mode=sample", "--num_samples=6")
    folder = workdir / "eval" / f"samples_step_{step}"
    samples = np.load(folder / "sample.npz")["samples"]
    assert samples.shape == (6, 8, 8, 1) and samples.dtype == np.uint8
    assert Image.open(folder / "sample.png").size[0] >= 256
    assert json.loads((folder / "info.json").read_text())["nfe"] == 4
    run_main(*DIGITS_RUN, f"--workdir={workdir}", "--mode=likelihood", "--max_images=5",
             "--split=test", "--eval_folder=bpd")
    _check_likelihood_outputs(workdir / "bpd", step, 5)
    record = json.loads((workdir / "bpd" / f"likelihood_test_step_{step}.json").read_text())
    assert record["likelihood"]["rtol"] == record["likelihood"]["atol"] == 1e-2
    assert record["likelihood"]["divergence"] == "rademacher" and record["nfe"] > 0
    assert (record["step"], record["seed"], record["device"]) == (2, 42, "cpu")


def test_toy_train_sample_from_a_chosen_snapshot_likelihood(tmp_path):
    workdir = tmp_path / "run"
    run_main(*TINY_TOY, f"--workdir={workdir}", "--config.training.snapshot_freq=1")
    step = _check_training_outputs(workdir)
    by_path = ["--config=configs/toy_2d.py", *TINY_TOY[1:]]  # the same config by its path
    run_main(*by_path, f"--workdir={workdir}", "--mode=sample", "--checkpoint=2",
             "--num_samples=3")
    samples = np.load(workdir / "eval" / "samples_step_2" / "sample.npz")["samples"]
    assert samples.shape == (3, 2) and np.isfinite(samples).all()
    # the error --checkpoint=9 ends with (main.py's one-line exit for it: the slow test below,
    # and for every FileNotFoundError of a reader: test_a_refused_run_leaves_no_workdir)
    with pytest.raises(FileNotFoundError, match=r"checkpoint '9' not found.*1, 2, 3"):
        find_checkpoint(workdir, "9")
    run_main(*TINY_TOY, f"--workdir={workdir}", "--mode=likelihood", "--max_images=5")
    _check_likelihood_outputs(workdir / "eval", step, 5)


@pytest.mark.slow
def test_sampling_a_missing_snapshot_ends_naming_the_available_ones(tmp_path):
    run_main(*TINY_TOY, f"--workdir={tmp_path}", "--config.training.snapshot_freq=1")
    missing = run_main(*TINY_TOY, f"--workdir={tmp_path}", "--mode=sample", "--checkpoint=9",
                       check=False)
    assert missing.returncode != 0
    assert "checkpoint '9' not found" in missing.stderr and "1, 2, 3" in missing.stderr


def test_training_starts_with_a_block_and_logs_clean_lines_and_tensorboard_images(digits_run):
    """Before step 1 the log says device, threads, parameters, data and workdir; with stderr
    not a terminal the bar is off, so neither stdout.txt nor stderr holds a carriage return;
    the snapshot grid is a TensorBoard image of the PNG's size at its step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, result = digits_run
    log = (workdir / "stdout.txt").read_text()
    assert "\r" not in log and "\r" not in result.stderr
    start = log[:log.index("step: 1") if "step: 1" in log else log.index("step: 2")]
    assert "on cpu, torch threads: 1" in start
    ema = torch.load(checkpoints.meta_path(workdir), weights_only=True)["ema"]
    params = sum(p.numel() for p in ema["shadow_params"])  # one shadow per parameter
    assert f"{params:,} parameters" in start
    assert "1500 train / 297 eval examples: 1500 images of shape (1, 8, 8)" in start
    assert f"workdir {workdir.resolve()}" in start and "starting at step 0" in start
    png = Image.open(workdir / "samples" / "iter_2" / "sample.png")
    events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("samples")
    assert (image.step, image.width, image.height) == (2, *png.size)
    assert image.encoded_image_string == (workdir / "samples" / "iter_2" / "sample.png"
                                          ).read_bytes()
    assert {"training_loss", "eval_loss"} <= set(events.Tags()["scalars"])


def test_log_lines_are_written_above_the_progress_bar(monkeypatch):
    """On a terminal each log line clears the bar's line first and the bar is redrawn after."""
    import io
    import logging

    from tqdm import tqdm

    from score_sde.cli import TerminalLogHandler

    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    bar = tqdm(total=3, file=sys.stderr, ncols=60, mininterval=0, desc="train")
    bar.update(1)
    TerminalLogHandler().handle(logging.makeLogRecord(
        {"msg": "step: 1, loss 0.5", "levelno": logging.INFO, "levelname": "INFO"}))
    bar.close()
    before, line, after = stderr.getvalue().partition("step: 1, loss 0.5\n")
    assert line and "1/3" in before and "1/3" in after  # the bar before and redrawn after
    assert before.rsplit("\r", 1)[1].startswith("I")  # the line starts at column 0


def test_a_refused_run_leaves_no_workdir(tmp_path):
    """A run that fails validation (a corrupt CIFAR-10 tarball) and sample / likelihood / eval
    on a workdir that does not exist create nothing and name the workdir."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")  # no download attempt
    workdir = tmp_path / "run"
    cifar = run_main("--config=ddpm_cifar", f"--config.data.root={root}", f"--workdir={workdir}",
                     check=False)
    assert cifar.returncode != 0 and "CIFAR-10" in cifar.stderr and "corrupt" in cifar.stderr
    assert not workdir.exists()
    _assert_a_reader_leaves_no_workdir(workdir, "sample")


def _assert_a_reader_leaves_no_workdir(workdir, mode):
    result = run_main(*TINY_DIGITS, f"--workdir={workdir}", f"--mode={mode}", check=False)
    assert result.returncode != 0 and f"--workdir {workdir} does not exist" in result.stderr
    assert not workdir.exists()


@pytest.mark.slow  # the same check (cli.check_inputs) as --mode sample, in the test above
@pytest.mark.parametrize("mode", ["likelihood", "eval"])
def test_likelihood_or_eval_on_a_missing_workdir_leaves_no_workdir(tmp_path, mode):
    _assert_a_reader_leaves_no_workdir(tmp_path / "run", mode)


def test_cli_errors_are_clear(tmp_path):
    typo = run_main("--config=digits", f"--workdir={tmp_path}", "--config.training.batch_sise=4",
                    check=False)
    assert typo.returncode != 0
    assert "unknown config key 'batch_sise'" in typo.stderr and "'batch_size'" in typo.stderr
    # an unknown config name: the error --config ends with (main.py's exit: the slow test below;
    # a flag error's exit is the misspelt key's above)
    with pytest.raises(ValueError, match="Unknown config 'vp_cifa'; valid: ddpm_cifar, digits"):
        resolve_config_path("vp_cifa")
    evaluate = run_main("--config=digits", f"--workdir={tmp_path}", "--mode=eval", check=False)
    assert evaluate.returncode != 0 and "no checkpoint checkpoints/checkpoint_" in evaluate.stderr
    assert str(tmp_path) in evaluate.stderr and not any(tmp_path.iterdir())  # nothing created
    helptext = run_main("--helpshort", check=False).stdout
    for flag in ("--config", "--workdir", "--mode", "--eval_folder", "--checkpoint"):
        assert flag in helptext


@pytest.mark.slow
def test_an_unknown_config_name_ends_the_cli_listing_the_valid_ones(tmp_path):
    unknown = run_main("--config=vp_cifa", f"--workdir={tmp_path}", check=False)
    assert unknown.returncode != 0
    assert "Unknown config 'vp_cifa'; valid: ddpm_cifar, digits" in unknown.stderr


def _tiny_config(n_iters, num_classes=0):
    config = importlib.import_module("configs.digits").get_config()
    config.device = "cpu"
    config.model.nf = 8
    config.model.num_classes = num_classes  # > 0: class-conditional (labels from the data)
    config.model.dropout = 0.1  # exercises torch's global RNG (saved in the checkpoint)
    t = config.training
    t.n_iters, t.batch_size, t.snapshot_sampling = n_iters, 8, False
    t.snapshot_freq, t.snapshot_freq_for_preemption, t.log_freq, t.eval_freq = 100, 3, 1, 2
    return config


class Preempted(Exception):
    pass


def _preempt_at(step):
    def hook(state):
        if state["step"] == step:
            raise Preempted

    return hook


@pytest.mark.parametrize("num_classes", [0, 10], ids=["unconditional", "class-conditional"])
def test_resume_from_the_preemption_checkpoint_is_bitwise_equal(tmp_path, num_classes):
    torch.manual_seed(0)
    uninterrupted = train(_tiny_config(7, num_classes), tmp_path / "a", progress=False)

    torch.manual_seed(0)
    with pytest.raises(Preempted):
        train(_tiny_config(7, num_classes), tmp_path / "b", hooks=[_preempt_at(5)],
              progress=False)
    assert torch.load(checkpoints.meta_path(tmp_path / "b"), weights_only=True)["step"] == 3
    steps_seen = []
    torch.manual_seed(123)  # a restart does not reproduce the seed: the checkpoint must
    resumed = train(_tiny_config(7, num_classes), tmp_path / "b", progress=False,
                    hooks=[lambda state: steps_seen.append(state["step"])])
    assert steps_seen == [4, 5, 6, 7]
    for a, b in zip(uninterrupted["model"].state_dict().values(),
                    resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(uninterrupted["ema"].shadow_params, resumed["ema"].shadow_params):
        assert torch.equal(a, b)
    opt_a, opt_b = (s["optimizer"].state_dict()["state"] for s in (uninterrupted, resumed))
    for k in opt_a:
        assert all(torch.equal(opt_a[k][n], opt_b[k][n]) for n in opt_a[k])
    assert torch.equal(uninterrupted["generators"]["train"].get_state(),
                       resumed["generators"]["train"].get_state())
    assert all(uninterrupted["iterators"][n].state_dict() == resumed["iterators"][n].state_dict()
               for n in ("train", "eval"))
    if num_classes:  # the data's labels reached the network, never the null label (row 10)
        from models.utils import create_model

        torch.manual_seed(0)
        fresh = create_model(_tiny_config(7, num_classes)).label_embedding.weight.detach()
        trained = resumed["model"].label_embedding.weight.detach()
        assert torch.equal(trained[10], fresh[10])
        assert (trained[:10] - fresh[:10]).abs().amax(dim=1).min() > 0


def test_checkpoints_are_weights_only_and_atomic(tmp_path, monkeypatch):
    state = train(_tiny_config(3), tmp_path, progress=False)
    path = checkpoints.meta_path(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"model", "ema", "optimizer", "step", "rng", "data"}
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        checkpoints.save_checkpoint(path, state)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_a_resumed_run_reports_config_changes(tmp_path, caplog):
    train(_tiny_config(2), tmp_path, progress=False)
    with caplog.at_level("WARNING"):
        state = train(_tiny_config(3), tmp_path, progress=False)
    assert state["step"] == 3
    assert "training.n_iters (2 -> 3)" in caplog.text
    assert json.loads((tmp_path / "config.json").read_text())["training"]["n_iters"] == 3


def test_make_grid_tiles_images_row_major_with_padding():
    from score_sde.training.images import make_grid

    images = torch.zeros(5, 1, 2, 3)
    for k in range(5):
        images[k] = k / 4
    grid = make_grid(images, nrow=3, padding=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1) and grid.dtype == np.uint8
    for k in range(5):
        r, c = divmod(k, 3)
        block = grid[1 + r * 3: 3 + r * 3, 1 + c * 4: 4 + c * 4, 0]
        assert (block == round(k / 4 * 255)).all()
    assert grid[0].max() == 0 and grid[:, 0].max() == 0  # padding is black
    assert make_grid(images, nrow=3, padding=1, scale=2).shape == (14, 26, 1)


def test_a_non_finite_loss_stops_the_run_before_any_checkpoint_of_it(tmp_path, monkeypatch):

    from score_sde import training
    real = training.loop.get_step_fns

    def nan_at_step_2(config, sde, *args):
        train_step, eval_step = real(config, sde, *args)

        def step(state, batch, generator=None):
            loss = train_step(state, batch, generator=generator)
            return loss * float("nan") if state["step"] == 2 else loss

        return step, eval_step

    monkeypatch.setattr(training.loop, "get_step_fns", nan_at_step_2)
    config = _tiny_config(4)
    config.training.snapshot_freq_for_preemption = config.training.log_freq = 1
    with pytest.raises(FloatingPointError, match="step 2"):
        train(config, tmp_path, progress=False)
    assert torch.load(checkpoints.meta_path(tmp_path), weights_only=True)["step"] == 1


def test_sampling_from_a_reference_checkpoint(tmp_path, reference_dir):
    """The reference's own training checkpoint (``module.`` prefix, numpy learning rate) loads
    weights-only, and its EMA weights give the reference's ``score_ema``."""
    import safetensors.torch

    from models.utils import get_score_fn
    from score_sde.training.inference import load_ema_model, run_sample
    from score_sde.training.sampling import get_sde

    record = json.loads((reference_dir / "ncsnpp_ve.json").read_text())
    config = importlib.import_module("configs.ve.cifar10_ncsnpp_continuous").get_config()
    for key, change in record["overrides"].items():
        section, field = key.split(".")
        config[section][field] = change["fixture"]
    config.device = "cpu"
    path = reference_dir / "ncsnpp_ve_checkpoint.pth"
    model, step = load_ema_model(config, path)
    io = safetensors.torch.load_file(reference_dir / "ncsnpp_ve_checkpoint_io.safetensors")
    score = get_score_fn(get_sde(config), model, continuous=True)(io["x"], io["t"])
    assert step == 2
    assert (score - io["score_ema"]).abs().max() <= 2e-5 * io["score_ema"].abs().max()

    config.sampling.N = 3  # a PCSampler option, picked up from config.sampling by name
    folder = run_sample(config, tmp_path, checkpoint=str(path), num_samples=2, progress=False)
    assert np.load(folder / "sample.npz")["samples"].shape == (2, 16, 16, 3)
    assert json.loads((folder / "info.json").read_text())["nfe"] == 3 * 2


def test_sampler_swaps_on_digits_and_records_that_say_what_ran(tmp_path, digits_run):
    """The README's pc / ode / fast-sampler swaps work on ``digits`` as written, and each
    ``info.json`` holds the counted NFE, every option as it ran, what the method ignored, the
    checkpoint step, seed, device and versions (the likelihood record's: in
    test_digits_train_sample_likelihood, on the same run)."""
    workdir, _ = digits_run
    tiny = [*DIGITS_RUN, f"--workdir={workdir}"]
    swaps = {
        "pc": (["--config.sampling.method=pc", "--config.sampling.predictor=reverse_diffusion",
                "--config.sampling.corrector=langevin", "--config.sampling.N=5"],
               5 * (1 + 1), {"N": 5, "predictor": "reverse_diffusion", "corrector": "langevin",
                             "n_steps": 1, "snr": 0.16, "step_rule": "batch"}),
        "ode": (["--config.sampling.method=ode", "--config.sampling.solver=euler",
                 "--config.sampling.steps=3"],
                3 + 1, {"solver": "euler", "steps": 3, "denoise": True}),  # + noise_removal
        "ddim": (["--config.sampling.method=ddim", "--config.sampling.eta=1.0"],
                 4, {"eta": 1.0, "nfe": 4, "grid": "logsnr"}),
    }
    for method, (flags, nfe, options) in swaps.items():
        folder = tmp_path / method
        run_main(*tiny, *flags, "--mode=sample", "--num_samples=2", f"--eval_folder={folder}")
        record = json.loads((folder / "samples_step_2" / "info.json").read_text())
        assert record["nfe"] == record["sampling"]["nfe"] == nfe, method
        assert record["sampling"]["method"] == method
        assert options.items() <= record["sampling"]["options"].items(), record["sampling"]
        assert (record["step"], record["seed"], record["device"]) == (2, 42, "cpu")
        assert record["versions"]["torch"] == torch.__version__
        if method != "pc":  # the digits config's PC keys are set, but not applied
            assert record["sampling"]["not_applied"]["predictor"] == "euler_maruyama"
        else:
            assert record["sampling"]["not_applied"] == {"nfe": 4}
