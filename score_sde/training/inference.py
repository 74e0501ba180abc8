"""What ``main.py --mode sample`` and ``--mode likelihood`` run on a trained workdir.

Both load a training checkpoint (the latest by default) weights-only, swap the EMA weights in
as the reference does for sampling and evaluation, and write their results into
``workdir/<eval_folder>/``. With a class-conditional model (``model.num_classes > 0``) sampling
cycles through ``config.sampling.classes`` (guided when ``sampling.cfg_scale`` is set) and the
likelihood is the conditional one, given each image's own label (:data:`CONDITIONAL_BPD`).

A DiT config also takes an official DiT file (``DiT-XL-2-256x256.pt``, or an official training
checkpoint) as the checkpoint (:mod:`training.official_dit`). A latent config
(``data.autoencoder.name != 'none'``, :mod:`training.latent`) samples latents, writes them
(``latents.npz``) and decodes them with its autoencoder into the PNG grid and ``sample.npz``;
an ``sd_vae`` config without ``data.autoencoder.path`` stops at the latents and says so
(:data:`LATENT_STOP`).
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import likelihood
from models.checkpoint import load_model_state, load_reference_checkpoint, load_safetensors
from models.ema import ExponentialMovingAverage
from models.utils import create_model, get_score_fn
from score_sde import datasets
from score_sde.training import acceleration, checkpoints, classes
from score_sde.training.diffusers_pixel import LAYOUT as DIFFUSERS_LAYOUT
from score_sde.training.diffusers_pixel import is_diffusers_checkpoint, load_diffusers_pixel
from score_sde.training.latent import (
    can_decode,
    describe_autoencoder,
    get_model_inverse_scaler,
    is_latent,
    latent_data_shape,
    load_config_autoencoder,
)
from score_sde.training.loop import write_latents, write_samples
from score_sde.training.official_dit import LAYOUTS, load_official_dit, official_dit_layout
from score_sde.training.sampling import generate, get_sde, sampling_record
from score_sde.utils import __version__, atomic_write_bytes
from score_sde.utils.precision import precision_scope

log = logging.getLogger(__name__)

#: what the sampling record and log line of an SD-VAE config without the VAE on disk say
LATENT_STOP = ("not decoded: data.autoencoder.path is empty; download stabilityai/sd-vae-ft-ema "
               "(or -mse) to a local folder and set --config.data.autoencoder.path=<folder> to "
               "decode the latents into images")
#: what the likelihood record of a class-conditional model says of its labels
CONDITIONAL_BPD = ("the data's own labels: conditional bits/dim, -log2 p(x | y) / D, each image "
                   "given its class y")


def run_facts(config, path: Path, step: int) -> dict:
    """The facts every sample / likelihood record holds: the checkpoint file and its training
    step, the seed, the device and the versions that ran."""
    return {"checkpoint": str(path), "step": step, "seed": config.seed,
            "device": str(config.device),
            "versions": {"toolkit": __version__, "torch": torch.__version__}}


def likelihood_options(config) -> dict:
    """Every option of :func:`likelihood.log_likelihood` as a likelihood run uses it: the
    function's defaults, with ``config.eval.rtol`` / ``atol`` where the config sets them."""
    options = {name: p.default for name, p in
               inspect.signature(likelihood.log_likelihood).parameters.items()
               if p.kind is p.KEYWORD_ONLY and name != "generator"}
    options.update({k: config.eval[k] for k in ("rtol", "atol") if k in config.eval})
    return options


#: ``config.eval.bpd_method``: the probability-flow ODE (Song et al. 2021, App. D) or the
#: variational bound of a discrete DDPM model (Ho et al. 2020, eq. 5)
BPD_METHODS = ("ode", "vlb")


def vlb_options(config) -> dict:
    """The options of :func:`likelihood.vlb_bits_per_dim` a likelihood run uses: the spacing
    ``config.eval.vlb_spacing`` (None: every step of the table), the model's own variance
    (learned when it has v), the official tanh-approximated decoder, no clipping."""
    return {"spacing": config.eval.get("vlb_spacing"), "variance": None,
            "clip_denoised": False, "cdf": "tanh"}


def find_checkpoint(workdir: str | Path, checkpoint: str = "") -> Path:
    """The checkpoint file selected by ``checkpoint``.

    Args:
        workdir: the training workdir.
        checkpoint: '' = the latest (preemption or snapshot, whichever is further), 'meta' = the
            preemption checkpoint, an integer n = ``checkpoints/checkpoint_{n}.pth``, or a path
            (a file, or a diffusers pixel pipeline folder: :mod:`training.diffusers_pixel`).
    """
    workdir = Path(workdir)
    if checkpoint == "":
        path = checkpoints.latest_checkpoint(workdir)
        if path is None:
            raise FileNotFoundError(
                f"no checkpoint in {workdir} (looked in {checkpoints.META_DIR}/ and "
                f"{checkpoints.SNAPSHOT_DIR}/); train first with --mode train"
            )
        return path
    if checkpoint == "meta":
        path = checkpoints.meta_path(workdir)
    elif checkpoint.isdigit():
        path = checkpoints.snapshot_path(workdir, int(checkpoint))
    else:
        path = Path(checkpoint)
    if not path.is_file() and not is_diffusers_checkpoint(path):
        available = [str(n) for n, _ in checkpoints.list_snapshots(workdir)]
        raise FileNotFoundError(
            f"checkpoint {checkpoint!r} not found at {path}; snapshots in {workdir}: "
            f"{', '.join(available) or 'none'} (or 'meta', or '' for the latest)"
        )
    return path


def load_ema_model(config, path: str | Path) -> tuple[nn.Module, int]:
    """The model of ``config`` with the EMA weights of the checkpoint at ``path``, in eval mode.

    ``path`` may be one of ours or a reference training checkpoint (``module.`` prefix, numpy
    learning rate); both are read weights-only (``models.checkpoint.load_reference_checkpoint``).
    A ``.safetensors`` file is taken as a full state dict whose weights are used as they are
    (e.g. ``ema.safetensors`` of a ``models.convert`` output). Every tensor is checked against
    the model (dtype, shape, finiteness; ``models.checkpoint.check_tensors``).

    A diffusers UNet2DModel pipeline folder is loaded by
    :func:`training.diffusers_pixel.load_diffusers_pixel` (it samples on its scheduler's SDE).
    An official DiT file (:func:`training.official_dit.official_dit_layout`) is loaded into
    the config's DiT by ``models.dit_checkpoint.load_dit_checkpoint`` (its EMA weights, strictly;
    another architecture is refused naming both).

    Returns:
        (model on ``config.device``, the checkpoint's step, or 0 if it has none).
    """
    if is_diffusers_checkpoint(path):
        return load_diffusers_pixel(config, path), 0
    layout = official_dit_layout(path)
    if layout is not None:
        return load_official_dit(config, path, layout), 0
    model = create_model(config)
    if Path(path).suffix == ".safetensors":
        load_model_state(model, load_safetensors(path), source=path)
        return model.eval(), 0
    ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
    ckpt = load_reference_checkpoint(path, model, ema)
    ema.copy_to(model.parameters())
    return model.eval(), int(ckpt["step"] or 0)


def run_sample(config, workdir: str | Path, eval_folder: str = "eval", *, checkpoint: str = "",
               num_samples: int = 64, progress: bool = True) -> Path:
    """Draw ``num_samples`` with ``config.sampling`` into
    ``workdir/eval_folder/samples_step_{step}/`` (``sample.png``, ``sample.npz``, ``info.json``);
    for an official DiT file ``samples_{file stem}/``.

    Samples are drawn in batches of ``config.eval.batch_size`` from generator seed
    ``config.seed``, so the same flags give the same samples. A class-conditional model gives
    sample i the class ``classes[i mod len(classes)]`` (``config.sampling.classes``, default
    every class; ``sample.npz`` holds them as ``labels``, the grid has one class per row where
    that fits) and the record lists the classes and the guidance (DiT's s and w = s - 1).

    Latent-space data (:func:`latent_space`) stop at the latents: ``latents.npz`` (no PNG, no
    [0, 1] mapping), the record's ``latents`` entry and one log line (:data:`LATENT_STOP`).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    path = find_checkpoint(workdir, checkpoint)
    diffusers_folder = is_diffusers_checkpoint(path)
    layout = None if diffusers_folder else official_dit_layout(path)
    model, step = load_ema_model(config, path)
    sde = model.sde if diffusers_folder else get_sde(config)  # the scheduler's own table
    latent = is_latent(config)
    ae = load_config_autoencoder(config) if latent and can_decode(config) else None
    inverse_scaler = (lambda z: z) if latent else datasets.get_data_inverse_scaler(config)
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    batch = min(num_samples, config.eval.batch_size)
    sampled = classes.sample_classes(config)
    if config.sampling.get("cfg_scale") is not None and not config.model.get(
            "class_dropout_prob"):
        log.warning("config.sampling.cfg_scale is set but config.model.class_dropout_prob is "
                    "%r: unless the model was trained with label dropout, its null label (the "
                    "unconditional score of the guidance) is untrained",
                    config.model.get("class_dropout_prob"))
    chunks, labels, nfe = [], [], 0
    sample_shape = latent_data_shape(config)  # the latent's for a latent config
    for start in tqdm(range(0, num_samples, batch), disable=not progress, desc="sample"):
        shape = (min(batch, num_samples - start), *sample_shape)
        y = None if sampled is None else classes.sample_class_labels(
            sampled, start, shape[0], config.device)
        x, info = generate(config, sde, model, shape, inverse_scaler=inverse_scaler,
                           generator=generator, progress=progress, class_labels=y)
        chunks.append(x.cpu())
        if y is not None:
            labels.append(y.cpu())
        nfe += info["nfe"]  # counted score evaluations, summed over the batches
    named = layout is not None or diffusers_folder
    name = f"samples_{Path(path).stem}" if named else f"samples_step_{step}"
    folder = Path(workdir) / eval_folder / name  # made by the first write
    y_all = torch.cat(labels) if labels else None
    record = {**run_facts(config, path, step), "num_samples": num_samples, "batch_size": batch,
              "nfe": nfe, "sampling": {**sampling_record(config, info), "nfe": nfe}}
    if layout is not None:
        record["checkpoint_layout"] = LAYOUTS[layout]
    if diffusers_folder:
        record["checkpoint_layout"] = DIFFUSERS_LAYOUT
    if latent:
        z = torch.cat(chunks)
        out = write_latents(z, folder, y_all)
        record["latents"] = {"file": out.name, "decoded": ae is not None,
                             "autoencoder": describe_autoencoder(ae) if ae is not None else
                             {"name": config.data.autoencoder.name, "path": ""}}
        if ae is None:
            record["latents"]["note"] = LATENT_STOP
        else:  # decoded in chunks of eval.batch_size (an SD VAE at 256 px is memory-hungry)
            images = get_model_inverse_scaler(config, ae)(z.cpu())  # chunks on the device
            write_samples(images, folder, class_labels=y_all)
    else:
        write_samples(torch.cat(chunks), folder, class_labels=y_all)
    atomic_write_bytes(folder / "info.json", (json.dumps(record, indent=2) + "\n").encode(),
                       what="the sampling record")
    log.info("%d samples from %s (step %d, %d NFE) in %s", num_samples, path, step, nfe, folder)
    if latent:
        log.info("latents written to %s; %s", out,
                 LATENT_STOP if ae is None else f"decoded by {describe_autoencoder(ae)}")
    return folder


def write_likelihood_record(stem: Path, bpd: np.ndarray, labels: np.ndarray,
                            summary: dict) -> None:
    """``stem.npz`` (per-image ``bpd`` (N,) and ``labels`` (N,)) then the ``stem.json`` summary,
    each atomically; the summary is written last, so it exists only beside its values.

    Raises:
        utils.WriteError: a file could not be written (e.g. a full disk); none is partial.
    """
    buffer = io.BytesIO()
    np.savez(buffer, bpd=bpd, labels=labels)
    atomic_write_bytes(stem.with_suffix(".npz"), buffer.getvalue(),
                       what="the per-image bits/dim")
    atomic_write_bytes(stem.with_suffix(".json"), (json.dumps(summary, indent=2) + "\n").encode(),
                       what="the likelihood summary")


def run_likelihood(config, workdir: str | Path, eval_folder: str = "eval", *,
                   checkpoint: str = "", split: str = "", max_images: int = 0,
                   progress: bool = True) -> Path:
    """Bits/dim of a dataset split through the probability-flow ODE (Song et al. 2021, App. D)
    or, with ``config.eval.bpd_method = 'vlb'``, the variational bound of a discrete DDPM model
    (:func:`likelihood.vlb_bits_per_dim` on the respacing ``config.eval.vlb_spacing``; the
    quantised data itself, its decoder of L levels).

    ODE: quantised data with L levels (256 for CIFAR-10, 17 for the 8x8 digits) is uniformly
    dequantised, v = (k + u) / L, and bits/dim = -(log p_y(y) + D log a) / (D log 2) + log2 L
    with y = a v + c in model space (the reference's formula for L = 256); point data gets
    -log2 p(x) / D. The summary names the method (``bpd_method``) and its options and NFE,
    and the precision it ran in (``config.eval.likelihood_precision``, 'fp32' unless forced:
    the network in fp32 and the ODE and divergence with TF32 off, whatever the training
    precision was).
    Writes ``likelihood_{split}_step_{step}.npz`` (per-image ``bpd``) and a
    ``.json`` summary into ``workdir/eval_folder/``. A class-conditional model is given each
    image's own label: the bits/dim are the conditional -log2 p(x | y) / D, and the summary
    says so under ``class_labels``. A latent config (``data.autoencoder.name != 'none'``)
    reports the LSGM bound on the data's bits/dim instead
    (:func:`training.latent_likelihood.run_latent_likelihood`).

    Args:
        split: default ``config.eval.bpd_dataset``.
        max_images: evaluate only the first ``max_images`` (0 = the whole split).
    """
    if is_latent(config):  # the LSGM bound on the data's bits/dim, never a latent-space number
        from score_sde.training.latent_likelihood import run_latent_likelihood

        return run_latent_likelihood(config, workdir, eval_folder, checkpoint=checkpoint,
                                     split=split, max_images=max_images, progress=progress)
    split = split or config.eval.bpd_dataset
    method = config.eval.get("bpd_method", "ode")
    if method not in BPD_METHODS:
        raise ValueError(f"config.eval.bpd_method={method!r}; valid: {', '.join(BPD_METHODS)}")
    path = find_checkpoint(workdir, checkpoint)
    model, step = load_ema_model(config, path)
    sde = model.sde if is_diffusers_checkpoint(path) else get_sde(config)
    precision = acceleration.likelihood_precision(config)  # 'fp32' unless forced
    model = acceleration.inference_network(config, model, precision)
    score_fn = get_score_fn(sde, model, train=False, continuous=config.training.continuous)
    dataset = datasets.get_dataset(config, split)
    if max_images:
        dataset = datasets.ArrayDataset(dataset.data[:max_images], dataset.labels[:max_images],
                                        dataset.levels, dataset.classes)
    conditional = classes.read_num_classes(config) > 0
    if conditional:
        classes.check_dataset_classes(config, dataset, split)
    iterator = datasets.DataIterator(
        dataset, config.eval.batch_size, seed=config.seed, shuffle=False,
        uniform_dequantization=dataset.levels is not None and method == "ode",
        device=config.device, with_labels=conditional)
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    a, _ = likelihood.affine_scaler(inverse_scaler)
    offset = math.log2(dataset.levels) if dataset.levels is not None else 0.0
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    options = likelihood_options(config) if method == "ode" else vlb_options(config)
    bpds, nfe = [], 0
    for v in tqdm(iterator, total=iterator.batches_per_epoch, disable=not progress,
                  desc=f"bits/dim ({split})"):
        batch_score_fn = score_fn
        if conditional:  # the score of p_t(x | y) with each image's label y
            v, y = v
            batch_score_fn = get_score_fn(sde, model, train=False,
                                          continuous=config.training.continuous, class_labels=y)
        if method == "vlb":  # the data on its grid in [0, 1], scaled inside
            with precision_scope(precision):
                bpd, info = likelihood.vlb_bits_per_dim(sde, batch_score_fn, v, inverse_scaler,
                                                        levels=dataset.levels,
                                                        generator=generator, **options)
            bpds.append(bpd.cpu())
            options["variance"] = info["variance"]  # as it ran: learned when the model has v
        else:
            with precision_scope(precision):  # TF32 off for the ODE and divergence
                logp, info = likelihood.log_likelihood(sde, batch_score_fn, scaler(v),
                                                       generator=generator, **options)
            D = v[0].numel()
            bpds.append((-(logp + D * math.log(abs(a))) / (D * math.log(2)) + offset).cpu())
        nfe += info["nfe"]
    bpd = torch.cat(bpds).double().numpy()
    stem = Path(workdir) / eval_folder / f"likelihood_{split}_step_{step}"
    summary = {
        **run_facts(config, path, step), "split": split, "num_images": len(bpd),
        "bpd": float(bpd.mean()), "bpd_stderr": float(bpd.std(ddof=1) / math.sqrt(len(bpd)))
        if len(bpd) > 1 else float("nan"),
        "levels": dataset.levels, "nfe": nfe, "bpd_method": method, "likelihood": options,
        "precision": {**acceleration.precision_record(
            precision, "config.eval.likelihood_precision",
            "float32 ODE state and divergence, TF32 off"),
            "compile": bool(config.sampling.get("compile", False)),
            "training_precision": config.training.get("precision", "auto")},
    }
    if method == "vlb":
        options["steps"] = len(info["timesteps"])
        summary["bound"] = info["bound"]
    if conditional:
        summary["class_labels"] = CONDITIONAL_BPD
    write_likelihood_record(stem, bpd, dataset.labels.numpy(), summary)
    log.info("%s bits/dim (%s) %.4f +- %.4f over %d images (step %d, %d NFE)", split, method,
             summary["bpd"], summary["bpd_stderr"], len(bpd), step, nfe)
    return stem.with_suffix(".json")
