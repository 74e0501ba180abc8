"""Command line of the toolkit (the reference's ``main.py``): flags -> config -> dispatch.

Run as ``python main.py ...`` from a checkout or as ``score-sde ...`` (installed) from
anywhere; both call :func:`run`.

    python main.py --config digits --mode train --workdir runs/digits
    python main.py --config configs/vp/cifar10_ddpmpp_continuous.py --mode train \\
        --workdir runs/vp_cifar --config.training.batch_size=64
    python main.py --config digits --mode sample --workdir runs/digits
    python main.py --config digits --mode likelihood --workdir runs/digits
    python main.py --config digits --mode eval --workdir runs/digits
    python main.py --config digits_ae --mode train_autoencoder --workdir runs/ae
    python main.py --config digits_latent --mode train --workdir runs/latent
    python main.py --config digits_cascade --mode train --workdir runs/cascade
    python main.py --config digits_cascade --mode sample --workdir runs/cascade \\
        --low_res=runs/cascade/base/eval/samples_step_1000/sample.npz
    python main.py --config imagenet256_dit_xl2 --mode sample --workdir runs/dit \\
        --checkpoint /path/DiT-XL-2-256x256.pt --classes=207,360,387,974
    torchrun --standalone --nproc_per_node 4 main.py --config vp_cifar --workdir runs/vp_cifar

Under ``torchrun`` training is data-parallel (``training.distributed``): the global batch
``training.batch_size`` is split over the processes; rank 0 logs and writes checkpoints.

``--config`` takes a short name (see ``configs/registry.py``) or a config file path;
``--config.<section>.<key>=value`` overrides any existing key (a misspelt key is an error).

A cascade config (it has a ``cascade`` section, ``training.cascade``) runs every stage: train
trains each in ``<workdir>/<stage>/`` in turn, sample samples the base then each
super-resolution stage (``--low_res`` replaces the base's output); likelihood and eval take one
stage's config and workdir.

Output: log lines go to stderr and, once the run has passed validation, to
``<workdir>/stdout.txt`` (created then, with the workdir: a run refused at the door leaves
nothing behind). The tqdm bars are drawn only when stderr is a terminal; there every log line is
written above the bars (tqdm's ``external_write_mode``), so neither breaks the other. When stderr
is a file or a pipe (``2> log``, ``| tee``, a batch system) the bars are off: a redirected log
holds whole lines, not carriage-return redraws, and the ``training.log_freq`` lines report the
progress.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import torch
from absl import app, flags
from ml_collections import config_flags

import configs
from configs.registry import CONFIGS, module_path
from models.checkpoint import CheckpointError
from score_sde.utils import Registry

#: the folder holding the ``configs`` package (the repository, in a checkout)
REPO = Path(configs.__file__).resolve().parent.parent
FLAGS = flags.FLAGS
CONFIG_NAMES = Registry("config")
for _name, _module in CONFIGS.items():
    CONFIG_NAMES.register(_name)(_module)


class NamedConfigParser(flags.ArgumentParser):
    """Parses ``--config``: resolves a short name or path, then loads it with ml_collections'
    own config-file parser (``inner``)."""

    def __init__(self, inner: flags.ArgumentParser) -> None:
        self.inner = inner

    def parse(self, argument):
        """Load the config ``argument`` names (``name`` or ``file.py``, optionally ``:arg``)."""
        file, sep, arg = argument.partition(":")
        return self.inner.parse(str(resolve_config_path(file)) + sep + arg)

    def flag_type(self):
        """Shown in ``--help``."""
        return "config name or file"


def resolve_config_path(name_or_path: str) -> Path:
    """A config file from a short name (``vp_cifar``) or a path, relative to the working
    directory or the repository (``configs/vp/cifar10_ddpmpp_continuous.py``).

    Raises:
        ValueError: neither a known name nor an existing file (the message lists the names).
    """
    if name_or_path in CONFIG_NAMES:
        return REPO / module_path(name_or_path)
    path = Path(name_or_path)
    for candidate in (path, REPO / path):
        if candidate.suffix == ".py" and candidate.is_file():
            return candidate
    CONFIG_NAMES.get(name_or_path)  # raises "Unknown config ...; valid: ..."
    raise AssertionError("unreachable")


_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Experiment config: a short name (" + ", ".join(CONFIG_NAMES.names()) + ") or a config "
    "file such as configs/vp/cifar10_ddpmpp_continuous.py. Override any key with "
    "--config.<section>.<key>=value, e.g. --config.training.batch_size=64; unknown keys fail.",
    lock_config=True,
)
FLAGS["config"].parser = NamedConfigParser(FLAGS["config"].parser)
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, samples, TensorBoard logs, "
                    "the resolved config.json, stdout.txt and train.lock (held while training).")
flags.DEFINE_enum("mode", "train", ["train", "sample", "likelihood", "eval",
                                    "train_autoencoder"],
                  "train: train (resuming from the preemption checkpoint in --workdir; one "
                  "training run per workdir, others are refused); sample: "
                  "write a PNG grid and .npz of samples; likelihood: bits/dim of a dataset "
                  "split with per-image values; eval: loss, bits/dim and sample quality "
                  "(FID/IS/KID, or FDD for digits) of checkpoints config.eval.begin_ckpt.."
                  "end_ckpt, resumable; train_autoencoder: train the own KL autoencoder of "
                  "config.data.autoencoder (name 'kl', e.g. --config digits_ae) that a latent "
                  "config then names in data.autoencoder.checkpoint.")
flags.DEFINE_string("eval_folder", "eval", "Folder inside --workdir for the outputs of the "
                    "sample, likelihood and eval modes.")
flags.DEFINE_string("checkpoint", "", "sample/likelihood: checkpoint to use: '' = the latest, "
                    "'meta' = the preemption checkpoint, n = checkpoints/checkpoint_n.pth, or a "
                    "file path (a training checkpoint .pth, ours or the reference's, a "
                    ".safetensors state dict used as is, or with a DiT config an official DiT "
                    "file such as DiT-XL-2-256x256.pt, its EMA weights), or a diffusers "
                    "UNet2DModel pipeline folder (unet/ + scheduler/, local files; the latent "
                    "extra). Weights with NaN/inf values, of a non-float dtype or of another "
                    "architecture are refused.")
flags.DEFINE_integer("num_samples", 64, "sample: number of samples (drawn in batches of "
                     "config.eval.batch_size).", lower_bound=1)
flags.DEFINE_string("split", "", "likelihood: dataset split ('train' or 'test'); default "
                    "config.eval.bpd_dataset.")
flags.DEFINE_integer("max_images", 0, "likelihood: evaluate only the first n images of the "
                     "split (0 = all).", lower_bound=0)
flags.DEFINE_list("classes", None, "sample: class indices to sample from a class-conditional "
                  "model (config.model.num_classes = K > 0), e.g. --classes=3,7: sample i has "
                  "class classes[i mod len(classes)]; overrides config.sampling.classes "
                  "(default: every class 0..K-1 in turn).")
flags.DEFINE_string("low_res", None, "sample: low-resolution images to super-resolve (a folder "
                    "of images or an .npz with uint8 (N, h, w[, C]) 'samples'): with a super-"
                    "resolution config (data.low_res_size > 0) or a cascade config, whose base "
                    "stage they replace.")
flags.DEFINE_bool("progress", True, "Show tqdm progress bars.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a misspelt ``--config.<key>`` override reported as a flag error
    (ml_collections raises AttributeError/KeyError from deep inside) instead of a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError) as e:
        overrides = [a for a in argv[1:] if a.startswith(("--config.", "-config."))]
        text = re.sub(r"(\\n|[\\'\"\s])+", " ", str(e)).strip()
        hint = re.search(r"Did you mean (\S+) instead of (\S+) ?\?", text)
        key = hint.group(2) if hint else text.split(" ")[0]
        bad = " ".join(a for a in overrides if re.search(rf"\.{re.escape(key)}(\.|=|$)", a))
        message = f"unknown config key '{key}' in {bad or ' '.join(overrides)}"
        if hint:
            message += f"; did you mean '{hint.group(1)}'?"
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def resolve_device(config) -> None:
    """Replace ``config.device = 'auto'`` by the device to use (CUDA when available) and apply
    ``config.num_threads`` (CPU threads; absent or 0 = torch's default)."""
    if config.device == "auto":
        config.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(config.device)  # an invalid name fails here, before any work
    if device.type == "cuda" and not torch.cuda.is_available():
        raise app.UsageError(f"config.device={config.device!r} but CUDA is not available; "
                             "use 'auto' or 'cpu'")
    if config.get("num_threads", 0):
        torch.set_num_threads(config.num_threads)


class TerminalLogHandler(logging.StreamHandler):
    """Log lines to stderr in absl's format, written above any tqdm bar on stderr (the bar is
    cleared, the line written, the bar redrawn) instead of through it."""

    def __init__(self) -> None:
        from absl import logging as absl_logging

        super().__init__(sys.stderr)
        self.setFormatter(absl_logging.PythonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record`` with tqdm's bars on stderr out of the way."""
        from tqdm import tqdm

        self.setStream(sys.stderr)  # the current one (tests and tools swap sys.stderr)
        with tqdm.external_write_mode(file=sys.stderr):
            super().emit(record)


def _log_to_terminal() -> None:
    """Replace absl's stderr handler by :class:`TerminalLogHandler` (same format)."""
    from absl import logging as absl_logging

    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    if not any(isinstance(h, TerminalLogHandler) for h in root.handlers):
        root.addHandler(TerminalLogHandler())


def show_progress() -> bool:
    """tqdm bars when ``--progress`` and stderr is a terminal (see the module docstring)."""
    return FLAGS.progress and sys.stderr.isatty()


def check_inputs(config, workdir: Path, mode: str) -> None:
    """What sample, likelihood and eval read from ``workdir`` exists, checked before the
    workdir (and ``stdout.txt`` in it) is created.

    Raises:
        FileNotFoundError: no such checkpoint; the message names the workdir (and says when it
            does not exist).
        ValueError: ``config.eval`` incomplete (eval).
    """
    from score_sde.evaluation.run import check_eval_config, checkpoints_to_evaluate
    from score_sde.training.checkpoints import list_snapshots
    from score_sde.training.inference import find_checkpoint

    if mode in ("train", "train_autoencoder"):
        return
    try:
        if mode == "eval":
            check_eval_config(config)
            snapshots = list_snapshots(workdir)
            e = config.eval
            if not any(e.begin_ckpt <= n <= e.end_ckpt for n, _ in snapshots):
                checkpoints_to_evaluate(config, snapshots, workdir)  # raises, listing them
        else:
            find_checkpoint(workdir, FLAGS.checkpoint)
    except FileNotFoundError as e:
        # a DiT config also samples an official file (imagenet256_dit_xl2 cannot train here)
        hint = ("; a DiT config also samples an official DiT file: --checkpoint "
                "/path/DiT-XL-2-256x256.pt" if mode == "sample" and not FLAGS.checkpoint
                and config.model.get("name") == "dit" else "")
        named_file = mode != "eval" and FLAGS.checkpoint not in ("", "meta") \
            and not FLAGS.checkpoint.isdigit()
        if workdir.is_dir() or named_file:
            if hint:
                raise FileNotFoundError(f"{e}{hint}") from None
            raise
        raise FileNotFoundError(f"--workdir {workdir} does not exist: --mode {mode} reads the "
                                "checkpoints a training run wrote there; train first with "
                                f"--mode train, or check the path{hint}") from None


def apply_classes_flag(config, mode: str, values: list[str] | None) -> None:
    """``--classes=3,7`` -> ``config.sampling.classes = (3, 7)``, checked against
    ``config.model.num_classes``.

    Raises:
        ValueError, TypeError: another mode than sample, a value that is not an integer, a class
            outside [0, K), or an unconditional model; naming ``--classes`` and the valid range.
    """
    from score_sde.training import classes

    if values is None:
        return
    if mode != "sample":
        raise ValueError(f"--classes applies to --mode sample, not --mode {mode}; set "
                         "--config.sampling.classes=... for the samples of train and eval")
    try:
        parsed = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated class indices, e.g. --classes=3,7; "
                         f"got {','.join(values)!r}") from None
    config.sampling.classes = classes.check_classes(
        parsed, classes.read_num_classes(config), "--classes")


def _log_to_file(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    from score_sde.utils import LogFileHandler

    handler = LogFileHandler(workdir / "stdout.txt")  # a full disk: one line, no tracebacks
    handler.setFormatter(logging.Formatter("%(levelname)s - %(filename)s - %(asctime)s - "
                                           "%(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)


def run_train(config, workdir: Path) -> None:
    """``--mode train`` (every stage of a cascade config in turn)."""
    from score_sde.training.cascade import is_cascade, train_cascade
    from score_sde.training.loop import train

    if is_cascade(config):
        train_cascade(config, workdir, progress=show_progress())
    else:
        train(config, workdir, progress=show_progress())


def run_sample(config, workdir: Path) -> None:
    """``--mode sample``: samples; a cascade config's every stage; ``--low_res`` images
    super-resolved."""
    from score_sde.training import cascade
    from score_sde.training.inference import run_sample

    if cascade.is_cascade(config):
        cascade.run_sample_cascade(config, workdir, FLAGS.eval_folder,
                                   checkpoint=FLAGS.checkpoint, num_samples=FLAGS.num_samples,
                                   low_res=FLAGS.low_res, progress=show_progress())
    elif FLAGS.low_res is not None:
        cascade.run_super_resolution(config, workdir, FLAGS.low_res, FLAGS.eval_folder,
                                     checkpoint=FLAGS.checkpoint, progress=show_progress())
    else:
        run_sample(config, workdir, FLAGS.eval_folder, checkpoint=FLAGS.checkpoint,
                   num_samples=FLAGS.num_samples, progress=show_progress())


def validate_cascade_run(config, workdir: Path, mode: str, world_size: int) -> None:
    """``validate_run`` and ``check_inputs`` of every stage of a cascade config (train and
    sample; the other modes take one stage's config).

    Raises:
        ValueError: another mode, a stage that does not chain, or a bad stage value.
    """
    from score_sde.training import cascade, validation

    if mode not in ("train", "sample"):
        raise ValueError(f"--mode {mode} takes one stage: run it with that stage's config "
                         f"and --workdir <workdir>/<stage> (a cascade config runs train and "
                         f"sample)")
    for name, cfg in cascade.stage_configs(config):
        stage_dir = cascade.stage_workdir(workdir, name)
        validation.validate_run(cfg, stage_dir, mode, world_size)
        check_inputs(cfg, stage_dir, mode)


def run_likelihood(config, workdir: Path) -> None:
    """``--mode likelihood``."""
    from score_sde.training.inference import run_likelihood

    run_likelihood(config, workdir, FLAGS.eval_folder, checkpoint=FLAGS.checkpoint,
                   split=FLAGS.split, max_images=FLAGS.max_images,
                   progress=show_progress())


def eval_inputs(config, workdir: Path):
    """What ``--mode eval`` takes from the training side (``evaluation.run.Trained``): joined
    here because ``evaluation`` and ``training`` are sibling layers."""
    from score_sde.evaluation.run import Trained
    from score_sde.training.checkpoints import list_snapshots
    from score_sde.training.classes import sample_class_labels, sample_classes
    from score_sde.training.inference import load_ema_model
    from score_sde.training.latent import (
        describe_autoencoder,
        get_model_inverse_scaler,
        latent_data_shape,
        load_config_autoencoder,
    )
    from score_sde.training.latent_data import to_autoencoder_input
    from score_sde.training.latent_likelihood import bound_over_split
    from score_sde.training.loop import get_step_fns
    from score_sde.training.sampling import (
        class_record,
        get_sde,
        not_applied,
        sampling_options,
        sampling_score_fn,
    )

    sde = get_sde(config)
    method, options = sampling_options(config)
    sampled, class_score_fn, conditioning = sample_classes(config), None, None
    if sampled is not None:  # a class-conditional model: sample k has class k mod len(classes)
        def class_score_fn(model, start: int, stop: int):
            labels = sample_class_labels(sampled, start, stop - start, config.device)
            return sampling_score_fn(config, sde, model, labels)

        conditioning = class_record(config, {})
    latent_inputs = {}
    ae = load_config_autoencoder(config)
    if ae is not None:  # a latent model: sample latents, decode them, encode the test images
        def encode(x, generator):
            mean, log_std = ae.encode(to_autoencoder_input(x))
            return mean + torch.exp(log_std) * torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

        latent_inputs = dict(autoencoder=describe_autoencoder(ae),
                             sample_shape=latent_data_shape(config), encode=encode,
                             decode=get_model_inverse_scaler(config, ae),
                             data_bound=lambda model, progress: bound_over_split(
                                 config, model, ae, config.eval.bpd_dataset, progress=progress))
    return Trained(sde=sde, snapshots=list_snapshots(workdir),
                   load_model=lambda path: load_ema_model(config, path),
                   eval_step=get_step_fns(config, sde)[1], method=method, options=options,
                   class_score_fn=class_score_fn, conditioning=conditioning,
                   not_applied=not_applied(config, method), **latent_inputs)


def run_eval(config, workdir: Path) -> None:
    """``--mode eval``."""
    from score_sde.evaluation.run import evaluate
    from score_sde.training.events import EventLog

    evaluate(config, eval_inputs(config, workdir), workdir, FLAGS.eval_folder,
             progress=show_progress(),
             event_log=lambda: EventLog(workdir / FLAGS.eval_folder / "tensorboard"))


def run_train_autoencoder(config, workdir: Path) -> None:
    """``--mode train_autoencoder``: the own KL autoencoder of a latent config
    (:mod:`training.autoencoder`)."""
    from score_sde.training.autoencoder import train_autoencoder

    train_autoencoder(config, workdir, progress=show_progress())


RUNNERS = {"train": run_train, "sample": run_sample, "likelihood": run_likelihood,
           "eval": run_eval, "train_autoencoder": run_train_autoencoder}


def main(argv):
    """Resolve the device, join torchrun's process group (if launched by torchrun), validate the
    config, data and checkpoints, seed once, create the workdir and its ``stdout.txt``, then run
    ``--mode``; user errors end with one line (on stderr, and in ``stdout.txt`` once it exists).
    """
    from score_sde.training import distributed, validation
    from score_sde.training.lock import WorkdirLockedError
    from score_sde.utils import WriteError

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    resolve_device(config)
    ctx = distributed.setup(config)  # one process per device; rank 0 logs and writes
    torch.manual_seed(distributed.rank_seed(config.seed, ctx.rank))  # seeds applied once, here
    workdir = Path(FLAGS.workdir)
    _log_to_terminal()
    finished = False
    try:
        try:
            apply_classes_flag(config, FLAGS.mode, FLAGS.classes)
            if FLAGS.low_res is not None and FLAGS.mode != "sample":
                raise ValueError(f"--low_res applies to --mode sample, not --mode {FLAGS.mode}")
            if "cascade" in config:
                validate_cascade_run(config, workdir, FLAGS.mode, ctx.world_size)
            elif FLAGS.mode == "train_autoencoder":
                from score_sde.training.autoencoder import validate_autoencoder_run

                validate_autoencoder_run(config, workdir, ctx.world_size)
            else:
                validation.validate_run(config, workdir, FLAGS.mode, ctx.world_size)
                check_inputs(config, workdir, FLAGS.mode)
        except (ValueError, TypeError) as e:  # config values, DatasetError, CheckpointError
            _fail(e)
        if ctx.is_main:  # only now: a refused run leaves no workdir behind
            _log_to_file(workdir)
        RUNNERS[FLAGS.mode](config, workdir)
        finished = True
    except (FileNotFoundError, NotImplementedError, CheckpointError, validation.DatasetError,
            FloatingPointError, WriteError, WorkdirLockedError) as e:  # WriteError: a full disk
        _fail(e)
    finally:
        distributed.cleanup(finished)


def _fail(error: Exception) -> None:
    logging.error("%s", error)  # one line on stderr (and in stdout.txt), no traceback
    sys.exit(1)


def run() -> None:
    """Entry point of ``python main.py`` and of the installed ``score-sde`` command."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorBoard's optional TensorFlow
    # --helpshort lists the key flags of the program absl runs (sys.argv[0]: main.py or the
    # score-sde script); ours are defined here, so they are declared key flags of that program
    for flag in FLAGS.get_key_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    sys.modules["__main__"].__doc__ = __doc__  # the usage text --help prints
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
