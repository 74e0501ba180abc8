"""Image resizing of cascaded generation (Ho, Saharia et al. 2022): the downsampling operator
that makes the low-resolution conditioning y = A x, and the upsampling that brings y back to the
network's resolution.

Both are linear maps whose weights sum to 1 per output pixel, so they commute with the affine
data scaler ([0, 1] <-> [-1, 1]): resizing in data or in model space gives the same image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: ``downsample`` methods: the block mean (area average, the default) or bicubic with
#: antialiasing (PIL's resize)
DOWNSAMPLE_METHODS = ("area", "bicubic")
#: ``upsample`` methods: bicubic (the default) or nearest neighbour (pixel replication)
UPSAMPLE_METHODS = ("bicubic", "nearest")


def _check(x: torch.Tensor, size: int, method: str, methods: tuple[str, ...], what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        found = (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                 else type(x).__name__)
        raise ValueError(f"{what}: x must be a floating tensor (B, C, H, W), got {found}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{what}: size must be an integer >= 1, got {size!r}")
    if method not in methods:
        raise ValueError(f"Unknown {what} method {method!r}; valid: {', '.join(methods)}")


def downsample(x: torch.Tensor, size: int, method: str = "area") -> torch.Tensor:
    """The low-resolution image A x (B, C, size, size) of x (B, C, H, W).

    ``area``: the mean of each (H / size) x (W / size) block (H, W multiples of ``size``), the
    operator of SR3 / cascaded diffusion's conditioning; ``bicubic``: antialiased bicubic.

    Raises:
        ValueError: not an image batch, a size that does not divide H and W (area) or exceeds
            them, or an unknown method (listing the valid ones).
    """
    _check(x, size, method, DOWNSAMPLE_METHODS, "downsample")
    height, width = x.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"downsample: size {size} exceeds the image's {height}x{width}")
    if method == "area":
        if height % size or width % size:
            raise ValueError(f"downsample 'area': size {size} must divide the image's "
                             f"{height}x{width}")
        return F.avg_pool2d(x, (height // size, width // size))
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                         antialias=True)


def upsample(x: torch.Tensor, size: int, method: str = "bicubic") -> torch.Tensor:
    """y (B, C, h, w) resized up to (B, C, size, size): bicubic (no clamping) or nearest.

    Raises:
        ValueError: not an image batch, a size below h or w, or an unknown method.
    """
    _check(x, size, method, UPSAMPLE_METHODS, "upsample")
    if size < max(x.shape[-2:]):
        raise ValueError(f"upsample: size {size} is below the image's "
                         f"{x.shape[-2]}x{x.shape[-1]}")
    if (size, size) == tuple(x.shape[-2:]):
        return x
    if method == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
