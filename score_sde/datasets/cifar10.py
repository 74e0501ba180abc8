"""CIFAR-10 from the official Python tarball (Krizhevsky 2009), without torchvision.

The tarball's batches are pickles; they are read with a restricted unpickler that admits only
the numpy array constructors, never arbitrary globals, straight from the archive (nothing is
extracted to disk).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from score_sde.datasets.base import ArrayDataset, register_dataset

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
FILENAME = "cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
_SPLITS = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}
# Globals a batch may reference: numpy's array reconstruction and, in batches re-pickled by
# Python 3 with protocol 2, ``_codecs.encode`` for bytes (a pure function); nothing else.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy array globals of ``_ALLOWED_GLOBALS``."""

    def find_class(self, module: str, name: str):
        """Resolve an allowed global; refuse every other one before it can run."""
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"CIFAR-10 batch references a forbidden global {module}.{name}"
        )


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(root: Path, url: str = URL, timeout: float = 30.0) -> Path:
    """Download the tarball into ``root`` (atomically: temporary file, then rename)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / FILENAME
    tmp = path.with_suffix(".part")
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def find_tarball(root: str | os.PathLike, *, allow_download: bool = True) -> Path:
    """Path of a verified ``cifar-10-python.tar.gz`` in ``root``, downloading it if missing.

    Raises:
        FileNotFoundError: offline and the file is absent (the message says where to put it).
        ValueError: the file's MD5 is not the official one.
    """
    root = Path(root)
    path = root / FILENAME
    if not path.is_file():
        if not allow_download:
            raise FileNotFoundError(f"{path} not found")
        try:
            download(root)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise FileNotFoundError(
                f"CIFAR-10 not found at {path.resolve()} and the download from {URL} failed "
                f"({e}). Download {FILENAME} on a machine with a network and put it in "
                f"{root.resolve()}/ (or set --config.data.root to its folder)."
            ) from None
    digest = _md5(path)
    if digest != MD5:
        raise ValueError(
            f"{path} is corrupt or not the official CIFAR-10 tarball: MD5 {digest}, expected "
            f"{MD5}. Delete it and download {URL} again."
        )
    return path


def read_tarball(path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 of ``split`` from the tarball."""
    if split not in _SPLITS:
        raise ValueError(f"Unknown CIFAR-10 split {split!r}; valid: {', '.join(_SPLITS)}")
    images, labels = [], []
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for name in _SPLITS[split]:
            if name not in members:
                raise ValueError(f"{path} has no member {name!r}: not a CIFAR-10 tarball")
            raw = tar.extractfile(members[name]).read()
            batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError(f"{name}: data has shape {data.shape}, expected (N, 3072)")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


@register_dataset("CIFAR10")
def load_cifar10(config, split: str) -> ArrayDataset:
    """CIFAR-10 ``split`` ('train' 50k, 'test' 10k) from ``config.data.root`` as (N, 3, 32, 32)."""
    if config.data.image_size != 32 or config.data.num_channels != 3:
        raise ValueError(
            "CIFAR-10 images are 32x32x3; got data.image_size="
            f"{config.data.image_size}, data.num_channels={config.data.num_channels}"
        )
    images, labels = read_tarball(find_tarball(config.data.root), split)
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), 256, CLASSES)
