"""The one training loop (Song et al. 2021, the reference's ``run_lib.train``): build, step,
loop, side effects.

``build`` turns a config into the live state (model, EMA, optimizer, generators, data
iterators); ``train`` runs ``losses.get_step_fn`` steps and calls small side-effect functions at
their frequencies: logging (tqdm, TensorBoard), evaluation loss, the preemption checkpoint,
numbered snapshots and snapshot sample grids with the EMA weights. It resumes from the latest
checkpoint of ``workdir`` automatically.

A class-conditional run (``model.num_classes > 0``, :mod:`training.classes`) reads each batch
with its labels (``DataIterator(with_labels=True)``: the same batches and data positions as an
unconditional run) and passes them to the training and evaluation losses; label dropout for
classifier-free guidance is the model's own, the loop never drops labels. A super-resolution
stage (``data.low_res_size > 0``) gets each batch's augmented low-resolution conditioning
(:func:`training.super_resolution.conditioning_kwargs`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models.ema import ExponentialMovingAverage
from models.utils import create_model
from score_sde import datasets, losses
from score_sde.datasets.cache import ArrayCache
from score_sde.discrete_diffusion import VLBImportanceSampler
from score_sde.training import (
    acceleration,
    checkpoints,
    classes,
    distributed,
    latent,
    super_resolution,
    validation,
)
from score_sde.training.events import EventLog
from score_sde.training.images import class_rows, save_image_grid, save_scatter
from score_sde.training.latent_data import latent_iterators
from score_sde.training.lock import WorkdirLock
from score_sde.training.nonfinite import NonFiniteGuard
from score_sde.training.sampling import ema_weights, generate, get_sde
from score_sde.utils import atomic_write_bytes

log = logging.getLogger(__name__)

#: ``hook(state)`` is called after every step's side effects (tests use it to interrupt a run).
Hook = Callable[[dict[str, Any]], None]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def write_config(config, workdir: str | Path) -> Path:
    """Write the resolved config as ``workdir/config.json`` (beside the results it produced),
    atomically; a resumed run whose config differs from the saved one logs the changed keys.

    Raises:
        utils.WriteError: the file could not be written (e.g. a full disk).
    """
    path = Path(workdir) / "config.json"
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    if path.is_file():
        old, new = _flatten(json.loads(path.read_text())), _flatten(json.loads(text))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            log.warning("config differs from the saved %s in: %s", path, ", ".join(
                f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed))
    atomic_write_bytes(path, text.encode(), what="the resolved config")
    return path


def build(config, workdir: str | Path | None = None) -> tuple[dict[str, Any], Any]:
    """The live training state and the SDE for ``config`` (on ``config.device``).

    Image folders are read through the decode cache ``config.data.cache`` (``'auto'``: under
    ``workdir``; rank 0 builds it while the other ranks wait) and decoded ahead of the step by
    ``config.data.num_workers`` processes (the training iterator; the evaluation batches, one per
    ``eval_freq`` steps, are built when asked).

    Returns:
        ``state`` = {'model', 'ema', 'optimizer', 'step', 'generators', 'iterators'} and the SDE.
        ``generators`` are the loss draws ('train', 'eval'); ``iterators`` the data ('train',
        'eval' on the test split). With ``training.vlb_importance_sampling`` the state also
        holds the ``importance_sampler`` of the training steps (its history is checkpointed);
        fp16 training (``training.precision``) the ``grad_scaler`` (``torch.amp.GradScaler``).
    """
    device = torch.device(config.device)
    model = create_model(config)
    ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
    optimizer = losses.get_optimizer(config, model.parameters())
    generators = {
        name: torch.Generator(device=device).manual_seed(config.seed + k)
        for k, name in enumerate(("train", "eval"))
    }
    ctx = distributed.context()
    if datasets.cache_folder(config, workdir) is not None:  # decoded once, not once per rank
        distributed.on_main(lambda: datasets.get_dataset(config, "train", workdir=workdir), ctx,
                            "building the decode cache", device)
    train_data = datasets.get_dataset(config, "train", workdir=workdir)
    eval_data = datasets.get_dataset(config, "test", workdir=workdir)
    for split, data in (("train", train_data), ("test", eval_data)):
        classes.check_dataset_classes(config, data, split)
    with_labels = classes.read_num_classes(config) > 0  # a class-conditional run
    train_data = distributed.shard_dataset(train_data, config.training.batch_size, ctx)
    iterators = {
        "train": datasets.get_data_iterator(config, "train", device=device, dataset=train_data,
                                            with_labels=with_labels),
        "eval": datasets.get_data_iterator(config, "test", seed=config.seed + 1, device=device,
                                           dataset=eval_data, with_labels=with_labels,
                                           num_workers=0),
    }
    ae = latent.load_config_autoencoder(config, device)
    if ae is not None:  # a latent config: batches of z ~ q(z | x) (training.latent_data)
        iterators = latent_iterators(config, ae, iterators, generators, workdir)
    state = dict(model=model, ema=ema, optimizer=optimizer, step=0, generators=generators,
                 iterators=iterators)
    if ae is not None:
        state["autoencoder"] = ae  # frozen, not checkpointed
    sde = get_sde(config)
    scaler = acceleration.grad_scaler(config)
    if scaler is not None:
        state["grad_scaler"] = scaler
    if config.training.get("vlb_importance_sampling", False):
        state["importance_sampler"] = VLBImportanceSampler(sde.N, device=device)
    return state, sde


def get_step_fns(config, sde, importance_sampler: VLBImportanceSampler | None = None
                 ) -> tuple[Callable, Callable]:
    """(train_step_fn, eval_step_fn) of ``losses.get_step_fn`` with the config's loss options
    (``training.loss``, ``vlb_rescale``; the training step draws its steps from
    ``importance_sampler`` when given, the evaluation step uniformly), the resolved
    ``training.precision`` and, for training, ``training.grad_accum`` micro-batches."""
    kwargs = dict(precision=acceleration.training_precision(config),
                  reduce_mean=config.training.reduce_mean,
                  continuous=config.training.continuous,
                  likelihood_weighting=config.training.likelihood_weighting,
                  loss=config.training.get("loss", "simple"),
                  vlb_rescale=config.training.get("vlb_rescale", False))
    train_step = losses.get_step_fn(sde, True, losses.optimization_manager(config), **kwargs,
                                    importance_sampler=importance_sampler,
                                    grad_accum=config.training.get("grad_accum", 1))
    eval_step = losses.get_step_fn(sde, False, **kwargs)
    return train_step, eval_step


def next_batch(iterator, scaler) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next batch in model space (B, *D) and its class labels (B,) (None when the iterator
    yields samples alone: an unconditional run)."""
    item = next(iterator)
    x, y = item if isinstance(item, tuple) else (item, None)
    return scaler(x), y


def labels_kwargs(class_labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``{'class_labels': y}`` for a step function, or nothing (an unconditional run's step is
    called exactly as before class conditioning existed)."""
    return {} if class_labels is None else {"class_labels": class_labels}


# -- side effects ---------------------------------------------------------------------------------


def log_start(config, state, workdir: Path, resume: Path | None, world_size: int = 1) -> None:
    """One block of log lines before the first step: device and threads, parameter count,
    dataset sizes and summary (of the iterators' ``dataset``, when they have one), the data
    loader (the resolved ``data.num_workers`` and the decode cache), workdir, and the step resumed
    from (or a fresh start)."""
    model, iterators = state["model"], state["iterators"]
    train_data = getattr(iterators["train"], "dataset", None)
    eval_data = getattr(iterators["eval"], "dataset", None)
    num_params = sum(p.numel() for p in model.parameters())
    processes = f" x {world_size} processes" if world_size > 1 else ""
    start = (f"resuming from step {state['step']} ({resume})" if resume is not None
             else "starting at step 0")
    lines = [f"start: {config.model.name} on {config.device}{processes}, "
             f"torch threads: {torch.get_num_threads()}",
             f"start: model {type(model).__name__}, {num_params:,} parameters",
             f"start: {acceleration.describe(config)}"]
    if train_data is not None and eval_data is not None:
        lines.append(f"start: dataset {config.data.dataset}, {train_data.data.shape[0]} train / "
                     f"{len(eval_data)} eval examples: {train_data.summary()}")
        workers = getattr(iterators["train"], "num_workers", 0)
        cache = getattr(train_data.data, "path", None)
        lines.append(f"start: data loader: {workers} worker process{'es' * (workers != 1)} "
                     f"(data.num_workers={config.data.get('num_workers', 'auto')!r}), "
                     f"decode cache {cache if cache is not None else 'off'} "
                     f"(data.cache={config.data.get('cache', 'none')!r})")
    lines += [f"start: workdir {Path(workdir).resolve()}",
              f"start: {start} of {config.training.n_iters} (training.n_iters)"]
    for line in lines:
        log.info("%s", line)


def log_scalars(writer, step: int, **scalars: float) -> None:
    """One TensorBoard scalar per keyword, at ``step``."""
    for name, value in scalars.items():
        writer.add_scalar(name, value, step)


def snapshot_samples(config, state, sde, workdir: Path, step: int) -> Path:
    """Sample a batch with the EMA weights into ``workdir/samples/iter_{step}/``
    (``sample.png`` grid or scatter plot, ``sample.npz``); a class-conditional model samples
    class ``classes[i mod len(classes)]`` for sample i, with ``config.sampling``'s guidance; a
    super-resolution stage super-resolves the first test images, downsampled."""
    folder = workdir / "samples" / f"iter_{step}"  # made by the first write
    model = state["model"]
    shape = (config.training.batch_size, *latent.latent_data_shape(config))
    generator = torch.Generator(device=config.device).manual_seed(config.seed + step)
    sampled = classes.sample_classes(config)
    labels = None if sampled is None else classes.sample_class_labels(
        sampled, 0, shape[0], config.device)
    if super_resolution.read_low_res_size(config):  # super-resolve the first test images
        with ema_weights(model, state["ema"]):
            x = super_resolution.super_resolve_test_images(
                config, sde, model, state["iterators"]["eval"].dataset, shape[0], generator)
        write_samples(x, folder)
        return folder
    with ema_weights(model, state["ema"]):
        z, _ = generate(config, sde, model, shape, generator=generator,
                        inverse_scaler=lambda z: z, class_labels=labels)
    ae = state.get("autoencoder")
    write_samples(latent.get_model_inverse_scaler(config, ae)(z), folder, class_labels=labels)
    if ae is not None:  # the decoded grid above, the sampled latents here
        write_latents(z, folder, labels)
    return folder


def write_samples(x: torch.Tensor, folder: Path,
                  class_labels: torch.Tensor | None = None) -> None:
    """``sample.png`` (image grid, or scatter for 2-D points) and ``sample.npz`` of ``x``, each
    written atomically.

    Images are stored as uint8 (B, H, W, C) like the reference; points as float32 (B, D). With
    ``class_labels`` (B,) the grid puts one class per row where that fits
    (``images.class_rows``) and the .npz holds them as ``labels``.

    Raises:
        utils.WriteError: a file could not be written (e.g. a full disk); none is partial.
    """
    x = x.detach().cpu()
    labels = None if class_labels is None else class_labels.detach().cpu()
    if x.dim() == 4:
        rows = class_rows(x, labels) if labels is not None else None
        if rows is None:
            save_image_grid(x, folder / "sample.png")
        else:
            save_image_grid(rows[0], folder / "sample.png", nrow=rows[1])
        samples = (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    else:
        if x.shape[1] == 2:
            save_scatter(x, folder / "sample.png")
        samples = x.float().numpy()
    buffer = io.BytesIO()
    arrays = {} if labels is None else {"labels": labels.numpy()}
    np.savez_compressed(buffer, samples=samples, **arrays)
    atomic_write_bytes(folder / "sample.npz", buffer.getvalue(), what="the samples")


def write_latents(z: torch.Tensor, folder: Path, class_labels: torch.Tensor | None) -> Path:
    """``folder/latents.npz``: ``latents`` float32 (N, c, h, w) as sampled (model space) and,
    for a class-conditional model, ``labels`` (N,); written atomically."""
    arrays = {"latents": z.detach().cpu().float().numpy()}
    if class_labels is not None:
        arrays["labels"] = class_labels.detach().cpu().numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = folder / "latents.npz"
    atomic_write_bytes(path, buffer.getvalue(), what="the sampled latents")
    return path


def log_training(writer, bar, state, step: int, loss: torch.Tensor, rate: float,
                 scaler_skips: int = 0) -> None:
    """The training loss, learning rate and images/s to the log, TensorBoard and the bar; with
    fp16, the gradient scaler's scale and the steps it skipped so far."""
    lr = state["optimizer"].param_groups[0]["lr"]
    log.info("step: %d, training_loss: %.5e, images/s: %.1f", step, float(loss), rate)
    log_scalars(writer, step, training_loss=float(loss), lr=lr, images_per_sec=rate)
    if state.get("grad_scaler") is not None:
        scale = state["grad_scaler"].get_scale()
        log.info("step: %d, fp16 gradient scale %g, %d steps skipped by the scaler so far",
                 step, scale, scaler_skips)
        log_scalars(writer, step, grad_scale=scale, scaler_skipped_steps=scaler_skips)
    bar.set_postfix(loss=f"{float(loss):.4g}", img_s=f"{rate:.1f}")


def evaluate(state, eval_step, scaler, writer, step: int, config=None) -> None:
    """The loss on one test batch with the EMA weights (the reference's ``eval_freq`` loss), with
    its class labels in a class-conditional run and, for a super-resolution stage of
    ``config``, its augmented low-resolution conditioning (:mod:`training.super_resolution`)."""
    batch, class_labels = next_batch(state["iterators"]["eval"], scaler)
    generator = state["generators"]["eval"]
    cond = {} if config is None else super_resolution.conditioning_kwargs(config, batch,
                                                                          generator)
    eval_loss = eval_step(state, batch, generator=generator, **labels_kwargs(class_labels),
                          **cond)
    log.info("step: %d, eval_loss: %.5e", step, float(eval_loss))
    log_scalars(writer, step, eval_loss=float(eval_loss))


def save_snapshot(config, state, sde, workdir: Path, step: int, writer=None) -> None:
    """Numbered snapshot ``checkpoint_{ceil(step / snapshot_freq)}`` and, when
    ``training.snapshot_sampling``, a sample grid with the EMA weights, also shown in
    TensorBoard as image ``samples`` at ``step`` (when ``writer`` is given and a PNG was made:
    images and 2-D points)."""
    n = math.ceil(step / config.training.snapshot_freq)
    checkpoints.save_checkpoint(checkpoints.snapshot_path(workdir, n), state)
    if config.training.snapshot_sampling:
        folder = snapshot_samples(config, state, sde, workdir, step)
        log.info("step: %d, samples in %s", step, folder)
        png = folder / "sample.png"
        if writer is not None and png.is_file():
            writer.add_image("samples", png.read_bytes(), step)


# -- the loop -------------------------------------------------------------------------------------


def train(config, workdir: str | Path, *, hooks: Sequence[Hook] = (),
          progress: bool = True) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` until ``config.training.n_iters`` steps, resuming from the
    preemption checkpoint there (see :mod:`training.checkpoints`).

    The run holds the workdir's lock (:mod:`training.lock`) for its life; a second training run
    into the same workdir is refused. At a snapshot step the numbered checkpoint and the sample
    grid are written before the preemption checkpoint, which marks the step done: a run killed
    in between redoes the step when resumed.

    Under ``torchrun`` (a process group from :func:`training.distributed.setup`) every rank
    trains on its rows of the global batch; rank 0 alone holds the lock, logs, evaluates,
    samples and writes checkpoints while the others wait. A NaN/inf loss or gradient stops the
    run naming the step, before any checkpoint of it, or skips the step with
    ``training.skip_nonfinite = True`` up to ``training.max_skip_fraction`` of recent steps
    (:mod:`training.nonfinite`).

    Args:
        config: a resolved config (``config.device`` a real device).
        workdir: receives ``config.json``, ``checkpoints*/``, ``samples/``, ``tensorboard/``.
        hooks: called with the state after each step.
        progress: show a tqdm bar with the loss and images/s.
    Returns:
        the final state.
    Raises:
        training.lock.WorkdirLockedError: another process trains into ``workdir``.
        FloatingPointError: a non-finite loss or gradient (or too many skipped steps).
        utils.WriteError: an output could not be written (e.g. a full disk).
    """
    workdir = Path(workdir)
    ctx = distributed.context()
    validation.validate_config(config, ctx.world_size)
    lock = WorkdirLock(workdir)
    distributed.on_main(lock.acquire, ctx, "taking the workdir lock", config.device)
    try:
        return _train_locked(config, workdir, ctx, hooks, progress)
    finally:
        lock.release()


def _train_locked(config, workdir: Path, ctx: distributed.Context, hooks: Sequence[Hook],
                  progress: bool) -> dict[str, Any]:
    t = config.training
    def prepare_workdir():
        write_config(config, workdir)
        checkpoints.remove_stale_temporaries(workdir)  # left by a killed run: we hold the lock
        if config.data.get("cache") == "auto":  # the decode cache under the workdir is ours too
            ArrayCache(datasets.cache_folder(config, workdir)).remove_temporaries()

    # rank 0 writes; a failure there (a full disk) reaches every rank instead of a hang
    distributed.on_main(prepare_workdir, ctx, "writing config.json", config.device)
    state, sde = build(config, workdir)
    resume = checkpoints.resume_checkpoint(workdir)
    if resume is not None:
        checkpoints.restore_checkpoint(resume, state)
        distributed.reseed_after_resume(config.seed, state["step"], ctx)
    elif checkpoints.list_snapshots(workdir):
        log.warning("no %s in %s: training starts at step 0 and rewrites the numbered "
                    "snapshots", checkpoints.meta_path(workdir).relative_to(workdir), workdir)
    if ctx.is_main:
        log_start(config, state, workdir, resume, ctx.world_size)
    distributed.check_same(state["step"], ctx, "the step to resume from",
                           "Is --workdir on a file system that every node sees?", config.device)
    guard = NonFiniteGuard(config.device, skip=t.get("skip_nonfinite", False),
                           max_skip_fraction=t.get("max_skip_fraction", 0.01))
    guard.protect(state["optimizer"], state)
    train_step, eval_step = get_step_fns(config, sde, state.get("importance_sampler"))
    forward = acceleration.forward_model(config, state["model"])  # compiled, or the model
    train_step = distributed.data_parallel_step(train_step, forward, t.batch_size, ctx)
    if not ctx.enabled:
        train_step = acceleration.with_forward_model(train_step, forward)
    scaler = latent.get_model_scaler(config)
    writer = EventLog(workdir / "tensorboard") if ctx.is_main else None
    bar = tqdm(total=t.n_iters, initial=state["step"], disable=not (progress and ctx.is_main),
               desc="train")
    window_start, window_images = time.perf_counter(), 0
    try:
        while state["step"] < t.n_iters:
            batch, class_labels = next_batch(state["iterators"]["train"], scaler)
            generator = state["generators"]["train"]
            loss = train_step(state, batch, generator=generator, **labels_kwargs(class_labels),
                              **super_resolution.conditioning_kwargs(config, batch, generator))
            step, last = state["step"], state["step"] == t.n_iters  # steps completed
            guard.observe_loss(loss, step)  # read on the host only at the side effects
            guard.end_step()  # a step the fp16 gradient scaler skipped is no failure
            window_images += batch.shape[0]
            bar.update(1)
            if step % t.log_freq == 0 or last:
                guard.check(ctx)
                loss = distributed.mean(loss, ctx)  # the global batch's loss
                rate = window_images / max(time.perf_counter() - window_start, 1e-9)
                distributed.on_main(partial(log_training, writer, bar, state, step, loss, rate,
                                            guard.scaler_skips()),
                                    ctx, "logging", config.device)
                window_start, window_images = time.perf_counter(), 0
            if step % t.eval_freq == 0:
                distributed.on_main(partial(evaluate, state, eval_step, scaler, writer, step,
                                            config),
                                    ctx, "the evaluation loss", config.device)
            snapshot = step % t.snapshot_freq == 0 or last
            if snapshot:  # first the step's outputs ...
                guard.check(ctx)
                distributed.on_main(partial(save_snapshot, config, state, sde, workdir, step,
                                            writer),
                                    ctx, "snapshot", config.device)
            if snapshot or step % t.snapshot_freq_for_preemption == 0:  # ... then "step done"
                guard.check(ctx)
                distributed.on_main(partial(checkpoints.save_checkpoint,
                                            checkpoints.meta_path(workdir), state),
                                    ctx, "checkpoint", config.device)
            for hook in hooks:
                hook(state)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        for iterator in state["iterators"].values():
            if hasattr(iterator, "close"):
                iterator.close()  # the data workers
    return state
