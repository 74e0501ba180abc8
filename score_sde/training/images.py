"""PNG output without torchvision: image grids (``make_grid``) and 2-D scatter plots."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from score_sde.utils import atomic_write_bytes


def _write_png(image: Image.Image, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue(), what="a PNG image")


def make_grid(
    images: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1
) -> np.ndarray:
    """Tile images (B, C, H, W) in [0, 1] into one uint8 array (rows, cols, C) as torchvision.

    Args:
        images: values outside [0, 1] are clipped; C is 1 or 3.
        nrow: images per row (default ``ceil(sqrt(B))``).
        padding: pixels of black between images (before ``scale``).
        scale: nearest-neighbour magnification of every pixel (small images, e.g. 8x8 digits).
    Returns:
        (nrows (H + padding) + padding, ncol (W + padding) + padding, C) uint8, times ``scale``.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1 or 3, H, W), got {tuple(images.shape)}")
    B, C, H, W = images.shape
    ncol = nrow or math.ceil(math.sqrt(B))
    nrows = math.ceil(B / ncol)
    x = (images.detach().float().cpu().clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    grid = np.zeros((nrows * (H + padding) + padding, ncol * (W + padding) + padding, C), np.uint8)
    for k in range(B):
        r, c = divmod(k, ncol)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[top:top + H, left:left + W] = x[k].transpose(1, 2, 0)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write an (H, W, 1 or 3) uint8 array as a PNG (grey-scale for one channel), atomically
    (:func:`utils.atomic_write_bytes`: a failed write raises ``utils.WriteError``)."""
    _write_png(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array), path)


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, min_size: int = 256
) -> None:
    """``make_grid`` then PNG, magnifying small images so the grid is at least ``min_size`` px."""
    ncol = nrow or math.ceil(math.sqrt(images.shape[0]))
    width = ncol * (images.shape[-1] + 2)
    scale = max(1, math.ceil(min_size / width))
    save_png(make_grid(images, nrow=ncol, scale=scale), path)


def class_rows(images: torch.Tensor, labels: torch.Tensor,
               max_aspect: int = 4) -> tuple[torch.Tensor, int] | None:
    """Images (B, C, H, W) laid out one class per row, for ``make_grid``: the classes in order of
    first appearance, each row its samples in order, empty cells black.

    Returns:
        (images (rows * cols, C, H, W), cols), or None where that does not fit: fewer than two
        classes, or more rows than ``max_aspect`` times the columns (e.g. one sample of each of
        ten classes, better shown square).
    """
    order = list(dict.fromkeys(labels.tolist()))
    if len(order) < 2:
        return None
    members = [torch.nonzero(labels == c).flatten() for c in order]
    cols = max(len(m) for m in members)
    if len(order) > max_aspect * cols:
        return None
    out = images.new_zeros((len(order) * cols, *images.shape[1:]))
    for row, index in enumerate(members):
        out[row * cols:row * cols + len(index)] = images[index]
    return out, cols


def save_scatter(points: torch.Tensor, path: str | os.PathLike, size: int = 512,
                 extent: float | None = None) -> None:
    """Scatter plot of 2-D points (N, 2) as a PNG (white background, dark dots, axes at 0),
    written atomically like :func:`save_png`."""
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be (N, 2), got {tuple(points.shape)}")
    p = points.detach().float().cpu().numpy()
    p = p[np.isfinite(p).all(axis=1)]
    if extent is None:
        extent = float(np.abs(p).max()) * 1.1 if len(p) else 1.0
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.line([(size // 2, 0), (size // 2, size)], fill=(200, 200, 200))
    draw.line([(0, size // 2), (size, size // 2)], fill=(200, 200, 200))
    pixels = (p / extent * 0.5 + 0.5) * (size - 1)
    for u, v in pixels:
        v = size - 1 - v  # y up
        draw.ellipse([u - 1, v - 1, u + 1, v + 1], fill=(20, 40, 120))
    _write_png(image, path)
