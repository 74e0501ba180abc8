"""``main.py --mode eval``: loss, bits/dim and sample quality of numbered checkpoints, resumable.

As the reference's ``run_lib.evaluate``, for each ``checkpoints/checkpoint_{n}.pth`` with
``config.eval.begin_ckpt <= n <= config.eval.end_ckpt`` (EMA weights, read weights-only):

* ``enable_loss``: the evaluation loss (``losses.get_step_fn(train=False)``) over one ordered pass
  of the test split in batches of ``eval.batch_size``;
* ``enable_bpd``: bits/dim of every image of ``eval.bpd_dataset`` (``evaluation.bits_per_dim``,
  ODE tolerances ``eval.rtol`` / ``eval.atol`` when present), averaged with its standard error;
  per-image values in ``<eval_folder>/bpd_ckpt_{n}_{split}.npz``;
* ``enable_sampling``: ``eval.num_samples`` samples with ``config.sampling`` (sample k from seed
  ``config.seed + k``), scored with the digits metric (FDD, classifier score) for the embedded
  digits and with FID / Inception score / KID against the training split otherwise
  (``evaluation.scorers``).

A class-conditional model (``model.num_classes > 0``) is evaluated with the data's own labels:
the loss and the bits/dim are conditional (-log2 p(x | y) / D; the record says so under
``class_labels``), and sample k has class ``classes[k mod len(classes)]`` with the config's
guidance (``Trained.class_score_fn``).

Sample batches go to ``<eval_folder>/ckpt_{n}/samples_*.npz`` as they are drawn
(``records.sample_for_eval``), so an interrupted run resumes inside a checkpoint; each finished
checkpoint gets ``<eval_folder>/record_ckpt_{n}.json`` (``records.evaluation_record``) and a rerun
skips checkpoints that have one (delete it to evaluate again). The Inception weights and
reference statistics are loaded before any checkpoint is touched, so a missing weights file fails
at once rather than after hours of sampling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import sde_lib
from models.conditioning import read_num_classes
from models.utils import get_score_fn
from score_sde import datasets
from score_sde.evaluation import metrics, records
from score_sde.evaluation.bits_per_dim import DATA_LABELS, eval_bpd
from score_sde.evaluation.scorers import DigitsScorer, InceptionScorer, _write_npz, get_scorer
from score_sde.utils import ScoreFn
from score_sde.utils.compile import inference_network
from score_sde.utils.precision import (
    SAMPLING_PRECISIONS,
    check_precision,
    network_precision,
    precision_scope,
)

log = logging.getLogger(__name__)

EVAL_KEYS = ("begin_ckpt", "end_ckpt", "batch_size", "enable_sampling", "num_samples",
             "enable_loss", "enable_bpd", "bpd_dataset")
#: ``on_batch(samples)`` taps the sample stream of a checkpoint (tests use it to interrupt a run)
BatchHook = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class Trained:
    """What an evaluation takes from the training side, built from the config by
    ``main.eval_inputs`` (``evaluation`` and ``training`` are sibling layers: neither imports
    the other).

    Attributes:
        sde: the SDE the model was trained with.
        snapshots: the workdir's numbered checkpoints (n, path), ascending.
        load_model: ``path -> (model with the EMA weights in eval mode, step)``, weights-only.
        eval_step: ``losses.get_step_fn(train=False)`` with the config's loss options.
        method, options: the sampler and its options from ``config.sampling``.
        class_score_fn: for a class-conditional model, ``(model, start, stop) -> score_fn`` of
            samples start..stop-1 (their classes bound, the config's guidance applied); None
            for an unconditional one.
        conditioning: the classes and guidance ``class_score_fn`` applies, for the record.
        autoencoder: a latent config's autoencoder (its ``describe()``, for the record); then
            ``sample_shape`` is the latent's, ``encode(x, generator)`` draws model-space
            latents of images x in [0, 1] (the loss) and ``decode(z)`` gives images in [0, 1]
            (the samples scored); None (a pixel model): the data scaler and its inverse.
        data_bound: a latent model's bits/dim: ``data_bound(model, progress)`` gives the
            per-image arrays and the summary of the LSGM bound on the data's bits/dim over
            ``eval.bpd_dataset`` (``training.latent_likelihood.bound_over_split``), never the
            latents' own ODE bits/dim.
        not_applied: the ``config.sampling`` keys set that ``method`` does not read, for the
            record's ``sampler`` entry.
    """

    sde: sde_lib.SDE
    snapshots: list[tuple[int, Path]]
    load_model: Callable[[Path], tuple[nn.Module, int]]
    eval_step: Callable[..., torch.Tensor]
    method: str
    options: dict[str, Any]
    class_score_fn: Callable[[nn.Module, int, int], ScoreFn] | None = None
    conditioning: dict[str, Any] | None = None
    autoencoder: dict[str, Any] | None = None
    sample_shape: tuple[int, ...] | None = None
    encode: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    data_bound: Callable[[nn.Module, bool], tuple[dict[str, np.ndarray], dict]] | None = None
    not_applied: dict[str, Any] | None = None


def check_eval_config(config) -> None:
    """Check ``config.eval`` before any work: every key of :data:`EVAL_KEYS` present, sizes
    positive, ``begin_ckpt <= end_ckpt``.

    Raises:
        ValueError: naming the missing keys or the bad value.
    """
    missing = [k for k in EVAL_KEYS if k not in config.eval]
    if missing:
        raise ValueError(f"--mode eval needs config.eval.{{{', '.join(missing)}}}; add them to "
                         "the config (see configs/digits.py) or pass --config.eval.<key>=...")
    e = config.eval
    for key in ("batch_size", "num_samples", "begin_ckpt", "end_ckpt"):
        if not isinstance(e[key], int) or e[key] < (0 if key.endswith("ckpt") else 1):
            raise ValueError(f"config.eval.{key} must be a positive int, got {e[key]!r}")
    if e.begin_ckpt > e.end_ckpt:
        raise ValueError(f"config.eval.begin_ckpt={e.begin_ckpt} > end_ckpt={e.end_ckpt}")


def record_path(workdir: str | Path, eval_folder: str, n: int) -> Path:
    """``workdir/eval_folder/record_ckpt_{n}.json``: the record of checkpoint n."""
    return Path(workdir) / eval_folder / f"record_ckpt_{n}.json"


def checkpoints_to_evaluate(config, snapshots: list[tuple[int, Path]],
                            workdir: str | Path) -> list[tuple[int, Path]]:
    """The snapshots (n, path) with ``eval.begin_ckpt <= n <= eval.end_ckpt``.

    Raises:
        FileNotFoundError: none in the range (the message lists the snapshots there are).
    """
    chosen = [(n, p) for n, p in snapshots if config.eval.begin_ckpt <= n <= config.eval.end_ckpt]
    if not chosen:
        raise FileNotFoundError(
            f"no checkpoint checkpoints/checkpoint_{{n}}.pth with "
            f"{config.eval.begin_ckpt} <= n <= {config.eval.end_ckpt} in {workdir} (found: "
            f"{', '.join(str(n) for n, _ in snapshots) or 'none'}); set "
            "--config.eval.begin_ckpt / end_ckpt or train first")
    absent = sorted(set(range(config.eval.begin_ckpt, config.eval.end_ckpt + 1))
                    - {n for n, _ in chosen})
    if absent and len(absent) <= 20:
        log.warning("checkpoints %s not in %s; skipped", absent, workdir)
    return chosen


# -- the three evaluations of one checkpoint ------------------------------------------------------


def eval_loss(config, model: nn.Module, eval_step: Callable[..., torch.Tensor],
              encode: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
              ) -> dict:
    """Mean evaluation loss over one ordered pass of the test split (the reference's
    ``ckpt_{n}_loss``), with the per-batch values; loss draws from seed ``config.seed``. A
    class-conditional model gets each sample's own label; a latent model the latents
    ``encode(x, generator)`` draws (from the loss's generator, before the loss's draws)."""
    conditional = read_num_classes(config) > 0
    iterator = datasets.get_data_iterator(config, "test", batch_size=config.eval.batch_size,
                                          train=False, device=config.device,
                                          with_labels=conditional)
    scaler = datasets.get_data_scaler(config)
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    state = {"model": model}  # the EMA weights are already in the model
    per_batch = []
    for item in iterator:
        x, labels = item if conditional else (item, None)
        extra = {} if labels is None else {"class_labels": labels}
        x = scaler(x) if encode is None else encode(x, generator)
        per_batch.append(float(eval_step(state, x, generator=generator, **extra)))
    result = {"mean": float(np.mean(per_batch)), "per_batch": per_batch, "split": "test",
              "batch_size": config.eval.batch_size}
    if conditional:
        result["class_labels"] = DATA_LABELS
    return result


def eval_samples(config, trained: Trained, score_fn: ScoreFn,
                 scorer: DigitsScorer | InceptionScorer, sample_dir: Path, *, progress: bool,
                 on_batch: BatchHook | None = None,
                 model: nn.Module | None = None) -> tuple[dict, dict]:
    """Score ``eval.num_samples`` per-sample-seeded samples drawn (or resumed) in ``sample_dir``;
    a class-conditional ``model`` samples through ``trained.class_score_fn``.

    Returns:
        the scorer's metrics and ``sample_for_eval``'s info (seeds, sampler, NFE).
    """
    inverse_scaler = trained.decode or datasets.get_data_inverse_scaler(config)
    scorer.reset()

    def score_batch(x: torch.Tensor) -> None:  # x (B, C, H, W) in model space, on the CPU
        if on_batch is not None:
            on_batch(x)
        scorer.update(metrics.quantize_images(inverse_scaler(x)))

    batch_score_fn = None
    if trained.class_score_fn is not None and model is not None:
        def batch_score_fn(start: int, stop: int) -> ScoreFn:
            return trained.class_score_fn(model, start, stop)

    _, info = records.sample_for_eval(
        trained.sde, score_fn, trained.sample_shape or datasets.data_shape(config),
        config.eval.num_samples,
        config.eval.batch_size, config.seed, trained.method, sample_dir=sample_dir,
        device=config.device, progress=progress, on_batch=score_batch, keep_samples=False,
        batch_score_fn=batch_score_fn,
        conditioning=trained.conditioning if batch_score_fn is not None else None,
        **trained.options)
    return scorer.result(), info


def evaluate(config, trained: Trained, workdir: str | Path, eval_folder: str = "eval", *,
             progress: bool = True, on_batch: BatchHook | None = None,
             event_log: Callable[[], Any] | None = None) -> list[Path]:
    """Evaluate the checkpoints ``[eval.begin_ckpt, eval.end_ckpt]`` of ``workdir``.

    Args:
        config: a resolved config (``config.device`` a real device) with the keys
            :data:`EVAL_KEYS` in ``config.eval``.
        trained: the SDE, snapshots, model loader, loss and sampler of the config.
        workdir: the training workdir; outputs go to ``workdir/eval_folder/``.
        progress: tqdm bars.
        on_batch: called with every sample batch (B, *D) before it is scored.
        event_log: opens a TensorBoard writer (``add_scalar(name, value, step)``, ``close()``;
            ``cli`` passes ``training.events.EventLog`` of ``workdir/eval_folder/tensorboard``),
            called once if a checkpoint is evaluated: each checkpoint's metrics (the record's
            ``metrics``: ``eval_loss``, ``bpd``, ``fdd`` / ``fid`` ...) become scalars at the
            checkpoint's training step.
    Returns:
        the record paths, one per evaluated checkpoint (existing ones included).
    """
    check_eval_config(config)
    e = config.eval
    folder = Path(workdir) / eval_folder
    chosen = checkpoints_to_evaluate(config, trained.snapshots, workdir)
    todo = [(n, p) for n, p in chosen if not record_path(workdir, eval_folder, n).is_file()]
    done = sorted({n for n, _ in chosen} - {n for n, _ in todo})
    if done:
        log.info("checkpoints %s already have records in %s; skipped (delete one to redo it)",
                 done, folder)
    scorer = get_scorer(config) if e.enable_sampling and todo else None  # fail fast
    writer = event_log() if event_log is not None and todo else None
    try:
        for n, path in todo:
            _evaluate_checkpoint(config, trained, workdir, eval_folder, n, path, scorer, writer,
                                 progress=progress, on_batch=on_batch)
    finally:
        if writer is not None:
            writer.close()
    return [record_path(workdir, eval_folder, n) for n, _ in chosen]


def _evaluate_checkpoint(config, trained: Trained, workdir: str | Path, eval_folder: str, n: int,
                         path: Path, scorer, writer, *, progress: bool,
                         on_batch: BatchHook | None) -> None:
    """The record of checkpoint ``n`` (and its TensorBoard scalars when ``writer``)."""
    e, sde = config.eval, trained.sde
    folder = Path(workdir) / eval_folder
    model, step = trained.load_model(path)
    # the samples' network: config.sampling.precision and .compile (the solver stays float32)
    sample_precision = check_precision(config.sampling.get("precision", "fp32"),
                                       SAMPLING_PRECISIONS, "config.sampling.precision")
    sample_network = inference_network(config, model, sample_precision)
    score_fn = get_score_fn(sde, sample_network, train=False,
                            continuous=config.training.continuous)
    result, extra, sampling = {}, {}, None
    if e.enable_loss:
        extra["loss"] = eval_loss(config, model, trained.eval_step, trained.encode)
        result["eval_loss"] = extra["loss"]["mean"]
        log.info("ckpt %d: eval_loss %.5e", n, result["eval_loss"])
    if e.enable_bpd and trained.data_bound is not None:  # the LSGM bound, in data bits/dim
        out = folder / f"bpd_ckpt_{n}_{e.bpd_dataset}.npz"
        arrays, summary = trained.data_bound(model, progress)
        _write_npz(out, **arrays)
        extra["bpd"] = {**summary, "mean": summary["bpd"], "stderr": summary["bpd_stderr"],
                        "per_image": str(out)}
        result["bpd"], result["bpd_stderr"] = summary["bpd"], summary["bpd_stderr"]
        log.info("ckpt %d: %s data bits/dim bound %.4f +- %.4f", n, e.bpd_dataset,
                 result["bpd"], result["bpd_stderr"])
    elif e.enable_bpd:
        out = folder / f"bpd_ckpt_{n}_{e.bpd_dataset}.npz"
        # 'fp32' unless forced: the ODE and divergence never run in TF32 unless asked
        precision = check_precision(e.get("likelihood_precision", "fp32"), SAMPLING_PRECISIONS,
                                    "config.eval.likelihood_precision")
        bpd_model = network_precision(model, precision)
        bpd_score_fn = get_score_fn(sde, bpd_model, train=False,
                                    continuous=config.training.continuous)
        class_score_fn = None
        if read_num_classes(config):  # the conditional bits/dim, each image with its label
            def class_score_fn(labels: torch.Tensor) -> ScoreFn:
                return get_score_fn(sde, bpd_model, train=False,
                                    continuous=config.training.continuous, class_labels=labels)
        with precision_scope(precision):
            extra["bpd"] = eval_bpd(config, bpd_score_fn, sde, out, progress,
                                    class_score_fn=class_score_fn)
        extra["bpd"]["precision"] = precision
        result["bpd"], result["bpd_stderr"] = extra["bpd"]["mean"], extra["bpd"]["stderr"]
        log.info("ckpt %d: %s bits/dim %.4f +- %.4f", n, e.bpd_dataset, result["bpd"],
                 result["bpd_stderr"])
    if e.enable_sampling:
        with precision_scope(sample_precision):
            scores, sampling = eval_samples(config, trained, score_fn, scorer,
                                            folder / f"ckpt_{n}", progress=progress,
                                            on_batch=on_batch, model=sample_network)
        result.update(scores)
        if trained.not_applied is not None:
            sampling["sampler"]["not_applied"] = records.to_jsonable(trained.not_applied)
        extra.update(sample_metric=scorer.info(), resumed_batches=sampling["resumed_batches"],
                     sample_precision={"network": sample_precision,
                                       "key": "config.sampling.precision",
                                       "compile": bool(config.sampling.get("compile", False)),
                                       "solver": "float32 solver state"})
        log.info("ckpt %d: %s", n, ", ".join(f"{k} {v:.5g}" for k, v in scores.items()))
    record = records.evaluation_record(
        metrics=result, sampling=sampling,
        checkpoint={"n": n, "step": step, **records.file_checkpoint_id(path)},
        extra={**extra, **({"autoencoder": trained.autoencoder} if trained.autoencoder else {}),
               "seed": config.seed, "eval": e.to_dict(),
               "sampling_config": config.sampling.to_dict()})
    if writer is not None:  # before the record: a rerun redoes a checkpoint without one
        for name, value in result.items():
            writer.add_scalar(name, value, step)
    log.info("ckpt %d: record %s", n,
             records.write_record(record_path(workdir, eval_folder, n), record))
