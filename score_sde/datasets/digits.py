"""The embedded default: scikit-learn's bundled 8x8 handwritten digits (no download).

1797 grey-scale images with 17 intensity levels (0..16), mapped to [0, 1]. The first 1500 are
the 'train' split, the remaining 297 'test'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from score_sde.datasets.base import ArrayDataset, register_dataset

N_TRAIN = 1500


@register_dataset("digits")
def load_digits(config, split: str) -> ArrayDataset:
    """The 8x8 digits of ``split`` as (N, 1, S, S) floats in [0, 1], S = ``data.image_size``.

    Sizes other than 8 are bilinear resamplings of the 8x8 images.
    """
    from sklearn.datasets import load_digits as sklearn_digits  # a slow import, kept local

    if split not in ("train", "test"):
        raise ValueError(f"Unknown digits split {split!r}; valid: train, test")
    if config.data.num_channels != 1:
        raise ValueError(f"digits are grey-scale: data.num_channels must be 1, got "
                         f"{config.data.num_channels}")
    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    part = slice(0, N_TRAIN) if split == "train" else slice(N_TRAIN, None)
    images, labels = images[part], labels[part]
    size = config.data.image_size
    levels = 17
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        levels = None  # resampled values are no longer on the 17-level grid
    return ArrayDataset(images.clamp(0, 1), labels, levels, tuple(str(i) for i in range(10)))
