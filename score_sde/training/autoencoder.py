"""``--mode train_autoencoder``: the toolkit's own KL autoencoder (first stage of latent
diffusion, Rombach et al. 2022, Sec. 3; :func:`models.autoencoders.kl.autoencoder_loss`) trained
on the config's images.

The config's ``data.autoencoder`` section (name ``'kl'``) gives the architecture and the loss
(``reconstruction`` 'l1' | 'l2', ``beta``, ``lr``); ``training`` the batch size, steps and
frequencies, ``optim`` the Adam betas, warm-up and clipping, ``model.ema_rate`` the EMA of the
weights. The run is a training run like the score model's: the workdir lock, ``config.json``,
atomic checkpoints (``checkpoints-meta/`` + numbered ``checkpoints/``, read weights-only, the same
checks), resume from the preemption checkpoint, TensorBoard scalars (``ae_loss``,
``reconstruction``, ``kl``, ``decoder_nll``, ``decoder_log_scale``, ``eval_reconstruction``) and,
at each snapshot, ``reconstructions/iter_{step}/reconstruction.png``: the first test images
(top row) over their reconstructions decode(mean) (bottom row), with the EMA weights.

Each checkpoint also stores ``latent_scale`` = {'scale_factor': 1 / std(z), 'shift': 0}, the std
of posterior draws z of the first test images under the EMA weights (Rombach et al. 2022,
Sec. 4.3.2: unit-variance latents for the score model); a latent config with
``data.autoencoder.scale_factor = None`` uses it. The EMA weights are the autoencoder a latent
config loads (:func:`training.latent.load_config_autoencoder`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from models.autoencoders import KLAutoencoder, autoencoder_loss, create_autoencoder
from models.autoencoders.kl import RECONSTRUCTIONS
from models.checkpoint import safe_load
from models.ema import ExponentialMovingAverage
from score_sde import datasets, losses
from score_sde.training import checkpoints, validation
from score_sde.training.events import EventLog
from score_sde.training.images import save_image_grid
from score_sde.training.latent import autoencoder_name, autoencoder_section
from score_sde.training.latent_data import to_autoencoder_input
from score_sde.training.lock import WorkdirLock
from score_sde.training.loop import log_scalars, write_config
from score_sde.training.sampling import ema_weights

log = logging.getLogger(__name__)

#: images whose latents set ``latent_scale`` (the first of the test split)
SCALE_IMAGES = 512
#: images in a reconstruction grid
GRID_IMAGES = 8


def check_autoencoder_training_config(config) -> dict:
    """The ``data.autoencoder`` section of ``--mode train_autoencoder``, checked.

    The score-model loop's acceleration and guard options do not apply to this loop (it trains
    in fp32, eager, one batch per step, and stops at a non-finite loss at its next log step): a
    value other than their default is refused rather than ignored.

    Raises:
        ValueError: a name other than 'kl', an unknown reconstruction, a negative beta or a
            non-positive lr (naming the key and the valid values); ``training.precision`` other
            than 'auto' / 'fp32', ``training.compile``, ``training.grad_accum`` > 1 or
            ``training.skip_nonfinite``.
    """
    t = config.training
    unsupported = {"precision": (t.get("precision", "auto"), ("auto", "fp32")),
                   "compile": (t.get("compile", False), (False,)),
                   "grad_accum": (t.get("grad_accum", 1), (1,)),
                   "skip_nonfinite": (t.get("skip_nonfinite", False), (False,))}
    for key, (value, supported) in unsupported.items():
        if value not in supported or isinstance(value, bool) != isinstance(supported[0], bool):
            raise ValueError(f"config.training.{key}={value!r} is not supported by --mode "
                             f"train_autoencoder (it trains in fp32, eager, one batch per step, "
                             f"and stops at a non-finite loss at its next log step); use "
                             f"{' or '.join(repr(v) for v in supported)}")
    name = autoencoder_name(config)
    if name != "kl":
        raise ValueError(f"--mode train_autoencoder trains the toolkit's own autoencoder: "
                         f"config.data.autoencoder.name must be 'kl', got {name!r} (the "
                         f"digits_ae config sets it)")
    section = config.data.autoencoder
    if section.get("reconstruction") not in RECONSTRUCTIONS:
        raise ValueError(f"Unknown config.data.autoencoder.reconstruction "
                         f"{section.get('reconstruction')!r}; valid: {', '.join(RECONSTRUCTIONS)}")
    for key, low_open in (("beta", False), ("lr", True)):
        value = section.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value) and (value > 0 if low_open else value >= 0)
        if not ok:
            raise ValueError(f"config.data.autoencoder.{key} must be a number "
                             f"{'> 0' if low_open else '>= 0'}, got {value!r}")
    return autoencoder_section(config)


def optim_config(config):
    """A copy of ``config`` whose ``optim.lr`` is ``data.autoencoder.lr`` (the optimiser and
    warm-up of ``score_sde.losses`` then serve the autoencoder unchanged)."""
    resolved = copy.deepcopy(config)
    with resolved.unlocked():
        resolved.optim.lr = float(config.data.autoencoder.lr)
    return resolved


def build_autoencoder_state(config, workdir: str | Path | None = None) -> dict[str, Any]:
    """The live state of an autoencoder run: {'model' (the KLAutoencoder), 'ema', 'optimizer',
    'step', 'generators' ('train', 'eval'), 'iterators' ('train', 'eval')} on ``config.device``
    (the layout :mod:`training.checkpoints` writes and restores)."""
    device = torch.device(config.device)
    section = check_autoencoder_training_config(config)
    ae = create_autoencoder(section).to(device)
    ema = ExponentialMovingAverage(ae.parameters(), decay=config.model.ema_rate)
    optimizer = losses.get_optimizer(optim_config(config), ae.parameters())
    generators = {name: torch.Generator(device=device).manual_seed(config.seed + k)
                  for k, name in enumerate(("train", "eval"))}
    iterators = {
        "train": datasets.get_data_iterator(
            config, "train", device=device,
            dataset=datasets.get_dataset(config, "train", workdir=workdir)),
        "eval": datasets.get_data_iterator(
            config, "test", seed=config.seed + 1, device=device, num_workers=0,
            dataset=datasets.get_dataset(config, "test", workdir=workdir)),
    }
    return dict(model=ae, ema=ema, optimizer=optimizer, step=0, generators=generators,
                iterators=iterators)


@torch.no_grad()
def latent_scale(ae: KLAutoencoder, dataset, generator: torch.Generator) -> dict[str, float]:
    """{'scale_factor': 1 / std(z), 'shift': 0.0} of raw posterior draws z ~ q(z | x) of the
    first :data:`SCALE_IMAGES` images of ``dataset`` (Rombach et al. 2022, Sec. 4.3.2)."""
    n = min(SCALE_IMAGES, len(dataset))
    x = to_autoencoder_input(dataset.as_float(torch.arange(n)).to(ae.device))
    mean, log_std = ae.encode_raw(x)
    e = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    std = (mean + torch.exp(log_std) * e).std()
    return {"scale_factor": float(1.0 / std.clamp_min(1e-8)), "shift": 0.0}


@torch.no_grad()
def write_reconstructions(ae: KLAutoencoder, dataset, folder: Path) -> Path:
    """``folder/reconstruction.png``: the first test images (top row) over decode(mean) of
    their posteriors (bottom row), in [0, 1]."""
    n = min(GRID_IMAGES, len(dataset))
    x = dataset.as_float(torch.arange(n)).to(ae.device)
    mean, _ = ae.encode_raw(to_autoencoder_input(x))
    x_hat = ((ae.decode_raw(mean) + 1.0) / 2.0).clamp(0.0, 1.0)
    path = folder / "reconstruction.png"
    save_image_grid(torch.cat([x, x_hat]).cpu(), path, nrow=n)
    return path


def _save(config, state, workdir: Path, step: int, writer, snapshot: bool) -> None:
    ae, eval_data = state["model"], state["iterators"]["eval"].dataset
    with ema_weights(ae, state["ema"]):
        state["latent_scale"] = latent_scale(ae, eval_data,
                                             torch.Generator(device=ae.device).manual_seed(0))
        if snapshot:
            folder = workdir / "reconstructions" / f"iter_{step}"
            png = write_reconstructions(ae, eval_data, folder)
            writer.add_image("reconstructions", png.read_bytes(), step)
            n = math.ceil(step / config.training.snapshot_freq)
            checkpoints.save_checkpoint(checkpoints.snapshot_path(workdir, n), state)
            log.info("step: %d, reconstructions in %s, latent scale_factor %.4g", step, folder,
                     state["latent_scale"]["scale_factor"])
    checkpoints.save_checkpoint(checkpoints.meta_path(workdir), state)


def validate_autoencoder_checkpoint(path: str | Path, config) -> None:
    """A checkpoint of an autoencoder run, read weights-only and checked against the config's
    autoencoder (entries, keys, shapes, dtypes, finiteness).

    Raises:
        CheckpointError: naming the file and the entry.
    """
    ckpt = safe_load(path)
    validation.validate_training_checkpoint(ckpt, path)
    with torch.device("meta"):
        ae = create_autoencoder(autoencoder_section(config))
    validation.check_training_tensors(ckpt, ae, path)


def validate_autoencoder_run(config, workdir: str | Path, world_size: int = 1) -> None:
    """What ``main.py --mode train_autoencoder`` checks before work: one process, the config,
    the autoencoder section, the dataset and the checkpoints a resume would read.

    Raises:
        ValueError, TypeError, DatasetError, CheckpointError.
    """
    if world_size > 1:
        raise ValueError("--mode train_autoencoder runs in one process (launched with "
                         f"{world_size} processes by torchrun)")
    validation.validate_config(config, world_size)
    check_autoencoder_training_config(config)
    validation.validate_dataset(config, ("train", "test"), Path(workdir) / "verified_images.json")
    for path in (checkpoints.meta_path(workdir),
                 *[p for _, p in checkpoints.list_snapshots(workdir)[-1:]]):
        if Path(path).is_file():
            validate_autoencoder_checkpoint(path, config)


def train_autoencoder(config, workdir: str | Path, *, hooks=(), progress: bool = True
                      ) -> dict[str, Any]:
    """Train the config's KL autoencoder in ``workdir`` (module docstring) until
    ``training.n_iters`` steps, resuming from its preemption checkpoint.

    Returns:
        the final state.
    Raises:
        training.lock.WorkdirLockedError: another run trains into ``workdir``.
        FloatingPointError: a non-finite loss (naming the step), or weights refused at a save.
        CheckpointError: a checkpoint to resume from that does not fit.
    """
    workdir = Path(workdir)
    check_autoencoder_training_config(config)
    lock = WorkdirLock(workdir).acquire()
    try:
        write_config(config, workdir)
        checkpoints.remove_stale_temporaries(workdir)
        state = build_autoencoder_state(config, workdir)
        resume = checkpoints.resume_checkpoint(workdir)
        if resume is not None:
            checkpoints.restore_checkpoint(resume, state)
        t, section = config.training, config.data.autoencoder
        log.info("start: autoencoder %s, %s parameters, latents %s of %s images; %s",
                 type(state["model"]).__name__,
                 f"{sum(p.numel() for p in state['model'].parameters()):,}",
                 state["model"].latent_shape(datasets.data_shape(config)),
                 datasets.data_shape(config),
                 f"resuming from step {state['step']} ({resume})" if resume else "step 0")
        optimize_fn = losses.optimization_manager(optim_config(config))
        writer = EventLog(workdir / "tensorboard")
        ae, ema, optimizer = state["model"], state["ema"], state["optimizer"]
        bar = tqdm(total=t.n_iters, initial=state["step"], disable=not progress, desc="train_ae")
        start = time.perf_counter()
        try:
            while state["step"] < t.n_iters:
                x = to_autoencoder_input(next(state["iterators"]["train"]))
                ae.train()
                optimizer.zero_grad(set_to_none=True)
                loss, terms = autoencoder_loss(ae, x, reconstruction=section.reconstruction,
                                               beta=section.beta,
                                               generator=state["generators"]["train"])
                loss.backward()
                optimize_fn(optimizer, ae.parameters(), state["step"])
                state["step"] += 1
                ema.update(ae.parameters())
                step, last = state["step"], state["step"] == t.n_iters
                bar.update(1)
                if step % t.log_freq == 0 or last:
                    if not bool(torch.isfinite(loss)):
                        raise FloatingPointError(f"non-finite autoencoder loss at step {step} "
                                                 f"(lower data.autoencoder.lr?)")
                    rate = t.log_freq * x.shape[0] / max(time.perf_counter() - start, 1e-9)
                    start = time.perf_counter()
                    loss = float(loss.detach())
                    log.info("step: %d, ae_loss: %.5e, reconstruction: %.4e, kl: %.4e, "
                             "images/s: %.1f", step, loss, float(terms["reconstruction"]),
                             float(terms["kl"]), rate)
                    log_scalars(writer, step, ae_loss=loss,
                                reconstruction=float(terms["reconstruction"]),
                                kl=float(terms["kl"]), decoder_nll=float(terms["decoder_nll"]),
                                decoder_log_scale=float(ae.decoder_log_scale.detach().mean()))
                if step % t.eval_freq == 0:
                    _evaluate(config, state, writer, step)
                snapshot = step % t.snapshot_freq == 0 or last
                if snapshot or step % t.snapshot_freq_for_preemption == 0:
                    _save(config, state, workdir, step, writer, snapshot)
                for hook in hooks:
                    hook(state)
        finally:
            bar.close()
            writer.close()
            for iterator in state["iterators"].values():
                if hasattr(iterator, "close"):
                    iterator.close()
        return state
    finally:
        lock.release()


@torch.no_grad()
def _evaluate(config, state, writer, step: int) -> None:
    ae = state["model"]
    x = to_autoencoder_input(next(state["iterators"]["eval"]))
    with ema_weights(ae, state["ema"]):
        ae.eval()
        _, terms = autoencoder_loss(ae, x, reconstruction=config.data.autoencoder.reconstruction,
                                    beta=config.data.autoencoder.beta,
                                    generator=state["generators"]["eval"])
    log.info("step: %d, eval_reconstruction: %.4e", step, float(terms["reconstruction"]))
    log_scalars(writer, step, eval_reconstruction=float(terms["reconstruction"]),
                eval_kl=float(terms["kl"]))


__all__ = [
    "build_autoencoder_state",
    "check_autoencoder_training_config",
    "latent_scale",
    "train_autoencoder",
    "validate_autoencoder_checkpoint",
    "validate_autoencoder_run",
    "write_reconstructions",
]
