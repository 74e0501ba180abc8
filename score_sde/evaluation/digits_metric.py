"""A download-free sample-quality metric for the embedded 8x8 digits.

FID (Heusel et al. 2017) and the Inception score (Salimans et al. 2016) measure samples in the
feature space of an ImageNet classifier; for scikit-learn's 8x8 digits (``load_digits``, values
0..16 mapped to [0, 1]) the same formulas are taken in the feature space of a small CNN trained
here, once, on the digits' train split (the first 1500 images, as in ``datasets.digits``):

* Fréchet Digits Distance (FDD): the Fréchet distance between Gaussian fits of the classifier's
  64-d penultimate features of the samples and of the 1500 training digits;
* classifier score: exp(E_x KL(p(y|x) || p(y))) over the 10 classes, between 1 and 10.

The trained weights and the training digits' feature statistics ship in
``digits_classifier.safetensors`` (about 200 KB) beside this file;
:func:`build_digits_classifier` retrains them deterministically (fixed seed, one thread,
deterministic algorithms) in a few seconds, and
``python -m score_sde.evaluation.digits_metric --rebuild`` rewrites the file. Numbers are only
comparable between runs that use the same file (its sha256 is in :func:`classifier_info`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from score_sde.evaluation.metrics import feature_statistics, frechet_distance, inception_score

WEIGHTS_FILE = Path(__file__).with_name("digits_classifier.safetensors")
N_TRAIN = 1500  # datasets.digits: the first 1500 images are 'train', the other 297 'test'
IMAGE_SIZE = 8
NUM_CLASSES = 10
FEATURE_DIM = 64
TRAIN_SEED = 0
TRAIN_EPOCHS = 30
TRAIN_BATCH = 50
TRAIN_LR = 2e-3


class DigitsClassifier(nn.Module):
    """Three 3x3 convolutions and two linear layers for (N, 1, 8, 8) images in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 2 * 2, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 64) of images (N, 1, 8, 8) in [0, 1]."""
        h = F.relu(self.conv1(2 * x - 1))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, 32, 4, 4)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # (N, 64, 2, 2)
        return F.relu(self.fc1(h.flatten(1)))  # (N, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.fc2(self.features(x))


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N, 1, 8, 8) float32 in [0, 1] and int64 labels (N,);
    ``split`` is 'train' (first 1500), 'test' (last 297) or 'all'."""
    from sklearn.datasets import load_digits  # a slow import, kept local

    parts = {"train": slice(0, N_TRAIN), "test": slice(N_TRAIN, None), "all": slice(None)}
    if split not in parts:
        raise ValueError(f"Unknown digits split {split!r}; valid: {', '.join(parts)}")
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images[parts[split]], labels[parts[split]]


@contextmanager
def _deterministic_cpu():
    """One thread, deterministic kernels and a forked global RNG; all restored on exit."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _random_affine(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augmentation: rotate by up to 0.2 rad, scale by 1 +- 0.1, shift by up to one pixel."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1  # (N, 4) in [-1, 1)
    angle, scale, shift = 0.2 * u[:, 0], 1 + 0.1 * u[:, 1], 0.25 * u[:, 2:]  # 1 px = 2 / 8
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def build_digits_classifier(
    *, seed: int = TRAIN_SEED, epochs: int = TRAIN_EPOCHS
) -> DigitsClassifier:
    """Train the classifier on the digits' train split, deterministically, on the CPU.

    Adam on cross-entropy with a cosine learning-rate decay from 2e-3 to 0, batches of 50 in an
    order drawn from ``seed``, random small affine distortions of each batch, ``epochs`` passes,
    one thread (about 10 s). Same seed and machine give the same bits; other CPUs may round
    differently, so the tests compare accuracy, not bits, across machines.
    """
    images, labels = digits_split("train")
    with _deterministic_cpu():
        torch.manual_seed(seed)  # the default init draws from the global RNG (forked above)
        model = DigitsClassifier()
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
        num_steps = epochs * math.ceil(len(images) / TRAIN_BATCH)
        model.train()
        step = 0
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for idx in order.split(TRAIN_BATCH):
                for group in optimizer.param_groups:
                    group["lr"] = TRAIN_LR * 0.5 * (1 + math.cos(math.pi * step / num_steps))
                x = _random_affine(images[idx], generator)
                loss = F.cross_entropy(model(x), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: DigitsClassifier, split: str = "test") -> float:
    """Fraction of the digits of ``split`` the classifier labels correctly."""
    images, labels = digits_split(split)
    return float((model(images).argmax(1) == labels).double().mean())


def save_digits_classifier(model: DigitsClassifier, path: str | os.PathLike = WEIGHTS_FILE) -> None:
    """Write the weights and the train split's feature statistics to a safetensors file
    (temporary file, fsync, ``os.replace``)."""
    mu, sigma = feature_statistics(_features(model, digits_split("train")[0]))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["reference.mu"] = torch.from_numpy(mu)
    tensors["reference.sigma"] = torch.from_numpy(sigma)
    metadata = {
        "seed": str(TRAIN_SEED), "epochs": str(TRAIN_EPOCHS), "torch": torch.__version__,
        "test_accuracy": f"{accuracy(model):.4f}", "reference": "digits train split (1500)",
    }
    data = safetensors.torch.save(tensors, metadata=metadata)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tuple[DigitsClassifier, np.ndarray, np.ndarray]:
    tensors = safetensors.torch.load_file(path)
    mu = tensors.pop("reference.mu").numpy()
    sigma = tensors.pop("reference.sigma").numpy()
    model = DigitsClassifier()
    model.load_state_dict(tensors, strict=True)
    return model.eval().requires_grad_(False), mu, sigma


def load_digits_classifier(path: str | os.PathLike = WEIGHTS_FILE) -> DigitsClassifier:
    """The stored classifier (loaded once per process and path; do not modify it)."""
    return _load(str(path))[0]


def reference_statistics(
    path: str | os.PathLike = WEIGHTS_FILE, image_size: int = IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Mean (64,) and covariance (64, 64), float64, of the train digits' features.

    At 8x8 these are the stored statistics. At another ``image_size`` the train digits are first
    resampled as ``datasets.digits`` serves them (bilinear, ``align_corners=False``, clamped) and
    then brought back to 8x8 as samples are, so real data of any size scores about 0; computed
    once per process and size.
    """
    if image_size == IMAGE_SIZE:
        _, mu, sigma = _load(str(path))
        return mu, sigma
    return _resampled_reference(str(path), int(image_size))


@functools.lru_cache(maxsize=8)
def _resampled_reference(path: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    images = digits_split("train")[0]
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                           align_corners=False).clamp(0, 1)
    return feature_statistics(_features(load_digits_classifier(path), _as_digit_images(images)))


def classifier_info(path: str | os.PathLike = WEIGHTS_FILE) -> dict:
    """The stored file's metadata plus its sha256, for evaluation records."""
    path = Path(path)
    with safetensors.safe_open(path, framework="pt") as f:
        info = dict(f.metadata() or {})
    info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return info


def _as_digit_images(images: torch.Tensor) -> torch.Tensor:
    """Check images (N, 1, H, W) in [0, 1] and bring them to 8x8 float32 on the CPU."""
    if not isinstance(images, torch.Tensor) or not torch.is_floating_point(images):
        raise TypeError(f"images must be a floating-point tensor, got {type(images).__name__}")
    if (images.dim() != 4 or images.shape[1] != 1 or images.shape[0] < 2
            or images.shape[2] != images.shape[3]):
        raise ValueError(f"images must have shape (N >= 2, 1, S, S), got {tuple(images.shape)}")
    x = images.detach().to("cpu", torch.float32)
    lo, hi = x.aminmax()
    if not (torch.isfinite(lo) and torch.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"images must be finite and in [0, 1], got range [{lo:.4g}, {hi:.4g}]; "
                         "clamp samples with evaluation.metrics.quantize_images")
    h, w = x.shape[-2:]
    if (h, w) != (IMAGE_SIZE, IMAGE_SIZE):
        # datasets.digits serves other sizes as bilinear resamplings of the 8x8 digits
        if h % IMAGE_SIZE == 0 and w % IMAGE_SIZE == 0:
            x = F.avg_pool2d(x, (h // IMAGE_SIZE, w // IMAGE_SIZE))  # box average of each cell
        else:
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                              antialias=True, align_corners=False)
    return x


@torch.no_grad()
def _features(model: DigitsClassifier, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.features(chunk) for chunk in x.split(1000)]).double()


@torch.no_grad()
def digits_features(
    images: torch.Tensor, path: str | os.PathLike = WEIGHTS_FILE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, 64) and class probabilities (N, 10), float64, of digit images
    (N, 1, H, W) in [0, 1] (box-averaged to 8x8 when H, W are multiples of 8, else resized
    bilinearly with antialiasing)."""
    model = load_digits_classifier(path)
    feats = _features(model, _as_digit_images(images))
    probs = torch.softmax(model.fc2(feats.float()).double(), dim=1)
    return feats, probs


def frechet_digits_distance(images: torch.Tensor, path: str | os.PathLike = WEIGHTS_FILE) -> float:
    """Fréchet distance (Heusel et al. 2017, eq. 6) between the Gaussian fits of the samples'
    digits-classifier features and the train digits' (:func:`reference_statistics` at the
    samples' size). Lower is better; it is biased upwards for small N (compare equal N)."""
    feats, _ = digits_features(images, path)
    reference = reference_statistics(path, images.shape[-1])
    return frechet_distance(*feature_statistics(feats), *reference)


def digits_classifier_score(
    images: torch.Tensor, *, num_splits: int = 1, path: str | os.PathLike = WEIGHTS_FILE
) -> tuple[float, float]:
    """Inception-score analogue (Salimans et al. 2016) with the digits classifier:
    exp(E_x KL(p(y|x) || p(y))) in [1, 10]; (mean, std) over ``num_splits`` splits."""
    _, probs = digits_features(images, path)
    return inception_score(probs, num_splits=num_splits)


def evaluate_digits(images: torch.Tensor, path: str | os.PathLike = WEIGHTS_FILE) -> dict:
    """FDD and classifier score of digit images (N, 1, H, W) in [0, 1], one feature pass."""
    feats, probs = digits_features(images, path)
    reference = reference_statistics(path, images.shape[-1])
    fdd = frechet_distance(*feature_statistics(feats), *reference)
    score, _ = inception_score(probs, num_splits=1)
    return {"fdd": fdd, "classifier_score": score}


def main(argv: list[str] | None = None) -> None:
    """``python -m score_sde.evaluation.digits_metric --rebuild [--out FILE]``: retrain, store."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="retrain and write the weights")
    parser.add_argument("--out", default=str(WEIGHTS_FILE), help="weights file to write")
    args = parser.parse_args(argv)
    if args.rebuild:
        model = build_digits_classifier()
        save_digits_classifier(model, args.out)
        print(f"wrote {args.out}; test accuracy {accuracy(model):.4f}")
    info = classifier_info(args.out)
    print(", ".join(f"{k}={v}" for k, v in sorted(info.items())))


if __name__ == "__main__":
    main()
