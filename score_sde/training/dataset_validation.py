"""Checks of dataset files before training or evaluation reads them: every split loads, its
samples have the config's shape and are finite, the training split fills a batch, and every image
of a folder dataset decodes; failures are a :class:`DatasetError` naming the dataset, the file or
value and what is expected.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from score_sde import datasets
from score_sde.training import classes


class DatasetError(ValueError):
    """A dataset that cannot be used: missing or corrupt files, or samples of the wrong shape."""


def validate_dataset(config, splits: tuple[str, ...] = ("train",),
                     verified: str | os.PathLike | None = None) -> None:
    """Load each split once and check its samples against the config.

    Image folders are checked file by file: every image is decoded once (a truncated JPEG passes
    PIL's ``verify``, not its decoder). ``verified`` names a JSON file remembering the files
    (path, size, mtime) already decoded, so a restarted run does not decode them again. Other
    datasets are read in full.

    Args:
        config: the experiment config (``data.*``, ``training.batch_size``).
        splits: the splits to check.
        verified: optional cache of decoded image files (written atomically).

    Raises:
        DatasetError: missing or corrupt files, or samples whose shape is not
            ``datasets.data_shape(config)``, naming the dataset, the file or value and what is
            expected; chained to the underlying error.
        ValueError: a class-conditional config (``model.num_classes = K > 0``) on a dataset
            without classes or with more than K (``training.classes.check_dataset_classes``).
    """
    name = config.data.dataset
    expected = datasets.data_shape(config)
    for split in splits:
        try:
            dataset = datasets.get_dataset(config, split)
            if name == "folder":
                _decode_images(dataset.data, verified)
        except DatasetError:
            raise
        except Exception as e:  # any reader's error on a bad file becomes one clear message
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DatasetError(f"dataset {name!r} ({split} split) cannot be used: "
                               f"{type(e).__name__}: {detail}") from e
        shape = tuple(dataset.data.shape[1:])
        if shape != expected:
            raise DatasetError(
                f"dataset {name!r} ({split} split) has samples of shape {shape}, but the config "
                f"expects {expected} (data.image_size / data.num_channels / data.dim)"
            )
        batch = config.training.batch_size
        if split == "train" and len(dataset) < batch:
            raise DatasetError(f"dataset {name!r} has {len(dataset)} training samples, fewer "
                               f"than config.training.batch_size={batch}")
        if isinstance(dataset.data, torch.Tensor) and dataset.data.is_floating_point() and \
                not bool(torch.isfinite(dataset.data).all()):
            raise DatasetError(f"dataset {name!r} ({split} split) contains NaN or inf values")
        classes.check_dataset_classes(config, dataset, split)


def _decode_images(images, verified: str | os.PathLike | None) -> None:
    """Decode each file of ``images`` (``datasets.folder.FolderImages``) as training will."""
    import json

    from score_sde.utils import atomic_write_bytes

    known: dict[str, list[int]] = {}
    if verified is not None and Path(verified).is_file():
        with contextlib.suppress(ValueError, OSError):
            known = dict(json.loads(Path(verified).read_text()))
    done = {}
    for i, path in enumerate(images.files):
        stat = path.stat()
        key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
        if known.get(key) != stamp:
            try:
                images[[i]]  # EXIF, alpha, resize: everything training does to it
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ...
                raise DatasetError(f"image {path} is corrupt or not an image: "
                                   f"{type(e).__name__}: {e}") from e
        done[key] = stamp
    if verified is not None and done != known:
        atomic_write_bytes(verified, json.dumps(done).encode())


__all__ = ["DatasetError", "validate_dataset"]
