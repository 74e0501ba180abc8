"""Datasets: the CIFAR-10 tarball reader (format, checksum, safe unpickling, offline error),
image folders, digits, toys, and the resumable iterator."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import urllib.error
import zlib

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from score_sde import datasets
from score_sde.datasets import cifar10, toy
from score_sde.datasets.base import ArrayDataset, DataIterator


def _config(**data):
    base = dict(dataset="digits", image_size=8, num_channels=1, centered=True, random_flip=False,
                uniform_dequantization=False)
    base.update(data)
    return ml_collections.ConfigDict({"seed": 0, "data": base, "training": {"batch_size": 4}})


def _write_cifar_tarball(path, n=2, payload=None):
    """A tarball in the official layout: cifar-10-batches-py/{data_batch_1..5,test_batch}."""
    rng = np.random.default_rng(0)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, n)]
            batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                     b"filenames": [f"{name}_{k}.png".encode() for k in range(n)]}
            raw = payload if payload is not None else pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
            batches[name] = (data, labels)
    return batches


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    batches = _write_cifar_tarball(tmp_path / cifar10.FILENAME)
    monkeypatch.setattr(cifar10, "MD5", _md5(tmp_path / cifar10.FILENAME))
    return tmp_path, batches


def test_cifar10_reads_the_official_format(cifar_root):
    root, batches = cifar_root
    config = _config(dataset="CIFAR10", image_size=32, num_channels=3, root=str(root))
    train = datasets.get_dataset(config, "train")
    test = datasets.get_dataset(config, "test")
    assert train.data.shape == (10, 3, 32, 32) and train.data.dtype == torch.uint8
    assert len(test) == 2 and train.levels == 256
    data, labels = batches["data_batch_3"]
    # rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    np.testing.assert_array_equal(train.data[4, 1].numpy(), data[0, 1024:2048].reshape(32, 32))
    assert train.labels[4:6].tolist() == labels
    assert test.labels.tolist() == batches["test_batch"][1]


def test_cifar10_rejects_a_corrupt_tarball_by_checksum(cifar_root):
    root, _ = cifar_root
    path = root / cifar10.FILENAME
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    config = _config(dataset="CIFAR10", image_size=32, num_channels=3, root=str(root))
    with pytest.raises(ValueError, match="corrupt or not the official CIFAR-10 tarball: MD5"):
        datasets.get_dataset(config, "train")


def test_cifar10_refuses_pickles_with_foreign_globals(tmp_path, monkeypatch):
    class Evil:
        def __reduce__(self):
            import os

            return os.system, ("echo pwned",)

    path = tmp_path / cifar10.FILENAME
    _write_cifar_tarball(path, payload=pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="forbidden global (posix|os).system"):
        cifar10.read_tarball(path, "train")


def test_cifar10_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar10.urllib.request, "urlopen", offline)
    config = _config(dataset="CIFAR10", image_size=32, num_channels=3, root=str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError) as e:
        datasets.get_dataset(config, "train")
    assert cifar10.FILENAME in str(e.value) and str((tmp_path / "d").resolve()) in str(e.value)
    assert not (tmp_path / "d" / cifar10.FILENAME).exists()


def test_cifar10_downloads_when_online(tmp_path, monkeypatch):
    _write_cifar_tarball(tmp_path / "served.tar.gz")
    served = (tmp_path / "served.tar.gz").read_bytes()
    monkeypatch.setattr(cifar10, "MD5", hashlib.md5(served).hexdigest())
    monkeypatch.setattr(cifar10.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(served))
    config = _config(dataset="CIFAR10", image_size=32, num_channels=3, root=str(tmp_path / "d"))
    assert len(datasets.get_dataset(config, "test")) == 2
    assert (tmp_path / "d" / cifar10.FILENAME).read_bytes() == served


def test_image_folder_resizes_centre_crops_and_labels_by_subfolder(tmp_path):
    for name in ["cats", "dogs"]:
        (tmp_path / name).mkdir()
        for k in range(2):
            # 30x10 (w x h): left third red, middle green, right blue -> the crop is green
            a = np.zeros((10, 30, 3), np.uint8)
            a[:, :10, 0], a[:, 10:20, 1], a[:, 20:, 2] = 255, 255, 255
            Image.fromarray(a).save(tmp_path / name / f"{k}.{'png' if k else 'jpg'}")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    config = _config(dataset="folder", root=str(tmp_path), image_size=4, num_channels=3)
    ds = datasets.get_dataset(config, "train")
    assert ds.data.shape == (4, 3, 4, 4) and ds.data.dtype == torch.uint8
    assert ds.data[torch.tensor([2, 0])].shape == (2, 3, 4, 4) and len(ds.data[1:3]) == 2
    batch = next(datasets.get_data_iterator(config, batch_size=4))
    assert batch.shape == (4, 3, 4, 4) and 0 <= batch.min() and batch.max() <= 1
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.classes == ("cats", "dogs")
    centre = ds.as_float(torch.arange(4))[:, :, 1:3, 1:3] * 255
    assert (centre[:, 1] > 200).all() and (centre[:, 0] < 60).all() and (centre[:, 2] < 60).all()


def test_image_folder_errors_name_the_folder(tmp_path):
    config = _config(dataset="folder", root=str(tmp_path / "missing"), num_channels=3)
    with pytest.raises(FileNotFoundError, match="missing"):
        datasets.get_dataset(config, "train")
    config.data.root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no .png/.jpg/.jpeg/.webp/.bmp/.tif.* images"):
        datasets.get_dataset(config, "train")


def test_image_folder_reads_16_bit_pngs_at_their_depth(tmp_path):
    """A 16-bit grey PNG (mode I;16) gives its levels k / 65535 in [0, 1], not convert('L')'s
    clip at 255 (white); 8-bit folders are unchanged; the summary states the depth."""
    ramp = np.arange(16, dtype=np.int64).reshape(4, 4) * 4369  # 0, 4369, ..., 65535
    levels = {"ramp": ramp, "dark": ramp // 256, "flat": np.full((4, 4), 40000)}
    folder16 = tmp_path / "grey16"
    folder16.mkdir()
    for name, k in levels.items():
        Image.fromarray(k.astype(np.uint16)).save(folder16 / f"{name}.png")
        assert Image.open(folder16 / f"{name}.png").mode == "I;16"
    config = _config(dataset="folder", root=str(folder16), image_size=4, num_channels=1)
    ds = datasets.get_dataset(config, "train")
    assert ds.levels == 65536 and ds.bit_depth == 16
    assert "16-bit (65536 levels)" in ds.summary() and "3 images" in ds.summary()
    x = ds.as_float(torch.arange(3)).double()  # files sorted: dark, flat, ramp
    expected = [levels[name] / 65535 for name in ("dark", "flat", "ramp")]
    for image, k in zip(x, expected):
        torch.testing.assert_close(image[0], torch.from_numpy(k), rtol=0, atol=1e-7)
    batch = next(datasets.get_data_iterator(config, batch_size=3, train=False))
    torch.testing.assert_close(datasets.get_data_scaler(config)(batch).double(),
                               x * 2 - 1, rtol=0, atol=1e-6)  # model range [-1, 1]
    # Grey to three channels at 16 bits, as 'RGB' does for 8-bit grey.
    config3 = _config(dataset="folder", root=str(folder16), image_size=4, num_channels=3)
    rgb = datasets.get_dataset(config3, "train").as_float(torch.arange(3)).double()
    assert torch.equal(rgb, x.expand(-1, 3, -1, -1))
    # 8-bit images of the same scene: uint8 levels / 255, as before.
    folder8 = tmp_path / "grey8"
    folder8.mkdir()
    Image.fromarray((ramp // 257).astype(np.uint8)).save(folder8 / "ramp.png")
    config.data.root = str(folder8)
    ds8 = datasets.get_dataset(config, "train")
    assert ds8.levels == 256 and ds8.data.dtype == torch.uint8
    assert "8-bit (256 levels)" in ds8.summary()
    torch.testing.assert_close(ds8.as_float(torch.arange(1))[0, 0].double(),
                               torch.from_numpy(ramp // 257 / 255), rtol=0, atol=1e-7)
    # One depth per folder; 16-bit colour (decoded at 8 bits by Pillow) is refused.
    Image.fromarray((ramp // 257).astype(np.uint8)).save(folder16 / "z8.png")
    config.data.root = str(folder16)
    with pytest.raises(ValueError, match="mixed bit depth.*z8.png is 8-bit"):
        datasets.get_dataset(config, "train")


def test_image_folder_refuses_16_bit_colour(tmp_path):
    rows = b"".join(b"\x00" + np.full((2, 3), 40000, ">u2").tobytes() for _ in range(2))
    chunk = lambda kind, data: (len(data).to_bytes(4, "big") + kind + data  # noqa: E731
                                + zlib.crc32(kind + data).to_bytes(4, "big"))
    header = (2).to_bytes(4, "big") * 2 + bytes([16, 2, 0, 0, 0])  # 2x2, 16-bit RGB
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
           + chunk(b"IEND", b""))
    (tmp_path / "rgb16.png").write_bytes(png)
    config = _config(dataset="folder", root=str(tmp_path), image_size=2, num_channels=3)
    with pytest.raises(ValueError, match="rgb16.png is a 16-bit colour image"):
        datasets.get_dataset(config, "train")


def test_digits_are_embedded_8x8_in_unit_range():
    from sklearn.datasets import load_digits

    train = datasets.get_dataset(_config(), "train")
    test = datasets.get_dataset(_config(), "test")
    assert train.data.shape == (1500, 1, 8, 8) and len(test) == 297
    assert train.levels == 17 and train.data.min() == 0 and train.data.max() == 1
    np.testing.assert_allclose(train.data[7, 0].numpy() * 16, load_digits().images[7])
    up = datasets.get_dataset(_config(image_size=16), "train")
    assert up.data.shape == (1500, 1, 16, 16) and up.levels is None


@pytest.mark.parametrize("name", toy.TOYS.names())
def test_toys_are_seeded_finite_2d_points(name):
    a = toy.TOYS.get(name)(1000, torch.Generator().manual_seed(0))
    b = toy.TOYS.get(name)(1000, torch.Generator().manual_seed(0))
    assert a.shape == (1000, 2) and torch.isfinite(a).all() and torch.equal(a, b)
    assert 0.3 < a.std(0).min() and a.abs().max() < 10


def test_checkerboard_occupies_alternate_squares():
    x = toy.checkerboard(20000, torch.Generator().manual_seed(0))
    cells = (torch.floor(x[:, 0] / 2) + torch.floor(x[:, 1] / 2)) % 2
    assert (cells == cells[0]).all()


def test_gmm_dataset_draws_from_the_oracle_mixture():
    config = ml_collections.ConfigDict({"seed": 3, "data": {
        "dataset": "gmm", "dim": 3, "n_modes": 2, "num_samples": 20000}})
    ds = datasets.get_dataset(config, "train")
    mixture = toy.gaussian_mixture(config)
    assert ds.data.shape == (20000, 3) and datasets.data_shape(config) == (3,)
    for k in range(2):
        xs = ds.data[ds.labels == k].double()
        se = mixture.stds[k] / xs.shape[0] ** 0.5
        assert ((xs.mean(0) - mixture.means[k]).abs() < 4 * se).all()


def _dataset(n=10):
    x = torch.arange(n * 4, dtype=torch.uint8).reshape(n, 1, 2, 2)
    return ArrayDataset(x, torch.arange(n), levels=256)


def test_iterator_visits_every_sample_once_per_epoch_and_is_seeded():
    it = DataIterator(_dataset(), 5, seed=1)
    epoch = torch.cat([next(it), next(it)])
    assert sorted((epoch[:, 0, 0, 0] * 255).round().tolist()) == list(range(0, 40, 4))
    again = DataIterator(_dataset(), 5, seed=1)
    assert torch.equal(torch.cat([next(again), next(again)]), epoch)
    assert not torch.equal(next(it), epoch[:5]) or not torch.equal(next(it), epoch[5:])


def test_iterator_resumes_bit_for_bit_with_flips_and_dequantisation():
    make = lambda: DataIterator(_dataset(), 4, seed=7, random_flip=True,  # noqa: E731
                                uniform_dequantization=True)
    reference = make()
    expected = [next(reference) for _ in range(7)]  # crosses two epoch boundaries
    first = make()
    for _ in range(3):
        next(first)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for k in range(3, 7):
        assert torch.equal(next(resumed), expected[k])


def test_random_flip_mirrors_about_half_of_the_images():
    x = torch.arange(2000 * 4, dtype=torch.float32).reshape(2000, 1, 2, 2) / 8000
    it = DataIterator(ArrayDataset(x, torch.zeros(2000, dtype=torch.long)), 2000, seed=0,
                      random_flip=True)
    batch = next(it)
    originals = x[it._order]
    flipped = (batch != originals).any(dim=(1, 2, 3))
    assert torch.equal(batch[flipped], originals[flipped].flip(-1))
    assert abs(flipped.float().mean().item() - 0.5) < 4 * 0.5 / 2000**0.5


def test_evaluation_pass_is_ordered_and_complete():
    it = DataIterator(_dataset(10), 4, shuffle=False)
    batches = list(it)
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), _dataset(10).as_float(slice(None)))


def test_scalers_are_inverse_and_centre_images_only():
    x = torch.rand(3, 1, 8, 8)
    centred = _config()
    assert torch.allclose(datasets.get_data_scaler(centred)(x), 2 * x - 1)
    assert torch.allclose(datasets.get_data_inverse_scaler(centred)(2 * x - 1), x)
    assert torch.equal(datasets.get_data_scaler(_config(centered=False))(x), x)
    points = ml_collections.ConfigDict({"data": {"dim": 2, "centered": True}})
    assert torch.equal(datasets.get_data_scaler(points)(x), x)


def test_iterator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size 11 exceeds the dataset size 10"):
        DataIterator(_dataset(), 11)
    points = ArrayDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="random_flip applies to images only"):
        DataIterator(points, 2, random_flip=True)
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'; valid: CIFAR10, digits"):
        datasets.get_dataset(_config(dataset="mnist"), "train")
