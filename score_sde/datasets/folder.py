"""Image-folder datasets: image files read as displayed, resized and centre-cropped, labels from
sub-folders.

``root/`` may hold images directly (one class) or one sub-folder per class, in which case the
sorted sub-folder names are the classes. Images are decoded with Pillow when a batch asks for
them (:class:`FolderImages`), so a folder of any size costs no memory up front; the decode cache
(:func:`cached`) stores them decoded once, memory-mapped.

Images are read as a viewer displays them: EXIF orientation applied (a phone photo with tag 6
is turned upright), alpha (RGBA, LA, and palette or grey images with a transparency entry)
composited over ``config.data.alpha_background``, and every still-image format Pillow reads by its
usual extensions (:data:`EXTENSIONS`; a GIF's first frame). Other files are skipped and counted by
extension in the dataset summary, as are the images that had alpha.

Bit depth: 8-bit images are read as uint8 levels 0..255; 16-bit grey-scale PNGs (Pillow mode
``I;16``) at their depth as int32 levels 0..65535 (``Image.convert('L')`` would clip them at 255,
i.e. white). A folder has one depth: mixed depths, and 16-bit colour PNGs (which Pillow decodes
at 8 bits), are refused with an error naming the files.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from score_sde.datasets.base import ArrayDataset, register_dataset
from score_sde.datasets.cache import ArrayCache, cache_key
from score_sde.datasets.workers import as_is, one_thread

log = logging.getLogger(__name__)

#: The file extensions read as images (lower case): PNG, JPEG, WebP, BMP, TIFF, GIF (first frame).
EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
#: Pillow modes with an alpha band (palette and grey images may also carry a transparency entry).
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
#: The default background of transparent pixels: white, as a viewer shows them.
WHITE = (255, 255, 255)
#: Bump when decoding changes pixels, so that older cache entries are not read.
DECODER_VERSION = 1
#: Pillow modes of 16-bit grey-scale images (a 16-bit PNG opens as ``I;16``; ``I`` in old Pillow).
GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
#: Storage dtype of the decoded levels per bit depth.
LEVEL_DTYPES = {8: torch.uint8, 16: torch.int32}


def has_alpha(im: Image.Image) -> bool:
    """Whether an opened image has transparency: an alpha band or a transparency entry."""
    return im.mode in ALPHA_MODES or "transparency" in im.info


def header(path: Path) -> tuple[int, bool]:
    """(bits per sample, 8 or 16; has alpha) of an image file, from its header.

    Raises:
        ValueError: for a 16-bit colour PNG, which Pillow decodes at 8 bits only, and for a file
            whose header cannot be read (naming it as corrupt).
    """
    try:
        with Image.open(path) as im:
            mode, tile, alpha = im.mode, im.tile, has_alpha(im)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... on bad headers
        raise ValueError(f"image {path} is corrupt or not an image: {type(e).__name__}: {e}") \
            from e
    if mode in GREY16_MODES:
        return 16, alpha
    rawmode = tile[0][3] if tile else ""
    rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
    if isinstance(rawmode, str) and rawmode.endswith(";16B"):
        raise ValueError(f"{path} is a 16-bit colour image ({mode} with 16 bits per channel), "
                         f"which Pillow reads at 8 bits only; convert it to 8-bit colour or to "
                         f"16-bit grey-scale")
    return 8, alpha


def displayed(im: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """``im`` as a viewer shows it: EXIF orientation applied and alpha composited over
    ``background`` (an RGB triple in 0..255), giving an RGB image; others keep their mode."""
    im = ImageOps.exif_transpose(im)
    if not has_alpha(im):
        return im
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba
                                 ).convert("RGB")


def load_image(path: Path, size: int, channels: int, bits: int = 8,
               background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """One image as displayed (:func:`displayed`), resized (shorter side to ``size``, bicubic) and
    centre-cropped: (C, size, size) integer levels, uint8 0..255 for ``bits=8``, int32
    0..65535 for ``bits=16``.

    Raises:
        ValueError: naming ``path``, when it cannot be decoded or has the wrong bit depth.
    """
    try:
        with Image.open(path) as im:
            return _levels(path, displayed(im, background), size, channels, bits)
    except ValueError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError ... on a truncated or bad file
        raise ValueError(f"image {path} cannot be decoded: {type(e).__name__}: {e}") from e


def _levels(path: Path, im: Image.Image, size: int, channels: int, bits: int) -> np.ndarray:
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


def scan(root: Path) -> tuple[list[Path], list[int], tuple[str, ...], Counter]:
    """Image files under ``root`` with their labels, the class names and the count of the other
    (skipped) files by lower-case extension ('' for none; hidden files are not counted). Beside
    class sub-folders, files directly in ``root`` belong to no class and are skipped too."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(d.name, d) for d in subdirs] if subdirs else [("", root)]
    files, labels, skipped = [], [], Counter()
    if subdirs:
        skipped.update(p.suffix.lower() for p in root.iterdir()
                       if p.is_file() and not p.name.startswith("."))
    for label, (_, folder) in enumerate(groups):
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() in EXTENSIONS:
                files.append(path)
                labels.append(label)
            else:
                skipped[path.suffix.lower()] += 1
    return files, labels, tuple(name for name, _ in groups), skipped


def skipped_note(skipped: Counter) -> str | None:
    """``'skipped 3 files: .txt x2, .heic x1'`` (most frequent first), or None."""
    if not skipped:
        return None
    total = sum(skipped.values())
    kinds = ", ".join(f"{ext or '(no extension)'} x{n}"
                      for ext, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"skipped {total} file{'s' * (total != 1)}: {kinds}"


class FolderImages:
    """Image files behind a tensor-like interface: ``images[index]`` decodes (B, C, S, S) levels
    (uint8 for 8-bit files, int32 for 16-bit ones; see :func:`load_image`).

    Indexing with a tensor or list of indices decodes those files; a slice gives a lazy view.
    """

    def __init__(self, files: list[Path], size: int, channels: int, bits: int = 8,
                 background: tuple[int, int, int] = WHITE) -> None:
        self.files, self.size, self.channels, self.bits = list(files), size, channels, bits
        self.background = tuple(int(v) for v in background)
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
            return FolderImages(self.files[index], self.size, self.channels, self.bits,
                                self.background)
        indices = torch.as_tensor(index).reshape(-1).tolist()
        batch = np.stack([load_image(self.files[i], self.size, self.channels, self.bits,
                                     self.background) for i in indices])
        return torch.from_numpy(batch)

    def cache_key(self) -> str:
        """A hash of everything the decoded pixels depend on: each file's path, size and
        modification time, and every setting (size, channels, depth, resampling, orientation,
        alpha background, decoder version)."""
        stats = [(str(p.resolve()), *((s := p.stat()).st_size, s.st_mtime_ns)) for p in self.files]
        settings = dict(size=self.size, channels=self.channels, bits=self.bits,
                        resample="bicubic", crop="centre", orientation="exif",
                        alpha_background=self.background, decoder=DECODER_VERSION)
        return cache_key("image-folder", settings, stats)


class CachedImages:
    """Decoded images in a memory-mapped (N, C, S, S) array (uint8, or uint16 for 16-bit files)
    behind the same interface as :class:`FolderImages`: ``images[index]`` gives a tensor of
    levels (uint8, or int32 for 16 bits) without decoding anything. A float32 array (cached
    latent posteriors, ``training.latent_data``) gives float32 rows."""

    def __init__(self, array: np.ndarray, path: Path | None = None) -> None:
        self.array, self.path = array, path  # path: the cache file (logged at the start)
        self.dtype = {np.dtype(np.uint8): torch.uint8,
                      np.dtype(np.float32): torch.float32}.get(array.dtype, torch.int32)

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, C, S, S)."""
        return tuple(self.array.shape)

    def dim(self) -> int:
        """4, as an image tensor."""
        return 4

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getstate__(self) -> dict:
        # Pickled for a spawned worker: the whole cached file by its path, not its bytes.
        whole = self.path is not None and np.load(self.path, mmap_mode="r").shape == self.shape
        return {"path": self.path} if whole else {"path": None, "array": np.asarray(self.array)}

    def __setstate__(self, state: dict) -> None:
        array = state.get("array")
        self.__init__(np.load(state["path"], mmap_mode="r") if array is None else array,
                      state["path"])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return CachedImages(self.array[index], None)
        indices = torch.as_tensor(index).reshape(-1).numpy()
        batch = self.array[indices]  # a copy in memory: (B, C, S, S)
        return torch.from_numpy(batch.astype(np.int32) if batch.dtype == np.uint16 else batch)


class _Decoded(torch.utils.data.Dataset):
    """Chunk k of the files -> (k, decoded levels of its files)."""

    def __init__(self, images: FolderImages, chunk: int) -> None:
        self.images, self.chunk = images, chunk

    def __len__(self) -> int:
        return -(-len(self.images) // self.chunk)

    def __getitem__(self, k: int):
        rows = range(k * self.chunk, min((k + 1) * self.chunk, len(self.images)))
        return k, self.images[list(rows)].numpy()


def decode_all(images: FolderImages, out: np.ndarray, num_workers: int = 0,
               chunk: int = 64) -> None:
    """Decode every file of ``images`` into ``out`` (N, C, S, S), with ``num_workers`` worker
    processes (0: in this one)."""
    loader = DataLoader(_Decoded(images, chunk), batch_size=None, num_workers=num_workers,
                        collate_fn=as_is, worker_init_fn=one_thread)
    for k, levels in loader:
        out[k * chunk:k * chunk + levels.shape[0]] = levels


def cached(dataset: ArrayDataset, folder: str | Path, num_workers: int = 0) -> ArrayDataset:
    """``dataset`` (lazily decoded :class:`FolderImages`) read from the decode cache in
    ``folder``: decoded once, at the source bit depth (uint8, or uint16 for 16-bit files), into
    a memory-mapped array keyed by :meth:`FolderImages.cache_key`, written atomically; a later
    call with the same files and settings reads it without decoding a file.

    A folder whose decoded array would not fit in the free space of ``folder`` (with 10% to
    spare) stays decoded on demand, with a warning.
    """
    images = dataset.data
    dtype = np.uint8 if images.bits == 8 else np.uint16
    store = ArrayCache(folder)
    key = images.cache_key()
    array = store.get(key, images.shape, dtype, name="images")
    if array is None:
        nbytes = int(np.prod(images.shape)) * np.dtype(dtype).itemsize
        Path(folder).mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if nbytes > 0.9 * free:
            log.warning("decode cache off: the decoded images need %.1f GB, %s has %.1f GB free "
                        "(data.cache)", nbytes / 1e9, folder, free / 1e9)
            return dataset
        log.info("decode cache: decoding %d images into %s", len(images),
                 store.path(key, "images"))
        array = store.get_or_build(key, images.shape, dtype,
                                   lambda out: decode_all(images, out, num_workers), name="images")
    return ArrayDataset(CachedImages(array, store.path(key, "images")), dataset.labels,
                        dataset.levels, dataset.classes, dataset.notes)


def alpha_background(config) -> tuple[int, int, int]:
    """``config.data.alpha_background`` (default white) as an RGB triple.

    Raises:
        ValueError: not three ints in 0..255.
    """
    background = config.data.get("alpha_background", WHITE)
    if len(tuple(background)) != 3 or not all(
            isinstance(v, int) and 0 <= v <= 255 for v in background):
        raise ValueError(f"config.data.alpha_background must be an RGB triple of ints in 0..255, "
                         f"got {background!r}")
    return tuple(background)


@register_dataset("folder")
def load_folder(config, split: str) -> ArrayDataset:
    """Images under ``config.data.root`` as lazily decoded (N, C, S, S) integer levels,
    S = ``data.image_size``: uint8 with 256 levels for 8-bit files, int32 with 65536 levels for
    16-bit grey-scale PNGs (the dataset's ``levels`` and summary give the depth). Images are
    read as displayed (EXIF orientation, alpha over ``data.alpha_background``); the summary
    counts the skipped non-image files by extension and the images that had alpha.

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
    background = alpha_background(config)
    files, labels, classes, skipped = scan(root)
    if not files:
        raise FileNotFoundError(
            f"no {'/'.join(EXTENSIONS)} images under {root.resolve()} (data.root)"
            + (f"; {skipped_note(skipped)}" if skipped else ""))
    bits, with_alpha = folder_header(files)
    images = FolderImages(files, config.data.image_size, channels, bits, background)
    notes = [note for note in (skipped_note(skipped),) if note]
    if with_alpha:
        notes.append(f"{with_alpha} with alpha composited over RGB {background}")
    return ArrayDataset(images, torch.tensor(labels), 2**bits, classes, tuple(notes))


def folder_header(files: list[Path]) -> tuple[int, int]:
    """(the one bit depth, 8 or 16; the number of images with alpha) of ``files``, read from
    their headers; mixed depths raise a ValueError naming a file of each."""
    first, with_alpha = {}, 0
    for path in files:
        bits, alpha = header(path)
        first.setdefault(bits, path)
        with_alpha += alpha
    if len(first) > 1:
        raise ValueError(f"images of mixed bit depth: {first[8]} is 8-bit, {first[16]} is 16-bit; "
                         f"convert them to one depth")
    return next(iter(first)), with_alpha
