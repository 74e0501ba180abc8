"""utils: the Registry's errors, tensor helpers and the atomic write."""

from __future__ import annotations

import os

import pytest
import torch

from score_sde.utils import Registry, append_dims, as_batch_time, atomic_write_bytes, batch_mul


def test_registry_names_the_unknown_value_and_the_choices():
    things = Registry("thing")
    things.register("b")(int)
    things.register("a", aliases=("alpha",))(float)
    assert things.get("alpha") is float and things.names() == ["a", "alpha", "b"]
    with pytest.raises(ValueError, match="Unknown thing 'c'; valid: a, alpha, b"):
        things.get("c")
    with pytest.raises(TypeError, match="thing name must be a str, got int: 3"):
        things.get(3)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        things.register("a")(str)


def test_tensor_helpers_broadcast_per_sample():
    x = torch.arange(12.0).reshape(3, 2, 2)
    c = torch.tensor([1.0, 2.0, 3.0])
    assert append_dims(c, 3).shape == (3, 1, 1)
    torch.testing.assert_close(batch_mul(c, x), c[:, None, None] * x)
    t = as_batch_time(0.5, x.double())
    assert t.shape == (3,) and t.dtype == torch.float64


def test_atomic_write_honours_the_umask_and_replaces(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    old = os.umask(0o022)
    try:
        atomic_write_bytes(path, b"one")
        atomic_write_bytes(path, b"two")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"two"
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(path.parent) == ["file.bin"]  # no temporary file left
