"""The Inception-v3 network of published FID / IS numbers, in plain PyTorch.

Inception-v3 (Szegedy et al. 2016) as frozen by TensorFlow on 2015-12-05 (``inception-2015-12-05``),
the graph behind FID (Heusel et al. 2017) and the Inception score (Salimans et al. 2016). Its
PyTorch port by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``) is torchvision's
``Inception3`` layout (no auxiliary head, 1008 logits) with three departures from torchvision's
blocks, all reproduced here:

* the 3x3 average pools inside the A, C and first E blocks ignore the zero padding
  (``count_include_pad=False``, as TensorFlow's ``avg_pool`` does);
* the last E block (``Mixed_7c``) pools with a 3x3 *max* pool instead of an average pool;
* the classifier has 1008 outputs (1000 ImageNet classes, a background class and 7 unused).

The state-dict keys are torchvision's, e.g. ``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch_pool.bn.running_var``, ``Mixed_7c.branch3x3dbl_3b.conv.weight``, ``fc.bias``.

Preprocessing (:func:`preprocess`) is pytorch-fid's: images in [0, 1], (N, 3, H, W), are resized
to 299x299 with ``F.interpolate(mode='bilinear', align_corners=False)`` (no antialiasing, also when
H = W = 299) and mapped to [-1, 1] by ``2x - 1``. Grey images (N, 1, H, W) are repeated to three
channels first. The original TensorFlow code resized with TF's bilinear kernel, so FIDs agree with
TensorFlow's to about 1e-2 rather than exactly (pytorch-fid's README).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import check_state_dict, safe_load

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
)
#: torch.hub convention: the file name carries the first hex digits of the file's sha256. The full
#: digest is the one published for torch-fidelity's copy of the same port
#: (``weights-inception-2015-12-05-6726825d.pth``).
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_ENV = "SCORE_SDE_INCEPTION_WEIGHTS"
CACHE_ENV = "SCORE_SDE_CACHE"
NUM_CLASSES = 1008
FEATURE_DIM = 2048
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow averages over the valid pixels only: padded zeros are not counted.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], 1)  # (N, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3dbl, bp], 1)  # (N, 480 + C_in, 17, 17)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b/c/d/e)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, b7dbl, bp], 1)  # (N, 768, 17, 17)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)  # (N, 512 + C_in, 8, 8)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (Mixed_7b: average pool, Mixed_7c: max pool)."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"Unknown pool {pool!r}; valid: avg, max")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        if self.pool == "max":  # the 2015 graph's last block max-pools (unlike the paper)
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_3x3(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3dbl, bp], 1)  # (N, 2048, 8, 8)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the TensorFlow 2015-12-05 graph (Szegedy et al. 2016), eval-only.

    ``forward`` takes *preprocessed* input (N, 3, 299, 299) in [-1, 1] (see :func:`preprocess`)
    and returns the pool3 features (N, 2048) used by FID and KID and the logits (N, 1008).
    Build it with random weights here; :func:`load_fid_inception` fills in the real ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pool3 features (N, 2048) and logits (N, 1008) of preprocessed x (N, 3, 299, 299)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        pool3 = x.mean(dim=(2, 3))  # (N, 2048); dropout is the identity in eval mode
        return pool3, self.fc(pool3)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's input transform: [0, 1] images (N, C, H, W), C in {1, 3} -> (N, 3, 299, 299)
    in [-1, 1] by bilinear resizing (``align_corners=False``, no antialiasing) and ``2x - 1``.

    Raises:
        TypeError / ValueError: for a non-float tensor, a wrong shape, non-finite values or values
            outside [0, 1] (pass samples through ``evaluation.metrics.quantize_images`` first).
    """
    if not isinstance(images, torch.Tensor) or not torch.is_floating_point(images):
        raise TypeError(f"images must be a floating-point tensor, got {type(images).__name__}"
                        + (f" of {images.dtype}" if isinstance(images, torch.Tensor) else ""))
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    lo, hi = images.aminmax()
    if not (torch.isfinite(lo) and torch.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"images must be finite and in [0, 1], got range [{lo:.4g}, {hi:.4g}]; "
                         "clamp samples with evaluation.metrics.quantize_images")
    x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


@torch.no_grad()
def inception_outputs(
    model: FIDInceptionV3, images: torch.Tensor, *, batch_size: int = 50, unbiased: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool3 features for FID / KID (Heusel et al. 2017; Bińkowski et al. 2018) and class
    probabilities for the Inception score (Salimans et al. 2016) of [0, 1] images (N, C, H, W).

    Args:
        model: the network, on the device the work should run on.
        images: (N, 1 or 3, H, W) in [0, 1], any device.
        batch_size: images per forward pass.
        unbiased: softmax of ``pool3 @ fc.weight.T`` without the bias, as Salimans et al.'s
            ``inception_score.py`` computes it from the 2015 graph (and torch-fidelity's
            ``logits_unbiased``); ``False`` adds ``fc.bias``.
    Returns:
        features (N, 2048) float64 and probabilities (N, 1008) float64, on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    model.eval()
    feats, probs = [], []
    for chunk in images.split(batch_size):
        x = preprocess(chunk.to(device=device, dtype=torch.float32))
        pool3, logits = model(x)
        if unbiased:
            logits = pool3 @ model.fc.weight.T  # (N, 1008)
        feats.append(pool3.double().cpu())
        probs.append(torch.softmax(logits.double(), dim=1).cpu())
    return torch.cat(feats), torch.cat(probs)


# -- weights -----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$SCORE_SDE_CACHE``, else ``$XDG_CACHE_HOME/score_sde``, else ``~/.cache/score_sde``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "score_sde"


def _missing_weights_message(reason: str) -> str:
    target = cache_dir() / FID_WEIGHTS_NAME
    return (
        f"FID Inception weights not found ({reason}). Provide the file {FID_WEIGHTS_NAME} "
        f"(sha256 {FID_WEIGHTS_SHA256}, from {FID_WEIGHTS_URL}) by one of: "
        f"copying it to {target}; setting ${WEIGHTS_ENV}=/path/to/{FID_WEIGHTS_NAME}; or passing "
        "load_fid_inception(path=...)."
    )


def find_fid_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The weight file to use: ``path``, else ``$SCORE_SDE_INCEPTION_WEIGHTS``, else the cache
    file; ``None`` when only the cache was consulted and it is empty.

    Raises:
        FileNotFoundError: ``path`` or the environment variable names a file that does not exist.
    """
    for given, origin in ((path, "path"), (os.environ.get(WEIGHTS_ENV), f"${WEIGHTS_ENV}")):
        if given:
            given = Path(given).expanduser()
            if not given.is_file():
                raise FileNotFoundError(_missing_weights_message(f"{origin} = {given} is no file"))
            return given
    cached = cache_dir() / FID_WEIGHTS_NAME
    return cached if cached.is_file() else None


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_fid_weights(url: str = FID_WEIGHTS_URL, *, timeout: float = 30.0) -> Path:
    """Download the weights into :func:`cache_dir` (temporary file, hash check, ``os.replace``).

    Raises:
        FileNotFoundError: no network (the message says which file to provide and where).
        ValueError: the downloaded file's sha256 is not :data:`FID_WEIGHTS_SHA256`.
    """
    target = cache_dir() / FID_WEIGHTS_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(_missing_weights_message(f"download failed: {e}")) from e
    digest = sha256_of(tmp)
    if digest != FID_WEIGHTS_SHA256:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{url}: downloaded file has sha256 {digest}, expected "
                         f"{FID_WEIGHTS_SHA256}; not installed")
    os.replace(tmp, target)
    return target


def load_fid_state_dict(path: str | os.PathLike, model: FIDInceptionV3 | None = None) -> dict:
    """Read a weight file with ``torch.load(weights_only=True)`` and check it strictly against
    :class:`FIDInceptionV3` (keys and shapes). ``num_batches_tracked`` buffers, absent from
    checkpoints written before PyTorch 0.4.1, are filled with zeros (they are unused in eval).

    Raises:
        models.checkpoint.CheckpointError: unreadable file, or wrong keys or shapes (listed).
    """
    model = model if model is not None else FIDInceptionV3()
    state = safe_load(path)
    if not isinstance(state, dict):
        raise TypeError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = dict(state)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    check_state_dict(model, state, str(path))
    return state


def load_fid_inception(
    path: str | os.PathLike | None = None, *, download: bool = True
) -> FIDInceptionV3:
    """The FID Inception-v3 with the pytorch-fid port of the 2015-12-05 TensorFlow weights, in
    eval mode on the CPU (move it with ``.to(device)``).

    Looks for the weights in ``path``, ``$SCORE_SDE_INCEPTION_WEIGHTS``, then
    ``<cache_dir()>/pt_inception-2015-12-05-6726825d.pth``; if none is found and ``download`` is
    true, fetches pytorch-fid's release file into the cache (sha256-checked).

    Raises:
        FileNotFoundError: no file and no network (or ``download=False``); the message names the
            file, its URL and the places it is looked for.
        models.checkpoint.CheckpointError: a file that is not this network's weights.
    """
    file = find_fid_weights(path)
    if file is None:
        if not download:
            raise FileNotFoundError(_missing_weights_message("download=False"))
        file = download_fid_weights()
    model = FIDInceptionV3()
    model.load_state_dict(load_fid_state_dict(file, model), strict=True)
    return model.eval().requires_grad_(False)
