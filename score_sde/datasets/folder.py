"""Image-folder datasets: PNG/JPEG files, resized and centre-cropped, labels from sub-folders.

``root/`` may hold images directly (one class) or one sub-folder per class, in which case the
sorted sub-folder names are the classes. Images are decoded with Pillow when a batch asks for
them (:class:`FolderImages`), so a folder of any size costs no memory up front.

Bit depth: 8-bit images are read as uint8 levels 0..255; 16-bit grey-scale PNGs (Pillow mode
``I;16``) at their depth as int32 levels 0..65535 (``Image.convert('L')`` would clip them at 255,
i.e. white). A folder has one depth: mixed depths, and 16-bit colour PNGs (which Pillow decodes
at 8 bits), are refused with an error naming the files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from score_sde.datasets.base import ArrayDataset, register_dataset

EXTENSIONS = (".png", ".jpg", ".jpeg")
#: Pillow modes of 16-bit grey-scale images (a 16-bit PNG opens as ``I;16``; ``I`` in old Pillow).
GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
#: Storage dtype of the decoded levels per bit depth.
LEVEL_DTYPES = {8: torch.uint8, 16: torch.int32}


def bit_depth(path: Path) -> int:
    """Bits per sample of an image file, 8 or 16, from its header (nothing is decoded).

    Raises:
        ValueError: for a 16-bit colour PNG, which Pillow decodes at 8 bits only.
    """
    with Image.open(path) as im:
        if im.mode in GREY16_MODES:
            return 16
        rawmode = im.tile[0][3] if im.tile else ""
        rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
        if isinstance(rawmode, str) and rawmode.endswith(";16B"):
            raise ValueError(f"{path} is a 16-bit colour image ({im.mode} with 16 bits per "
                             f"channel), which Pillow reads at 8 bits only; convert it to 8-bit "
                             f"colour or to 16-bit grey-scale")
        return 8


def load_image(path: Path, size: int, channels: int, bits: int = 8) -> np.ndarray:
    """One image resized (shorter side to ``size``, bicubic) and centre-cropped: (C, size, size)
    integer levels, uint8 0..255 for ``bits=8``, int32 0..65535 for ``bits=16``."""
    with Image.open(path) as im:
        if bits == 16:
            if im.mode not in GREY16_MODES:
                raise ValueError(f"{path} is not a 16-bit grey-scale image (mode {im.mode}) but "
                                 f"the folder is read at 16 bits")
            im = im.convert("F")  # exact for 0..65535; resampled in float, rounded below
        else:
            if im.mode in GREY16_MODES:
                raise ValueError(f"{path} is a 16-bit image ({im.mode}) but the folder is read "
                                 f"at 8 bits")
            im = im.convert({1: "L", 3: "RGB"}[channels])
        w, h = im.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        if bits == 16:
            # Bicubic overshoots: round and clip back onto the 16-bit grid, as Pillow does at 8.
            array = np.clip(np.rint(np.asarray(im, dtype=np.float32)), 0, 65535).astype(np.int32)
            return np.repeat(array[None], channels, axis=0)  # grey to C channels, as 'RGB'
        array = np.asarray(im, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def scan(root: Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Image files under ``root`` with their labels and the class names."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(d.name, d) for d in subdirs] if subdirs else [("", root)]
    files, labels = [], []
    for label, (_, folder) in enumerate(groups):
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in EXTENSIONS and path.is_file():
                files.append(path)
                labels.append(label)
    return files, labels, tuple(name for name, _ in groups)


class FolderImages:
    """Image files behind a tensor-like interface: ``images[index]`` decodes (B, C, S, S) levels
    (uint8 for 8-bit files, int32 for 16-bit ones; see :func:`load_image`).

    Indexing with a tensor or list of indices decodes those files; a slice gives a lazy view.
    """

    def __init__(self, files: list[Path], size: int, channels: int, bits: int = 8) -> None:
        self.files, self.size, self.channels, self.bits = list(files), size, channels, bits
        self.dtype = LEVEL_DTYPES[bits]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, C, S, S)."""
        return (len(self.files), self.channels, self.size, self.size)

    def dim(self) -> int:
        """4, as an image tensor."""
        return 4

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return FolderImages(self.files[index], self.size, self.channels, self.bits)
        indices = torch.as_tensor(index).reshape(-1).tolist()
        batch = np.stack([load_image(self.files[i], self.size, self.channels, self.bits)
                          for i in indices])
        return torch.from_numpy(batch)


def folder_bit_depth(files: list[Path]) -> int:
    """The one bit depth (8 or 16) of ``files``, read from their headers; mixed depths raise a
    ValueError naming a file of each."""
    first = {}
    for path in files:
        first.setdefault(bit_depth(path), path)
    if len(first) > 1:
        raise ValueError(f"images of mixed bit depth: {first[8]} is 8-bit, {first[16]} is 16-bit; "
                         f"convert them to one depth")
    return next(iter(first))


@register_dataset("folder")
def load_folder(config, split: str) -> ArrayDataset:
    """Images under ``config.data.root`` as lazily decoded (N, C, S, S) integer levels,
    S = ``data.image_size``: uint8 with 256 levels for 8-bit files, int32 with 65536 levels for
    16-bit grey-scale PNGs (the dataset's ``levels`` and summary give the depth).

    A folder has one split; 'train' and 'test' both read it (point ``data.root`` elsewhere for
    held-out data).
    """
    if split not in ("train", "test"):
        raise ValueError(f"Unknown split {split!r}; valid: train, test")
    root = Path(config.data.root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root.resolve()} does not exist (data.root)")
    channels = config.data.num_channels
    if channels not in (1, 3):
        raise ValueError(f"data.num_channels must be 1 or 3 for images, got {channels}")
    files, labels, classes = scan(root)
    if not files:
        raise FileNotFoundError(
            f"no {'/'.join(EXTENSIONS)} images under {root.resolve()} (data.root)"
        )
    bits = folder_bit_depth(files)
    images = FolderImages(files, config.data.image_size, channels, bits)
    return ArrayDataset(images, torch.tensor(labels), 2**bits, classes)
