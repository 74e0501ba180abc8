"""FID Inception-v3: architecture, preprocessing and weight loading with random weights; the real
weights when their file is present."""

from __future__ import annotations

import io
import os
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError
from score_sde.evaluation import inception
from score_sde.evaluation.inception import (
    FID_WEIGHTS_NAME,
    FID_WEIGHTS_URL,
    FIDInceptionV3,
    inception_outputs,
    load_fid_inception,
    preprocess,
)
from score_sde.evaluation.metrics import quantize_images

BLOCKS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
          "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
          "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"]


def _random_model(seed: int = 0) -> FIDInceptionV3:
    """Random weights with He-scaled convolutions so activations stay O(1) through all blocks."""
    torch.manual_seed(seed)
    model = FIDInceptionV3()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0, (2 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    return _random_model()


@pytest.fixture(scope="module")
def traced(model):
    """One 299x299 forward pass recording every block's output shape and each pooled branch's
    input (block input and what ``branch_pool`` received)."""
    shapes, pooled = {}, {}
    handles = []
    for name in BLOCKS[:-1]:
        block = getattr(model, name)
        handles.append(block.register_forward_hook(
            lambda mod, inp, out, name=name: shapes.__setitem__(name, tuple(out.shape))))
        if hasattr(block, "branch_pool"):
            handles.append(block.register_forward_pre_hook(
                lambda mod, inp, name=name: pooled.__setitem__(name, [inp[0]])))
            handles.append(block.branch_pool.register_forward_pre_hook(
                lambda mod, inp, name=name: pooled[name].append(inp[0])))
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        pool3, logits = model(x)
    for h in handles:
        h.remove()
    return shapes, pooled, pool3, logits


def test_parameter_count_equals_the_fid_inception():
    # torchvision documents Inception3 (1000 classes, with AuxLogits) at 27,161,264 parameters.
    # The FID network drops AuxLogits (conv0: 768->128 1x1 + BN, conv1: 128->768 5x5 + BN,
    # fc 768->1000) and has 1008 logits: 8 more rows of fc (2048 weights + 1 bias each).
    aux = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
    expected = 27_161_264 - aux + 8 * (2048 + 1)
    assert expected == 23_850_960
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == expected


def test_state_dict_keys_are_the_pytorch_fid_layout(model):
    state = model.state_dict()
    assert list(dict.fromkeys(k.split(".")[0] for k in state)) == BLOCKS
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch_pool.conv.weight": (192, 1280, 1, 1),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("AuxLogits" in k or k.endswith("conv.bias") for k in state)
    # 94 conv+BN units (5 each: conv weight, BN weight/bias/mean/var, + num_batches_tracked) + fc
    assert len(state) == 94 * 6 + 2


def test_block_output_shapes(traced):
    shapes, _, pool3, logits = traced
    assert shapes == {
        "Conv2d_1a_3x3": (1, 32, 149, 149), "Conv2d_2a_3x3": (1, 32, 147, 147),
        "Conv2d_2b_3x3": (1, 64, 147, 147), "Conv2d_3b_1x1": (1, 80, 73, 73),
        "Conv2d_4a_3x3": (1, 192, 71, 71), "Mixed_5b": (1, 256, 35, 35),
        "Mixed_5c": (1, 288, 35, 35), "Mixed_5d": (1, 288, 35, 35), "Mixed_6a": (1, 768, 17, 17),
        "Mixed_6b": (1, 768, 17, 17), "Mixed_6c": (1, 768, 17, 17), "Mixed_6d": (1, 768, 17, 17),
        "Mixed_6e": (1, 768, 17, 17), "Mixed_7a": (1, 1280, 8, 8), "Mixed_7b": (1, 2048, 8, 8),
        "Mixed_7c": (1, 2048, 8, 8),
    }
    assert pool3.shape == (1, 2048) and logits.shape == (1, 1008)
    assert pool3.min() >= 0 and pool3.std() > 1e-2  # post-ReLU average, not vanishing


def test_pool_branches_are_the_fid_variants(traced):
    _, pooled, _, _ = traced
    assert set(pooled) == {"Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c",
                           "Mixed_6d", "Mixed_6e", "Mixed_7b", "Mixed_7c"}
    for name, (x, got) in pooled.items():
        if name == "Mixed_7c":  # the 2015 graph's last block max-pools
            want = F.max_pool2d(x, 3, stride=1, padding=1)
        else:  # TensorFlow's average over the valid pixels of each 3x3 window
            window_sum = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True) * 9
            count = F.avg_pool2d(torch.ones_like(x[:, :1]), 3, 1, 1, count_include_pad=True) * 9
            want = window_sum / count
            torchvision_style = window_sum / 9  # zero padding counted: differs at the border
            assert not torch.allclose(got, torchvision_style, atol=1e-4), name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def _bilinear_half_pixel(a: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` at source positions (i + 0.5) n / size - 0.5,
    clamped to the edge pixels (the align_corners=False convention)."""
    n = a.shape[axis]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = src - lo
    shape = [1] * a.ndim
    shape[axis] = size
    return (np.take(a, lo, axis) * (1 - w.reshape(shape)) + np.take(a, hi, axis)
            * w.reshape(shape))


def test_preprocess_is_half_pixel_bilinear_then_2x_minus_1():
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = _bilinear_half_pixel(_bilinear_half_pixel(x.numpy(), 299, 2), 299, 3) * 2 - 1
    got = preprocess(x)
    assert got.shape == (2, 3, 299, 299)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    full = torch.rand(1, 3, 299, 299, dtype=torch.float64)
    torch.testing.assert_close(preprocess(full), 2 * full - 1)  # 299 px: no resampling
    grey = x[:, :1]
    torch.testing.assert_close(preprocess(grey), preprocess(grey.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize("bad, error", [
    (torch.full((1, 3, 8, 8), 1.5), ValueError),
    (torch.full((1, 3, 8, 8), float("nan")), ValueError),
    (torch.zeros(1, 2, 8, 8), ValueError),
    (torch.zeros(3, 8, 8), ValueError),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), TypeError),
])
def test_preprocess_rejects_bad_images(bad, error):
    with pytest.raises(error):
        preprocess(bad)


def test_quantize_images_matches_the_reference_uint8_cast():
    x = torch.tensor([-0.2, 0.0, 0.5, 0.99999, 1.0, 1.7, 0.1234])
    want = np.clip(x.numpy() * 255.0, 0, 255).astype(np.uint8) / 255.0
    np.testing.assert_allclose(quantize_images(x).numpy(), want, atol=1e-7)


def test_inception_outputs_features_and_probabilities(model):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    feats, probs = inception_outputs(model, images, batch_size=1)
    assert feats.shape == (2, 2048) and probs.shape == (2, 1008) and feats.dtype == torch.float64
    with torch.no_grad():
        pool3, logits = model(preprocess(images))
    torch.testing.assert_close(feats, pool3.double(), rtol=1e-4, atol=1e-5)
    unbiased = torch.softmax((pool3 @ model.fc.weight.T).double(), 1)
    torch.testing.assert_close(probs, unbiased, rtol=1e-4, atol=1e-7)
    _, biased = inception_outputs(model, images, unbiased=False)
    torch.testing.assert_close(biased, torch.softmax(logits.double(), 1), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(biased, probs, atol=1e-4)  # the random fc.bias matters


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An empty cache, no environment override and no network."""
    monkeypatch.setenv(inception.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(inception.urllib.request, "urlopen", offline)
    return tmp_path / "cache"


def test_saved_random_weights_round_trip(model, tmp_path, no_weights, monkeypatch):
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    loaded = load_fid_inception(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # the same file found through the environment variable, then through the cache
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(path))
    assert torch.equal(load_fid_inception().fc.bias, model.fc.bias)
    monkeypatch.delenv(inception.WEIGHTS_ENV)
    no_weights.mkdir()
    os.replace(path, no_weights / FID_WEIGHTS_NAME)
    assert torch.equal(load_fid_inception().fc.weight, model.fc.weight)


def test_checkpoint_without_num_batches_tracked_loads(model, tmp_path):
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pth")
    loaded = load_fid_inception(tmp_path / "old.pth", download=False)
    assert torch.equal(loaded.Mixed_7c.branch_pool.bn.running_var,
                       model.Mixed_7c.branch_pool.bn.running_var)


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s.pop("fc.bias"), "missing keys"),
    (lambda s: s.__setitem__("AuxLogits.fc.weight", torch.zeros(1008, 768)), "unexpected keys"),
    (lambda s: s.__setitem__("fc.weight", torch.zeros(1000, 2048)), "shape mismatches"),
])
def test_strict_check_rejects_wrong_files(model, tmp_path, corrupt, message):
    state = dict(model.state_dict())
    corrupt(state)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=message):
        load_fid_inception(tmp_path / "wrong.pth", download=False)


def test_non_checkpoint_file_is_rejected(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"definitely not a torch file")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_fid_inception(tmp_path / "junk.pth", download=False)


def test_offline_error_names_the_file_and_where_to_put_it(no_weights):
    for download in (False, True):
        with pytest.raises(FileNotFoundError) as info:
            load_fid_inception(download=download)
        message = str(info.value)
        for part in (FID_WEIGHTS_NAME, FID_WEIGHTS_URL, inception.WEIGHTS_ENV,
                     str(no_weights / FID_WEIGHTS_NAME)):
            assert part in message
    assert not no_weights.exists() or not any(no_weights.iterdir())  # no partial download left
    with pytest.raises(FileNotFoundError, match="no file"):
        load_fid_inception(no_weights / "elsewhere.pth")


def test_download_with_a_wrong_hash_is_not_installed(no_weights, monkeypatch):
    monkeypatch.setattr(inception.urllib.request, "urlopen",
                        lambda url, timeout: io.BytesIO(b"a tampered file"))
    with pytest.raises(ValueError, match="sha256"):
        load_fid_inception()
    assert not any(no_weights.iterdir())


REFERENCE_ENV = "SCORE_SDE_INCEPTION_REFERENCE"


def test_real_weights_known_outputs():
    """With the real file: its published hash, a strict load, and outputs the trained 2015 graph
    is known to give. If ``$SCORE_SDE_INCEPTION_REFERENCE`` names an npz with ``images``
    (N, 3, H, W) in [0, 1] and ``pool3`` (N, 2048) computed by pytorch-fid
    (``InceptionV3([3])(images)[0].squeeze()``), our features must match them."""
    path = inception.find_fid_weights()
    if path is None:
        pytest.skip(f"FID Inception weights absent (offline here): put {FID_WEIGHTS_NAME} from "
                    f"{FID_WEIGHTS_URL} in {inception.cache_dir()} or set "
                    f"${inception.WEIGHTS_ENV}")
    assert inception.sha256_of(path) == inception.FID_WEIGHTS_SHA256
    assert inception.FID_WEIGHTS_SHA256.startswith(inception.FID_WEIGHTS_SHA256_PREFIX)
    model = load_fid_inception(path, download=False)
    # smooth colour ramps and blobs: natural-image-like inputs
    g = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(4, 3, 4, 4, generator=g), size=64, mode="bicubic",
                           align_corners=False).clamp(0, 1)
    feats, probs = inception_outputs(model, images)
    assert torch.isfinite(feats).all() and feats.min() >= 0
    # classes 1001..1007 of the 1008-way layer never had training examples
    assert probs[:, 1001:].sum(1).max() < 1e-3
    reference = os.environ.get(REFERENCE_ENV)
    if reference:
        data = np.load(reference)
        ours, _ = inception_outputs(model, torch.from_numpy(data["images"]).float())
        np.testing.assert_allclose(ours.numpy(), data["pool3"], rtol=1e-3, atol=1e-4)


def _cached_statistics(model, tmp_path):
    from score_sde.evaluation import fid

    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "stats.npz"
    mu, sigma = fid.reference_statistics("toy", lambda: images.split(2), model, path=path)
    assert path.is_file() and mu.shape == (2048,) and sigma.shape == (2048, 2048)

    def must_not_run():
        raise AssertionError("the cache was not used")

    mu2, sigma2 = fid.reference_statistics("toy", must_not_run, model, path=path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    return images, mu, sigma


def test_reference_statistics_are_cached_and_checked_on_load(model, tmp_path):
    from score_sde.evaluation import fid

    _, mu, sigma = _cached_statistics(model, tmp_path)
    np.savez(tmp_path / "bad.npz", mu=mu[:10], sigma=sigma)
    with pytest.raises(ValueError, match="pool3"):
        fid.load_statistics(tmp_path / "bad.npz")


@pytest.mark.slow  # a 2048 x 2048 matrix square root (~10 s); by default FID of a set with
# itself is test_metrics.test_fid_of_a_set_with_itself_is_zero, and inception_metrics at 2048
# features runs in test_eval_mode.test_inception_metrics_with_random_weights
def test_fid_of_the_same_set_against_its_cached_statistics_is_zero(model, tmp_path):
    from score_sde.evaluation import fid

    images, mu, sigma = _cached_statistics(model, tmp_path)
    scores = fid.inception_metrics(images, model, (mu, sigma), num_splits=2,
                                   reference_features=fid.inception_features(model, [images])[0])
    assert abs(scores["fid"]) < 1e-6 * np.trace(sigma)
    assert 1 <= scores["inception_score"] <= 1008 and scores["kid"] is not None


def test_equals_torch_fidelity_implementation(model, tmp_path):
    """torch-fidelity's InceptionV3 is an independent port of the same graph with the same
    state-dict keys; with the same (random) weights and input tensor the outputs must agree.
    (Checked bit-exact against torch-fidelity 0.4.0 when this was written.)"""
    tf_inception = pytest.importorskip(
        "torch_fidelity.feature_extractor_inceptionv3",
        reason="torch-fidelity (and torchvision, which it needs) is not installed")
    torch.save(model.state_dict(), tmp_path / "random.pth")
    theirs = tf_inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased", "logits"],
        feature_extractor_weights_path=str(tmp_path / "random.pth")).eval()
    x = torch.randint(0, 256, (1, 3, 299, 299), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    with torch.no_grad():
        pool3, unbiased, logits = theirs(x)
        our_pool3, our_logits = model((x.float() - 128) / 128)  # their input scaling
    torch.testing.assert_close(our_pool3, pool3, rtol=1e-5, atol=1e-5 * pool3.abs().max())
    torch.testing.assert_close(our_pool3 @ model.fc.weight.T, unbiased, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(our_logits, logits, rtol=1e-5, atol=1e-4)
