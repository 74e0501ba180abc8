"""``main.py --mode likelihood`` on a latent config (``config.data.autoencoder.name != 'none'``):
the LSGM bound on the data's bits/dim (:func:`training.latent_bound.latent_bits_per_dim`),
never a latent-space number.

Per image of the split, the bound with K = ``data.autoencoder.bound_draws`` draws of z ~ q(z | x)
and the latent model's probability-flow ODE likelihood (options as the pixel run:
``training.inference.likelihood_options``). The decoder likelihood is chosen by
``data.autoencoder.decoder_variance``: ``'learned'`` (the own autoencoder's per-channel
variance), ``'fitted'`` (:func:`training.latent_bound.fit_decoder_variance` on the first
``decoder_fit_images`` images of ``decoder_fit_split``, which must differ from the evaluated
split) or ``'auto'`` (learned when the autoencoder has one, else fitted). Writes
``likelihood_{split}_step_{step}.npz`` (per image: ``bpd``, its Monte-Carlo ``stderr`` over the
draws, the three terms) and the ``.json`` summary (:func:`bound_summary`).
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from models.utils import get_score_fn
from score_sde import datasets
from score_sde.training import acceleration, classes
from score_sde.training.inference import (
    find_checkpoint,
    likelihood_options,
    load_ema_model,
    run_facts,
)
from score_sde.training.latent import (
    DECODER_VARIANCES,
    bound_settings,
    describe_autoencoder,
    load_config_autoencoder,
)
from score_sde.training.latent_bound import (
    DecoderLikelihood,
    fit_decoder_variance,
    latent_bits_per_dim,
)
from score_sde.training.sampling import get_sde
from score_sde.utils import atomic_write_bytes
from score_sde.utils.compile import inference_network
from score_sde.utils.precision import precision_scope

log = logging.getLogger(__name__)

#: the three terms of the bound, in the order recorded
TERMS = ("decoder", "latent_prior", "entropy")


def from_autoencoder_input(y: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]: the inverse of ``training.latent_data.to_autoencoder_input``, the
    scaling every autoencoder works in whatever ``data.centered`` says; the bound's data scaling
    (a = 2, c = -1: its log-determinant D log 2 for continuous data, its bins for quantised)."""
    return (y + 1.0) / 2.0


def _first(dataset, n: int):
    if not n or n >= len(dataset):
        return dataset
    return datasets.ArrayDataset(dataset.data[:n], dataset.labels[:n], dataset.levels,
                                 dataset.classes)


def decoder_likelihood(config, ae, settings: dict) -> DecoderLikelihood:
    """The decoder likelihood ``settings['decoder_variance']`` asks for: the autoencoder's
    learned variance, or one fitted on held-out images (z drawn from seed ``config.seed``)."""
    learned = isinstance(getattr(ae, "decoder_log_scale", None), torch.Tensor)
    variance = settings["decoder_variance"]
    if variance == "learned" or (variance == "auto" and learned):
        return DecoderLikelihood.learned(ae)
    if settings["fit_split"] == settings["split"]:
        raise ValueError(f"config.data.autoencoder.decoder_fit_split = "
                         f"{settings['fit_split']!r} is the evaluated split: fit the decoder "
                         "variance on held-out images (another split)")
    data = _first(datasets.get_dataset(config, settings["fit_split"]), settings["fit_images"])
    batches = datasets.DataIterator(data, config.eval.batch_size, shuffle=False,
                                    device=config.device)
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    fitted = fit_decoder_variance(ae, batches, from_autoencoder_input, generator=generator)
    return DecoderLikelihood(fitted.log_scale, "fitted",
                             {**fitted.details, "fit_split": settings["fit_split"]})


def bound_summary(bpd: np.ndarray, stderr: np.ndarray, terms: dict[str, np.ndarray],
                  info: dict) -> dict:
    """The bound's numbers over N images: the mean ``bpd``; ``bpd_stderr``, the standard error
    over images (std / sqrt(N): the spread of the images and the draws' noise); ``bpd_mc_stderr``,
    the Monte-Carlo error of the mean from the draws alone (sqrt(sum_i se_i^2) / N, NaN for
    K = 1); the mean of each term (bits/dim, summing to ``bpd``)."""
    n = len(bpd)
    return {"bpd": float(bpd.mean()),
            "bpd_stderr": float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "bpd_mc_stderr": float(np.sqrt(np.square(stderr).sum()) / n),
            "stderr_note": "bpd_stderr: over images (their spread and the draws' noise); "
                           "bpd_mc_stderr: the draws' Monte-Carlo noise of the mean alone",
            "terms_bpd": {k: float(v.mean()) for k, v in terms.items()},
            "num_draws": info["num_draws"], "levels": info["levels"],
            "precision": info["dtype"], "decoder": info["decoder"], "bound": info["bound"]}


def _write(stem: Path, arrays: dict[str, np.ndarray], summary: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(stem.with_suffix(".npz"), buffer.getvalue(),
                       what="the per-image bits/dim bound")
    atomic_write_bytes(stem.with_suffix(".json"), (json.dumps(summary, indent=2) + "\n").encode(),
                       what="the likelihood summary")


def bound_over_split(config, model, ae, split: str, *, max_images: int = 0,
                     progress: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """The data bits/dim bound of a latent model (``model``, its weights as loaded) on the
    images of ``split`` (the first ``max_images``; 0 = all): per-image arrays (``bpd``,
    ``stderr``, the terms, ``labels``) and the summary (:func:`bound_summary` with the NFE, the
    likelihood options, the autoencoder and the settings). Batch b's draws and probes come
    from one generator seeded with ``config.seed``; a class-conditional model is given each
    image's label (the bound is then on -log2 P(x | y) / D). Shared by ``--mode likelihood``
    and ``--mode eval``."""
    settings = bound_settings(config, split)
    sde = get_sde(config)
    precision = acceleration.likelihood_precision(config)  # 'fp32' unless forced
    model = inference_network(config, model, precision)
    with precision_scope(precision):  # TF32 off for the networks, the ODE and the divergence
        arrays, summary = _bound_loop(config, sde, model, ae, split, settings, max_images,
                                      progress)
    summary["network_precision"] = acceleration.precision_record(
        precision, "config.eval.likelihood_precision",
        "float32 ODE state and divergence, TF32 off")
    return arrays, summary


def _bound_loop(config, sde, model, ae, split: str, settings: dict, max_images: int,
                progress: bool) -> tuple[dict[str, np.ndarray], dict]:
    decoder = decoder_likelihood(config, ae, settings)
    dataset = _first(datasets.get_dataset(config, split), max_images)
    conditional = classes.read_num_classes(config) > 0
    if conditional:
        classes.check_dataset_classes(config, dataset, split)
    iterator = datasets.DataIterator(dataset, config.eval.batch_size, shuffle=False,
                                     device=config.device, with_labels=conditional)
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    options = likelihood_options(config)
    K = settings["num_draws"]
    out: dict[str, list] = {"bpd": [], "stderr": [], **{k: [] for k in TERMS}}
    nfe = 0
    for x in tqdm(iterator, total=iterator.batches_per_epoch, disable=not progress,
                  desc=f"bits/dim bound ({split})"):
        labels = None
        if conditional:  # the draws are draw-major (K B): label b repeats K times
            x, y = x
            labels = y.repeat(K)
        score_fn = get_score_fn(sde, model, train=False, continuous=config.training.continuous,
                                class_labels=labels)
        bpd, info = latent_bits_per_dim(sde, score_fn, ae, x, decoder, from_autoencoder_input,
                                        levels=dataset.levels, num_draws=K, generator=generator,
                                        **options)
        out["bpd"].append(bpd.cpu())
        out["stderr"].append(info["stderr"].cpu())
        for k in TERMS:
            out[k].append(info["terms"][k].cpu())
        nfe += info["nfe"]
    arrays = {k: torch.cat(v).double().numpy() for k, v in out.items()}
    summary = {
        "split": split, "num_images": len(arrays["bpd"]),
        **bound_summary(arrays["bpd"], arrays["stderr"], {k: arrays[k] for k in TERMS}, info),
        "nfe": nfe, "bpd_method": "latent_bound", "likelihood": options,
        "autoencoder": describe_autoencoder(ae), "bound_settings": settings,
    }
    if conditional:
        summary["class_labels"] = ("the data's own labels: a bound on -log2 P(x | y) / D, the "
                                   "latent prior given each image's class y")
    log.info("%s data bits/dim bound %.4f +- %.4f (images; draws alone +- %.4f) over %d images, "
             "K=%d, decoder %s (%d NFE)", split, summary["bpd"], summary["bpd_stderr"],
             summary["bpd_mc_stderr"], summary["num_images"], K, decoder.source, nfe)
    return {**arrays, "labels": dataset.labels.numpy()}, summary


def run_latent_likelihood(config, workdir: str | Path, eval_folder: str = "eval", *,
                          checkpoint: str = "", split: str = "", max_images: int = 0,
                          progress: bool = True) -> Path:
    """The data bits/dim bound of a latent model on a split (module docstring,
    :func:`bound_over_split`) from a checkpoint of ``workdir``.

    Returns:
        the ``.json`` summary's path.
    """
    split = split or config.eval.bpd_dataset
    bound_settings(config, split)  # at the door, before the checkpoint is read
    path = find_checkpoint(workdir, checkpoint)
    model, step = load_ema_model(config, path)
    ae = load_config_autoencoder(config, config.device)
    arrays, summary = bound_over_split(config, model, ae, split, max_images=max_images,
                                       progress=progress)
    summary = {**run_facts(config, path, step), **summary}
    stem = Path(workdir) / eval_folder / f"likelihood_{split}_step_{step}"
    _write(stem, arrays, summary)
    return stem.with_suffix(".json")


__all__ = ["DECODER_VARIANCES", "bound_over_split", "bound_settings", "bound_summary",
           "decoder_likelihood", "from_autoencoder_input", "run_latent_likelihood"]
