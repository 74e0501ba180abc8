"""A keyed array cache on disk: key -> a memory-mapped ``.npy`` array, built once.

Anything slow to compute and cheap to store (decoded images, an autoencoder's posteriors) is built
by a ``fill(out)`` function into a memory-mapped array and read back, memory-mapped, by every later
epoch and run that asks with the same key. The key is a hash of everything the array depends on
(:func:`cache_key`): inputs' names, sizes and modification times, and every setting that changes
a value; anything else is a new key, so a stale array is never read (old ones stay until deleted).

Writes are atomic: the array is filled in a temporary file of a unique name in the same folder and
renamed onto its final name (``os.replace``) once complete, so a reader sees a finished array or
none, never a half-written one. Two runs that build the same key at once each write their own
temporary file and the last rename wins; both arrays are the same bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

#: Prefix and suffix of the temporary files being filled (never read as a cache entry).
TEMPORARY = (".", ".tmp")


def cache_key(*parts) -> str:
    """A 32-hex-digit hash of ``parts`` (JSON-able values: str, numbers, lists, dicts)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ArrayCache:
    """Arrays under ``folder``, one ``{name}-{key}.npy`` file per key.

    Args:
        folder: where the arrays live (created when the first one is written).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, key: str, name: str = "array") -> Path:
        """The file of ``key`` (it may not exist yet)."""
        return self.folder / f"{name}-{key}.npy"

    def get(self, key: str, shape: tuple[int, ...], dtype, name: str = "array"
            ) -> np.ndarray | None:
        """The array of ``key``, read-only and memory-mapped, or None when there is none (or the
        file there does not have ``shape`` and ``dtype``)."""
        path = self.path(key, name)
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError):  # absent, or not an .npy file
            return None
        if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            return None
        return array

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files of killed builds; returns them. Only for a folder no other
        process builds in (e.g. the cache under a workdir whose lock this process holds)."""
        if not self.folder.is_dir():
            return []
        stale = [p for p in self.folder.iterdir() if p.is_file()
                 and p.name.startswith(TEMPORARY[0]) and p.name.endswith(TEMPORARY[1])]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def get_or_build(self, key: str, shape: tuple[int, ...], dtype,
                     fill: Callable[[np.ndarray], None], name: str = "array") -> np.ndarray:
        """The array of ``key``; built first by ``fill(out)`` (which writes every element of the
        writable memory-mapped ``out`` of ``shape`` and ``dtype``) when the cache has none.

        Returns:
            the read-only memory-mapped array.
        Raises:
            whatever ``fill`` raises (its temporary file is removed) and OSError (a full disk).
        """
        array = self.get(key, shape, dtype, name)
        if array is not None:
            return array
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(key, name)
        temporary = final.with_name(f"{TEMPORARY[0]}{final.name}.{os.getpid()}."
                                    f"{uuid.uuid4().hex[:8]}{TEMPORARY[1]}")
        try:
            out = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=tuple(shape))
            fill(out)
            out.flush()
            del out
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())  # the data is on disk before the name says it is complete
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return np.load(final, mmap_mode="r")
