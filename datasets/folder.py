"""Image-folder datasets: PNG/JPEG files, resized and centre-cropped, labels from sub-folders.

``root/`` may hold images directly (one class) or one sub-folder per class, in which case the
sorted sub-folder names are the classes. Images are decoded with Pillow when a batch asks for
them (:class:`FolderImages`), so a folder of any size costs no memory up front.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets.base import ArrayDataset, register_dataset

EXTENSIONS = (".png", ".jpg", ".jpeg")


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image resized (shorter side to ``size``, bicubic) and centre-cropped: (C, size, size)."""
    mode = {1: "L", 3: "RGB"}[channels]
    with Image.open(path) as im:
        im = im.convert(mode)
        w, h = im.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        im = im.crop((left, top, left + size, top + size))
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
    """Image files behind a tensor-like interface: ``images[index]`` decodes (B, C, S, S) uint8.

    Indexing with a tensor or list of indices decodes those files; a slice gives a lazy view.
    """

    dtype = torch.uint8

    def __init__(self, files: list[Path], size: int, channels: int) -> None:
        self.files, self.size, self.channels = list(files), size, channels

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
            return FolderImages(self.files[index], self.size, self.channels)
        indices = torch.as_tensor(index).reshape(-1).tolist()
        batch = np.stack([load_image(self.files[i], self.size, self.channels) for i in indices])
        return torch.from_numpy(batch)


@register_dataset("folder")
def load_folder(config, split: str) -> ArrayDataset:
    """Images under ``config.data.root`` as lazily decoded (N, C, S, S) uint8,
    S = ``data.image_size``.

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
    images = FolderImages(files, config.data.image_size, channels)
    return ArrayDataset(images, torch.tensor(labels), 256, classes)
