"""The data of latent training: batches of model-space latents z ~ q(z | x), encoded on the fly
or from posteriors cached once (latent score SDEs: LSGM, Vahdat, Kreis & Kautz 2021, eq. 3;
Rombach et al. 2022).

Either way the images come from the same seeded :class:`datasets.DataIterator` positions (the
same permutation, the same flips), and each step draws z = mean + exp(log_std) e with
e ~ N(0, I) from the run's generator (the training generator for training batches), so a cached
run and an on-the-fly run of the same seed see the same z (tested bitwise on CPU):

* on the fly (``data.cache = 'none'``): x in [0, 1] -> 2 x - 1 -> ``Autoencoder.encode``;
* cached (``data.cache`` 'auto' or a folder): the posterior (mean, log_std) of every image, and
  with ``data.random_flip`` of its mirror image too, is computed once into an
  :class:`datasets.cache.ArrayCache` array keyed by the autoencoder's weights and latent scale
  and the data (:func:`posterior_cache_key`). Row i holds (2c, h, w) or, with flips,
  (2c, h, 2w) = [posterior of x_i | posterior of mirror(x_i), mirrored]: the iterator's
  horizontal flip of a row then puts the mirror image's posterior in the first w columns, so
  the unchanged iterator does the augmentation.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from models.autoencoders import Autoencoder
from score_sde import datasets
from score_sde.datasets.base import ArrayDataset, DataIterator
from score_sde.datasets.cache import ArrayCache, cache_key
from score_sde.datasets.folder import CachedImages
from score_sde.training import distributed

log = logging.getLogger(__name__)

#: images encoded at once when filling the cache
ENCODE_BATCH = 256


def to_autoencoder_input(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (the data iterators') -> [-1, 1], the scaling every autoencoder here
    works in, whatever ``data.centered`` says (that key concerns pixel score models)."""
    return 2.0 * x - 1.0


def weights_hash(module: torch.nn.Module) -> str:
    """A sha256 of every tensor of ``module``'s state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_key(dataset: ArrayDataset) -> str:
    """What identifies a dataset's samples: an image folder's decode-cache key (files, sizes,
    times, settings), or a hash of the bytes of samples held in memory."""
    data = dataset.data
    if hasattr(data, "cache_key"):  # datasets.folder.FolderImages
        return data.cache_key()
    path = getattr(data, "path", None)
    if path is not None:  # datasets.folder.CachedImages: its name holds the decode-cache key
        return Path(path).name
    t = torch.as_tensor(data).contiguous()
    return hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode()
                          + t.view(torch.uint8).numpy().tobytes()).hexdigest()


def posterior_cache_key(ae: Autoencoder, dataset: ArrayDataset, flips: bool) -> str:
    """The cache key of the posteriors of ``dataset`` under ``ae``: its weights, latent scale
    and shift, the data and whether mirror images are included."""
    return cache_key("latent-posteriors", weights_hash(ae), ae.scale_factor, ae.shift,
                     data_key(dataset), len(dataset), bool(flips))


@torch.no_grad()
def _encode(ae: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    mean, log_std = ae.encode(to_autoencoder_input(x.to(ae.device)))
    return torch.cat([mean, log_std], dim=1)  # (B, 2c, h, w)


def cached_posteriors(ae: Autoencoder, dataset: ArrayDataset, folder: str | Path,
                      flips: bool) -> ArrayDataset:
    """``dataset`` as its cached posteriors (module docstring), built once in ``folder``; the
    labels, classes and notes are kept, ``levels`` is None (continuous values)."""
    c, h, w = ae.latent_shape(dataset.data.shape[1:])
    shape = (len(dataset), 2 * c, h, 2 * w if flips else w)
    key = posterior_cache_key(ae, dataset, flips)
    store = ArrayCache(folder)

    def fill(out: np.ndarray) -> None:
        log.info("latent cache: encoding %d images%s into %s", len(dataset),
                 " and their mirror images" if flips else "", store.path(key, "posteriors"))
        for start in range(0, len(dataset), ENCODE_BATCH):
            index = torch.arange(start, min(start + ENCODE_BATCH, len(dataset)))
            x = dataset.as_float(index)  # (B, C, H, W) in [0, 1]
            rows = _encode(ae, x)
            if flips:
                rows = torch.cat([rows, _encode(ae, x.flip(-1)).flip(-1)], dim=-1)
            out[start:start + len(index)] = rows.float().cpu().numpy()

    array = store.get_or_build(key, shape, np.float32, fill, name="posteriors")
    note = ("the autoencoder's posteriors (mean | log_std" + (", of the image | its mirror)"
                                                              if flips else ")"))
    return ArrayDataset(CachedImages(array, store.path(key, "posteriors")), dataset.labels,
                        None, dataset.classes, (*dataset.notes, note))


class LatentIterator:
    """Batches of model-space latents z ~ q(z | x) (B, c, h, w) (and labels, when the wrapped
    iterator yields them) from an iterator of images in [0, 1] or of cached posteriors.

    Args:
        inner: the :class:`datasets.DataIterator` (its position is this iterator's state).
        ae: the frozen autoencoder.
        generator: draws e of z = mean + exp(log_std) e.
        cached: ``inner`` yields cached posterior rows (:func:`cached_posteriors`).
    """

    def __init__(self, inner: DataIterator, ae: Autoencoder, generator: torch.Generator | None,
                 cached: bool) -> None:
        self.inner, self.ae, self.generator, self.cached = inner, ae, generator, cached
        self.latent_width = ae.latent_shape(
            inner.dataset.data.shape[1:])[-1] if not cached else None

    @property
    def dataset(self) -> ArrayDataset:
        """The wrapped iterator's dataset (images, or cached posteriors)."""
        return self.inner.dataset

    @property
    def num_workers(self) -> int:
        """The wrapped iterator's worker processes."""
        return self.inner.num_workers

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log_std) (B, c, h, w) of a batch of the wrapped iterator."""
        if self.cached:
            c2 = x.shape[1]
            w = x.shape[-1] // 2 if self.inner.random_flip else x.shape[-1]
            rows = x[..., :w]  # the (possibly mirrored) image's posterior
            return rows[:, :c2 // 2], rows[:, c2 // 2:]
        with torch.no_grad():
            return self.ae.encode(to_autoencoder_input(x))

    def __iter__(self) -> LatentIterator:
        return self

    def __next__(self):
        item = next(self.inner)
        x, y = item if isinstance(item, tuple) else (item, None)
        mean, log_std = self.posterior(x)
        e = torch.randn(mean.shape, generator=self.generator, device=mean.device,
                        dtype=mean.dtype)
        z = mean + torch.exp(log_std) * e  # the reparameterised draw (Kingma & Welling 2014)
        return z if y is None else (z, y)

    def state_dict(self) -> dict[str, int]:
        """The wrapped iterator's position."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position of :meth:`state_dict`."""
        self.inner.load_state_dict(state)

    def close(self) -> None:
        """Stop the wrapped iterator's worker processes."""
        self.inner.close()


def unsharded(dataset: ArrayDataset) -> ArrayDataset:
    """All of ``dataset``'s samples: a rank's :class:`training.distributed.ShardedDataset`
    reads zeros outside its rows of a global batch, which must not reach a shared cache."""
    if isinstance(dataset, distributed.ShardedDataset):
        return ArrayDataset(dataset.data, dataset.labels, dataset.levels, dataset.classes,
                            dataset.notes)
    return dataset


def latent_iterators(config, ae: Autoencoder, iterators: dict, generators: dict,
                     workdir: str | Path | None = None) -> dict[str, LatentIterator]:
    """The training loop's iterators ('train', 'eval') of images turned into iterators of
    latents drawn with the same-named generators; through the posterior cache of
    ``data.cache`` (:func:`datasets.cache_folder`) unless it is 'none'.

    Under torchrun the cache holds every image (not a rank's shard), built by rank 0 while the
    others wait, then read by all; each rank's batches draw the one-process run's z for its rows.

    Raises:
        ValueError: a cache with ``data.uniform_dequantization`` (the noise would be added to
            the posteriors; use ``data.cache = 'none'``).
    """
    folder = datasets.cache_folder(config, workdir)
    if folder is not None and config.data.uniform_dequantization:
        raise ValueError("config.data.uniform_dequantization dequantises the images before the "
                         "encoder, which cached posteriors cannot: set data.cache = 'none' "
                         "(encoded on the fly) or data.uniform_dequantization = False")
    ctx = distributed.context()
    out = {}
    for name, inner in iterators.items():
        if folder is not None:
            whole = unsharded(inner.dataset)
            distributed.on_main(
                lambda: cached_posteriors(ae, whole, folder, inner.random_flip),  # noqa: B023
                ctx, "building the latent posterior cache", ae.device)
            data = cached_posteriors(ae, whole, folder, inner.random_flip)
            inner.close()
            with warnings.catch_warnings():  # read-only memory map: batches are copies
                warnings.simplefilter("ignore", UserWarning)
                inner = DataIterator(data, inner.batch_size, seed=inner.seed,
                                     shuffle=inner.shuffle, random_flip=inner.random_flip,
                                     device=inner.device, with_labels=inner.with_labels)
        out[name] = LatentIterator(inner, ae, generators[name], cached=folder is not None)
    return out


__all__ = [
    "LatentIterator",
    "cached_posteriors",
    "data_key",
    "latent_iterators",
    "posterior_cache_key",
    "to_autoencoder_input",
    "unsharded",
    "weights_hash",
]
