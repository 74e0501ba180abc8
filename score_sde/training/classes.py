"""Class-conditional runs: the class and guidance keys, checked at the door, and the classes of
samples.

A run is class-conditional when ``config.model.num_classes = K > 0`` (``models.conditioning``):
training feeds the data's own labels to the network, sampling gives sample i the class
``classes[i mod len(classes)]`` (``config.sampling.classes``, default every class 0..K-1 in
turn), and ``config.sampling.cfg_scale`` turns on classifier-free guidance (Ho & Salimans 2022)
in DiT's convention, eps_u + s (eps_c - eps_u) (Peebles & Xie 2023), which is the
``samplers.ClassifierFreeGuidance`` weight w = s - 1. An unconditional run (K = 0) reads none of
these keys and is refused any of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch

from models.conditioning import read_num_classes


def dataset_num_classes(dataset) -> int:
    """Number of classes a dataset names (``ArrayDataset.classes``): 0 without classes, and for
    an image folder with no sub-folders (one unnamed class)."""
    classes = tuple(dataset.classes)
    return 0 if classes in ((), ("",)) else len(classes)


def check_dataset_classes(config, dataset, split: str = "train") -> None:
    """A class-conditional config (``model.num_classes = K > 0``) needs a dataset with classes,
    at most K of them (labels in [0, K)); nothing to check for an unconditional one.

    Raises:
        ValueError: naming ``config.model.num_classes``, the dataset, the split and its number of
            classes.
    """
    K = read_num_classes(config)
    if not K:
        return
    name, n = config.data.dataset, dataset_num_classes(dataset)
    if n == 0:
        raise ValueError(
            f"config.model.num_classes={K} asks for class-conditional training, but dataset "
            f"{name!r} ({split} split) has no classes (0); set config.model.num_classes=0 or "
            "use a dataset with labels (digits, CIFAR10, an image folder with one sub-folder "
            "per class, gmm)")
    if n > K:
        raise ValueError(
            f"dataset {name!r} ({split} split) has {n} classes, more than "
            f"config.model.num_classes={K}; set config.model.num_classes={n}")
    labels = dataset.labels
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise ValueError(
            f"dataset {name!r} ({split} split) has labels in [{int(labels.min())}, "
            f"{int(labels.max())}], outside [0, {K - 1}] (config.model.num_classes={K})")


def check_class_config(config) -> None:
    """``model.num_classes``, ``sampling.classes``, ``sampling.cfg_scale`` and
    ``sampling.cfg_official``, before any work.

    ``classes`` must be None or a non-empty sequence of integers in [0, K); ``cfg_scale`` None or
    a finite number s >= 0; both need a class-conditional model (K > 0). ``cfg_official`` (a bool)
    with a guidance scale needs data with at least 3 channels (it guides channels 0-2 only).

    Raises:
        TypeError, ValueError: naming the key, the value and what is allowed.
    """
    K = read_num_classes(config)
    sampling = config.get("sampling", {})
    classes = sampling.get("classes")
    if classes is not None:
        check_classes(classes, K, "config.sampling.classes")
    scale = sampling.get("cfg_scale")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, Real):
            raise TypeError(f"config.sampling.cfg_scale must be None or a finite number >= 0, "
                            f"got {type(scale).__name__} {scale!r}")
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"config.sampling.cfg_scale must be None or a finite number >= 0 "
                             f"(DiT's s: 1 = the conditional model alone), got {scale!r}")
        if not K:
            raise ValueError(
                f"config.sampling.cfg_scale={scale} needs a class-conditional model with a null "
                "label, but config.model.num_classes=0 (unconditional); train with "
                "config.model.num_classes=K > 0 or set config.sampling.cfg_scale=None")
    official = sampling.get("cfg_official", False)
    if not isinstance(official, bool):
        raise TypeError(f"config.sampling.cfg_official must be True or False, got "
                        f"{type(official).__name__} {official!r}")
    if official and scale is not None:
        channels = config.data.get("num_channels") if "dim" not in config.data else None
        if channels is None or channels < 3:
            found = (f"{channels} channel(s)" if channels is not None
                     else f"point data (data.dim={config.data.dim})")
            raise ValueError(
                "config.sampling.cfg_official=True guides channels 0-2 only (DiT's "
                f"forward_with_cfg) and needs images with at least 3 channels; the data has "
                f"{found}; set config.sampling.cfg_official=False")


def check_classes(classes, num_classes: int, name: str = "classes") -> tuple[int, ...]:
    """``classes`` as a tuple of ints, each in [0, num_classes).

    Raises:
        TypeError, ValueError: naming ``name``, the bad value and the valid range.
    """
    if not num_classes:
        raise ValueError(f"{name}={_show(classes)} given, but the model is unconditional "
                         "(config.model.num_classes=0): it has no classes to sample")
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or not classes:
        raise TypeError(f"{name} must be a non-empty list of class indices in "
                        f"[0, {num_classes - 1}], got {classes!r}")
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int)]
    if bad:
        raise TypeError(f"{name} must hold integers, got {bad[0]!r} in {_show(classes)}")
    out = [c for c in classes if not 0 <= c < num_classes]
    if out:
        raise ValueError(f"{name}={_show(classes)}: {out} outside [0, {num_classes - 1}] "
                         f"(config.model.num_classes={num_classes})")
    return tuple(int(c) for c in classes)


def _show(classes) -> str:
    return ",".join(map(str, classes)) if isinstance(classes, (list, tuple)) else repr(classes)


def sample_classes(config) -> tuple[int, ...] | None:
    """The classes samples cycle through: ``config.sampling.classes``, or every class 0..K-1;
    None for an unconditional model."""
    K = read_num_classes(config)
    if not K:
        return None
    classes = config.sampling.get("classes")
    if classes is None:
        return tuple(range(K))
    return check_classes(classes, K, "config.sampling.classes")


def sample_class_labels(classes: Sequence[int], start: int, count: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Labels (count,) int64 of samples start .. start + count - 1: sample i has class
    ``classes[i mod len(classes)]``."""
    table = torch.as_tensor(tuple(classes), dtype=torch.int64)
    index = torch.arange(start, start + count) % len(table)
    return table[index].to(device)


def guidance_weight(config) -> float | None:
    """w = s - 1 of ``samplers.ClassifierFreeGuidance`` from DiT's scale s =
    ``config.sampling.cfg_scale`` (None: no guidance)."""
    scale = config.sampling.get("cfg_scale")
    return None if scale is None else float(scale) - 1.0
