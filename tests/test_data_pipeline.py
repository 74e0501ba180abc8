"""The image-folder pipeline: worker processes that change no bit, images read as displayed
(EXIF orientation, alpha, formats, skipped files), and the decode cache."""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os

import numpy as np
import pytest
import torch
from PIL import Image

from score_sde import datasets
from score_sde.datasets import folder, workers
from score_sde.datasets.cache import ArrayCache, cache_key
from score_sde.training import checkpoints
from score_sde.training.loop import train


def _grey_folder(root, n=12, size=(10, 12), seed=0):
    """``n`` random 8-bit grey PNGs of (W, H) = ``size`` in two class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i:02d}.png")
    return root


def _config(root, *, image_size=8, channels=1, **data):
    config = importlib.import_module("configs.digits").get_config()
    config.device = "cpu"
    config.data.dataset, config.data.root = "folder", str(root)
    config.data.image_size, config.data.num_channels = image_size, channels
    config.data.cache = "none"
    for key, value in data.items():
        config.data[key] = value
    return config


# -- worker processes -----------------------------------------------------------------------------


def test_batches_are_the_same_bits_with_0_1_and_2_workers_over_two_epochs(tmp_path):
    """Flips, dequantisation and labels included; the position counts consumed batches only."""
    config = _config(_grey_folder(tmp_path / "images"), random_flip=True,
                     uniform_dequantization=True)
    data = datasets.get_dataset(config)

    def batches(num_workers):
        it = datasets.get_data_iterator(config, batch_size=4, dataset=data, with_labels=True,
                                        num_workers=num_workers)
        out = [next(it) for _ in range(7)]  # 3 batches per epoch: into the third epoch
        state = it.state_dict()
        it.close()
        return out, state

    reference, state = batches(0)
    assert state == {"epoch": 2, "batch": 1, "seed": config.seed}
    flipped = dequantised = False
    for x, _ in reference:
        levels = x * 256  # (x (L-1) + u) / L with u in [0, 1): the fractional part is u
        dequantised |= bool((levels - levels.floor() > 0).any())
    for num_workers in (1, 2):
        got, got_state = batches(num_workers)
        assert got_state == state  # not the position of the batches built ahead
        for (x, y), (x0, y0) in zip(got, reference):
            assert torch.equal(x, x0) and torch.equal(y, y0)
    plain = datasets.get_data_iterator(config, batch_size=4, dataset=data, num_workers=0)
    plain.random_flip = False
    for x, _ in reference:  # the integer levels k of (k + u) / 256, unflipped or mirrored
        unflipped = (next(plain) * 256).floor()
        flipped |= not torch.equal((x * 256).floor(), unflipped)
    assert dequantised and flipped
    assert multiprocessing.active_children() == []  # close() stopped the workers


def test_a_run_preempted_mid_epoch_with_workers_resumes_bit_for_bit(tmp_path, caplog):
    """24 images, batch 8: 3 batches per epoch; preempted after step 3 (last checkpoint at step
    2, mid-epoch) with 2 workers, resumed with 2, equals an uninterrupted run with none."""
    root = _grey_folder(tmp_path / "images", n=24)

    def config(num_workers):
        c = _config(root, random_flip=True, uniform_dequantization=True,
                    num_workers=num_workers)
        c.model.nf, c.model.num_scales = 8, 20
        t = c.training
        t.n_iters, t.batch_size, t.snapshot_sampling = 5, 8, False
        t.snapshot_freq, t.snapshot_freq_for_preemption, t.log_freq, t.eval_freq = 100, 2, 1, 5
        c.eval.batch_size = 8
        return c

    torch.manual_seed(0)
    whole = train(config("0"), tmp_path / "a", progress=False)

    class Preempted(Exception):
        pass

    def preempt(state):
        if state["step"] == 3:
            raise Preempted

    torch.manual_seed(0)
    with caplog.at_level(logging.INFO), pytest.raises(Preempted):
        train(config("2"), tmp_path / "b", hooks=[preempt], progress=False)
    assert "data loader: 2 worker processes (data.num_workers='2')" in caplog.text
    saved = torch.load(checkpoints.meta_path(tmp_path / "b"), weights_only=True)
    assert saved["step"] == 2 and saved["data"]["train"]["batch"] == 2  # consumed, not built
    resumed = train(config("2"), tmp_path / "b", progress=False)
    assert resumed["iterators"]["train"].state_dict() == whole["iterators"]["train"].state_dict()
    for a, b in zip(whole["model"].parameters(), resumed["model"].parameters()):
        assert torch.equal(a, b)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("value, files, expected", [
    ("auto", True, min(4, workers.available_cores())), ("auto", False, 0), ("2", True, 2),
    (3, False, 3), ("0", True, 0),
])
def test_num_workers_resolves_auto_by_the_kind_of_data(value, files, expected):
    assert workers.resolve_num_workers(value, files) == expected


@pytest.mark.parametrize("value", ["many", -1, "-1", 1.5, True])
def test_a_bad_num_workers_is_named(value):
    with pytest.raises(ValueError, match=r"num_workers must be 'auto' or an int >= 0, got"):
        workers.resolve_num_workers(value, True)


# -- images as displayed ------------------------------------------------------------------------


def test_a_jpeg_with_orientation_tag_6_is_read_as_displayed(tmp_path):
    """Displayed: 32 wide, 64 high, white above black. Stored turned a quarter (64 x 32) with
    EXIF orientation 6 ("rotate 90 degrees clockwise to display")."""
    shown = np.zeros((64, 32), np.uint8)
    shown[:32] = 255
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "images").mkdir()
    stored.save(tmp_path / "images" / "phone.jpg", quality=95, exif=exif)
    x = datasets.get_dataset(_config(tmp_path / "images", image_size=16)).data[[0]][0, 0]
    # 16 x 32 after resizing, rows 8..24 kept: white above black (stored: left and right)
    top, bottom = x[:5].float().mean(), x[11:].float().mean()
    assert top > 230 and bottom < 25, (top, bottom)


def _transparent_right_half(mode):
    """8x8, left half opaque red (or grey 76 for LA), right half fully transparent over stored
    black; as RGBA, LA or a palette image with a transparency entry."""
    if mode == "P":
        im = Image.new("P", (8, 8), 0)
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        im.paste(1, (0, 0, 4, 8))
        im.info["transparency"] = 0
        return im
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)
    im = Image.fromarray(rgba)
    return im.convert("LA") if mode == "LA" else im


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
@pytest.mark.parametrize("background", [None, (0, 128, 255)])
def test_transparent_pixels_take_white_or_the_configured_background(tmp_path, mode, background):
    (tmp_path / "images").mkdir()
    _transparent_right_half(mode).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "images" / "b.png")
    extra = {} if background is None else {"alpha_background": background}
    config = _config(tmp_path / "images", channels=3, **extra)
    data = datasets.get_dataset(config)
    x = data.data[[0]][0]  # (3, 8, 8) uint8
    expected = torch.tensor(background or (255, 255, 255), dtype=torch.uint8)
    assert torch.equal(x[:, :, 4:], expected[:, None, None].expand(3, 8, 4))
    left = (76, 76, 76) if mode == "LA" else (255, 0, 0)  # L = 0.299 * 255, rounded
    assert torch.equal(x[:, :, :4], torch.tensor(left, dtype=torch.uint8)[:, None, None]
                       .expand(3, 8, 4))
    assert f"1 with alpha composited over RGB {background or (255, 255, 255)}" in data.summary()


def test_png_webp_bmp_tiff_and_gif_load_and_other_files_are_counted(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    pixels = np.zeros((8, 8, 3), np.uint8)  # four colours: a GIF palette holds them exactly
    pixels[:4, :4], pixels[:4, 4:], pixels[4:, :4] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    im = Image.fromarray(pixels)
    im.save(root / "a.png")
    im.save(root / "b.webp", lossless=True)
    im.save(root / "c.bmp")
    im.save(root / "d.tif")
    im.save(root / "e.gif")
    for name in ("notes.txt", "list.txt", "phone.heic"):
        (root / name).write_bytes(b"not an image for Pillow")
    (root / ".DS_Store").write_bytes(b"hidden")
    data = datasets.get_dataset(_config(root, channels=3))
    assert [p.name for p in data.data.files] == ["a.png", "b.webp", "c.bmp", "d.tif", "e.gif"]
    expected = torch.from_numpy(pixels.transpose(2, 0, 1).copy())
    for x in data.data[torch.arange(5)]:
        assert torch.equal(x, expected)
    assert data.summary().endswith(", skipped 3 files: .txt x2, .heic x1")


def test_an_unreadable_image_fails_naming_its_path(tmp_path):
    root = _grey_folder(tmp_path / "images", n=2)
    bad = next(root.rglob("*.png"))
    bad.write_bytes(bad.read_bytes()[:60])  # the header survives, the pixels do not
    data = datasets.get_dataset(_config(root))
    with pytest.raises(ValueError, match=f"image {bad} cannot be decoded"):
        data.data[torch.arange(2)]


# -- the decode cache ------------------------------------------------------------------------------


@pytest.fixture
def count_decodes(monkeypatch):
    """The number of files decoded so far (``folder.load_image`` calls in this process)."""
    calls = []
    real = folder.load_image

    def counted(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(folder, "load_image", counted)
    return calls


def test_the_cache_decodes_once_equals_the_files_and_a_changed_folder_rebuilds_it(
        tmp_path, count_decodes):
    root = _grey_folder(tmp_path / "images", n=12)
    config = _config(root, random_flip=True, uniform_dequantization=True, cache="auto",
                     num_workers="0")  # decoded here, where the decodes are counted
    workdir = tmp_path / "run"

    def batches(data):
        it = datasets.get_data_iterator(config, batch_size=4, dataset=data, num_workers=0)
        return [next(it) for _ in range(5)]

    uncached = batches(datasets.get_dataset(config))  # no workdir: decoded on demand
    decoded = len(count_decodes)
    assert decoded == 5 * 4
    first = datasets.get_dataset(config, workdir=workdir)
    assert len(count_decodes) - decoded == 12  # the first pass decodes every file once
    assert first.data.path.parent == workdir / "data_cache"
    assert first.data.path.is_file() and np.load(first.data.path).dtype == np.uint8
    count_decodes.clear()
    second = datasets.get_dataset(config, workdir=workdir)  # a later run
    for got, expected in zip(batches(second), uncached):
        assert torch.equal(got, expected)
    assert count_decodes == [] and second.data.path == first.data.path

    touched = next(root.rglob("*.png"))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    third = datasets.get_dataset(config, workdir=workdir)
    assert len(count_decodes) == 12 and third.data.path != first.data.path
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(root / "a" / "new.png")
    count_decodes.clear()
    fourth = datasets.get_dataset(config, workdir=workdir)
    assert len(count_decodes) == 13 and len(fourth) == 13
    config.data.alpha_background = (0, 0, 0)  # a setting that changes pixels: a new entry
    count_decodes.clear()
    datasets.get_dataset(config, workdir=workdir)
    assert len(count_decodes) == 13


def test_the_cache_keeps_16_bit_images_at_their_depth(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16)).save(root / f"{i}.png")
    config = _config(root, cache=str(tmp_path / "shared"))  # built by 'auto' workers
    cached = datasets.get_dataset(config)  # a path: no workdir needed
    config.data.cache = "none"
    lazy = datasets.get_dataset(config)
    assert np.load(cached.data.path).dtype == np.uint16 and cached.levels == 65536
    assert cached.data.path.parent == tmp_path / "shared"
    x = cached.data[torch.arange(3)]
    assert x.dtype == torch.int32 and int(x.max()) > 60000
    assert torch.equal(x, lazy.data[torch.arange(3)])


def test_the_array_cache_builds_once_and_never_reads_a_partial_file(tmp_path):
    store = ArrayCache(tmp_path / "cache")
    key = cache_key("latents", {"scale": 0.18215}, [["a.png", 10, 123]])
    assert key != cache_key("latents", {"scale": 0.18216}, [["a.png", 10, 123]])
    fills = []

    def fill(out):
        fills.append(1)
        out[:] = np.arange(6, dtype=np.float32).reshape(2, 3)

    def failing(out):
        out[0] = 1
        raise RuntimeError("the builder failed")

    with pytest.raises(RuntimeError, match="the builder failed"):
        store.get_or_build(key, (2, 3), np.float32, failing)
    assert list(store.folder.iterdir()) == []  # its temporary file is gone, nothing is final
    array = store.get_or_build(key, (2, 3), np.float32, fill)
    again = store.get_or_build(key, (2, 3), np.float32, fill)
    assert len(fills) == 1 and np.array_equal(again, np.arange(6).reshape(2, 3))
    assert isinstance(array, np.memmap) and not array.flags.writeable
    store.path(key).write_bytes(store.path(key).read_bytes()[:100])  # a torn copy from elsewhere
    rebuilt = store.get_or_build(key, (2, 3), np.float32, fill)
    assert len(fills) == 2 and np.array_equal(rebuilt, np.arange(6).reshape(2, 3))
    stale = store.folder / f".{store.path(key).name}.99.abcd.tmp"  # a killed build's
    stale.write_bytes(b"half written")
    assert store.get(key, (2, 3), np.float32) is not None and len(fills) == 2
    assert store.remove_temporaries() == [stale] and not stale.exists()
    assert store.path(key).is_file()


def test_files_beside_class_folders_are_skipped_and_bad_loader_keys_are_named(tmp_path):
    root = _grey_folder(tmp_path / "images", n=4)
    Image.new("L", (8, 8)).save(root / "stray.png")  # in no class folder
    data = datasets.get_dataset(_config(root))
    assert len(data) == 4 and data.summary().endswith("2 classes, skipped 1 file: .png x1")
    for key, value, message in [
        ("num_workers", "four", "num_workers must be 'auto' or an int >= 0, got 'four'"),
        ("cache", "", "data.cache must be 'none', 'auto' or a folder, got ''"),
        ("alpha_background", (255, 255), r"an RGB triple of ints in 0..255, got \(255, 255\)"),
    ]:
        config = _config(root, **{key: value})
        with pytest.raises(ValueError, match=message):
            datasets.check_loader_config(config)
