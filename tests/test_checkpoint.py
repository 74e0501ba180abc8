"""Reference checkpoints (weights-only loading, EMA by name, NCSN++ fixture), refusal of unsafe or
broken files, and the safetensors + JSON inference format written by ``models.convert``."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shlex
import subprocess
import sys
import zipfile

import ml_collections
import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

import sde_lib
from models.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    UnsafeCheckpointError,
    load_inference,
    load_model_state,
    load_reference_checkpoint,
    name_ema_shadow_params,
    safe_load,
    save_inference,
)
from models.convert import main as convert_main
from models.ema import ExponentialMovingAverage
from models.utils import create_model, get_score_fn

CKPT = "ncsnpp_ve_checkpoint.pth"
VESDE = sde_lib.VESDE(0.01, 50, 1000)


@pytest.fixture(scope="module")
def ncsnpp_config(reference_dir) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        json.loads((reference_dir / "ncsnpp_ve.json").read_text())["config"]
    )


@pytest.fixture(scope="module")
def ckpt_io(reference_dir) -> dict[str, torch.Tensor]:
    return load_file(reference_dir / "ncsnpp_ve_checkpoint_io.safetensors")


def _score(model, x, t, sde=VESDE):
    with torch.no_grad():
        return get_score_fn(sde, model, train=False, continuous=True)(x, t)


# -- reading the reference checkpoint -------------------------------------------------------------


def test_plain_weights_only_load_needs_the_numpy_allowlist(reference_dir):
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(reference_dir / CKPT, weights_only=True)
    ckpt = safe_load(reference_dir / CKPT)
    assert set(ckpt) == {"optimizer", "model", "ema", "step"}
    assert isinstance(ckpt["optimizer"]["param_groups"][0]["lr"], np.float64)


def test_numpy_1_scalar_name_is_allowed(tmp_path):
    """Checkpoints pickled under numpy 1.x name the scalar ``numpy.core.multiarray.scalar``."""
    torch.save({"lr": np.float64(0.5), "w": torch.ones(2)}, tmp_path / "np2.pth")
    with (
        zipfile.ZipFile(tmp_path / "np2.pth") as src,
        zipfile.ZipFile(tmp_path / "np1.pth", "w") as dst,
    ):
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                assert b"numpy.core.multiarray" in data
            dst.writestr(item, data)
    loaded = safe_load(tmp_path / "np1.pth")
    assert loaded["lr"] == 0.5 and isinstance(loaded["lr"], np.float64)


def test_reference_checkpoint_layout_and_ema_skip_rule(reference_dir):
    """Without a model: the EMA list is the state dict minus buffers and the frozen Fourier W."""
    ckpt = load_reference_checkpoint(reference_dir / CKPT)
    assert ckpt["step"] == 2
    assert (ckpt["ema"]["decay"], ckpt["ema"]["num_updates"]) == (0.999, 2)
    state = ckpt["model"]
    assert not any(k.startswith("module.") for k in state)
    trainable = [k for k in state if k not in ("sigmas", "all_modules.0.W")]
    shadows = ckpt["ema"]["shadow_params"]
    assert [tuple(s.shape) for s in shadows] == [tuple(state[k].shape) for k in trainable]


def test_ncsnpp_checkpoint_ema_score_matches_reference(reference_dir, ncsnpp_config, ckpt_io):
    model = create_model(ncsnpp_config)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.5)
    ckpt = load_reference_checkpoint(reference_dir / CKPT, model, ema=ema)
    assert (ema.decay, ema.num_updates) == (0.999, 2)
    named = name_ema_shadow_params(model, ckpt["ema"], source=CKPT)
    assert "all_modules.0.W" not in named and len(named) == 216
    x, t, ref = ckpt_io["x"], ckpt_io["t"], ckpt_io["score_ema"]
    raw = _score(model, x, t)
    ema.copy_to(model.parameters())
    for name, p in model.named_parameters():
        expected = named[name] if p.requires_grad else ckpt["model"][name]
        assert torch.equal(p, expected), name
    score = _score(model, x, t)
    err = (score - ref).abs().max() / ref.abs().max()
    assert err <= 2e-5
    # The fixture's two steps ran at warm-up lr 4e-8, so raw and EMA scores differ by only ~1.2e-5
    # of max|ref|: also require the EMA score to be much closer to score_ema than the raw one.
    err_raw = (raw - ref).abs().max() / ref.abs().max()
    assert err < err_raw / 4


# -- refusing unsafe and broken files ------------------------------------------------------------


class _Payload:
    """Unpickling this calls os.system (creating a marker file)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_payload_pickle_is_live(tmp_path):
    """Control: plain unpickling of the payload does run code, so the refusal test means it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("container", ["torch_save", "raw_pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model": _Payload(marker), "ema": {}, "optimizer": {}, "step": 0}
    if container == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_reference_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "refused" in message and "system" in message
    assert not marker.exists()
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_mlp()[1].to_dict()))
    assert convert_main([str(path), str(tmp_path / "out"), "--config", str(config)]) == 1
    assert not (tmp_path / "out").exists()
    assert not marker.exists()


def _torch_zip_with(path, pkl: bytes | None = None, compress: bool = False, record=None):
    """A ``torch.save`` zip whose ``data.pkl`` (and first storage record) are replaced."""
    torch.save({"w": torch.zeros(3)}, path)
    with zipfile.ZipFile(path) as src:
        items = [(item, src.read(item.filename)) for item in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for item, data in items:
            if pkl is not None and item.filename.endswith("/data.pkl"):
                data = pkl
            if record is not None and item.filename.endswith("/data/0"):
                data = record
            if compress:
                item.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(item, data)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
@pytest.mark.parametrize("container", ["zip", "raw"])
def test_malicious_pickles_of_every_protocol_are_refused(tmp_path, protocol, container):
    """GLOBAL (protocols 0-2), STACK_GLOBAL and FRAME (4, 5) and INST (0) routes to os.system."""
    marker = tmp_path / "pwned"
    pkl = pickle.dumps({"model": _Payload(marker), "ema": {}}, protocol=protocol)
    path = tmp_path / "evil.pth"
    if container == "zip":
        _torch_zip_with(path, pkl)
    else:
        path.write_bytes(pkl)
    with pytest.raises(UnsafeCheckpointError, match="refused") as info:
        safe_load(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    inst = b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."  # protocol-0 INST
    path.write_bytes(inst)
    with pytest.raises(UnsafeCheckpointError, match="unsupported pickle instruction"):
        safe_load(path)
    assert not marker.exists()


def test_compressed_zip_records_are_refused_before_inflating(tmp_path):
    """torch.save stores records uncompressed; a deflated record could be a zip bomb."""
    path = tmp_path / "bomb.pth"
    _torch_zip_with(path, record=bytes(8 * 2**20), compress=True)
    assert path.stat().st_size < 2**16
    with pytest.raises(UnsafeCheckpointError, match="compressed zip record"):
        safe_load(path)


def test_odd_but_allowlisted_pickles_give_checkpoint_errors(tmp_path):
    """Allowed globals used strangely (an object-dtype numpy scalar, a storage record of the
    wrong size) and non-checkpoint files fail as CheckpointError naming the file."""
    obj_scalar = (b"\x80\x02cnumpy._core.multiarray\nscalar\ncnumpy\ndtype\n"
                  b"X\x01\x00\x00\x00O\x89\x88\x87RX\x03\x00\x00\x00abc\x86R.")
    cases = {"objscalar.pth": dict(pkl=obj_scalar), "record.pth": dict(record=b"\0" * 1000)}
    for name, kwargs in cases.items():
        _torch_zip_with(tmp_path / name, **kwargs)
    (tmp_path / "text.pth").write_bytes(b"hello world\n" * 10)
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 4)
    for name in ("objscalar.pth", "record.pth", "text.pth", "random.pth"):
        with pytest.raises(CheckpointError) as info:
            safe_load(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


def test_truncated_and_empty_files(tmp_path, reference_dir):
    data = (reference_dir / CKPT).read_bytes()
    for name, content in [("truncated.pth", data[: len(data) // 2]), ("empty.pth", b"")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match="truncated") as info:
            load_reference_checkpoint(path)
        assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_reference_checkpoint(tmp_path / "missing.pth")


def test_not_a_training_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a reference training checkpoint"):
        load_reference_checkpoint(path)


def _mlp(nf: int = 16, num_layers: int = 1, seed: int = 0):
    config = ml_collections.ConfigDict(
        {
            "data": {"dim": 2},
            "model": {
                "name": "mlp",
                "nf": nf,
                "num_layers": num_layers,
                "embedding_type": "fourier",
                "scale_by_sigma": True,
                "nonlinearity": "swish",
                "ema_rate": 0.99,
            },
        }
    )
    torch.manual_seed(seed)
    return create_model(config).eval(), config


def test_wrong_architecture_lists_missing_unexpected_and_mismatched(reference_dir, tmp_path):
    model, _ = _mlp()
    with pytest.raises(CheckpointError) as info:
        load_reference_checkpoint(reference_dir / CKPT, model)
    message = str(info.value)
    assert CKPT in message and "missing keys" in message and "unexpected keys" in message
    state = {"module." + k: v for k, v in model.state_dict().items()}
    del state["module.Dense_in.bias"]
    state["module.Dense_out.weight"] = torch.zeros(3, 16)
    state["module.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_model_state(model, state, source="some.pth")
    message = str(info.value)
    assert message.startswith("some.pth")
    assert "missing keys (1): Dense_in.bias" in message
    assert "unexpected keys (1): extra" in message
    assert "Dense_out.weight (3, 16) vs model (2, 16)" in message


# -- the converter and our inference format -------------------------------------------------------


def _reference_style_checkpoint(path, model, ema, step):
    """What the reference's save_checkpoint writes, including its numpy float64 learning rate."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer.param_groups[0]["lr"] = np.float64(1e-3) * np.minimum(1.0, step / 5000)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "model": state,
            "ema": ema.state_dict(),
            "step": step,
        },
        path,
    )


def test_converter_round_trip_mlp_is_bitwise(tmp_path):
    model, config = _mlp(seed=3)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.99)
    with torch.no_grad():
        for _ in range(3):
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
            ema.update(model.parameters())
    path = tmp_path / "checkpoint_3.pth"
    _reference_style_checkpoint(path, model, ema, step=3)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    out = tmp_path / "converted"
    assert convert_main([str(path), str(out), "--config", str(tmp_path / "config.json")]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "ema.safetensors", "model.safetensors"]

    x, t = torch.randn(4, 2), torch.tensor([0.1, 0.3, 0.6, 0.9])
    raw_ref = _score(model, x, t)
    ema.copy_to(model.parameters())
    ema_ref = _score(model, x, t)
    loaded, loaded_config = load_inference(out)
    assert torch.equal(_score(loaded, x, t), ema_ref)
    raw, _ = load_inference(out, weights="raw")
    assert torch.equal(_score(raw, x, t), raw_ref)
    assert loaded_config.model.to_dict() == config.model.to_dict()
    record = json.loads((out / CONFIG_FILE).read_text())
    assert record["ema"] == {"decay": 0.99, "num_updates": 3}
    assert record["metadata"]["step"] == 3


def test_converter_cli_round_trip_ncsnpp_is_bitwise(
    reference_dir, ncsnpp_config, ckpt_io, tmp_path
):
    """``python -m models.convert`` on the fixture checkpoint, with the fixture JSON as config."""
    out = tmp_path / "ncsnpp_ve"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "models.convert",
            str(reference_dir / CKPT),
            str(out),
            "--config",
            str(reference_dir / "ncsnpp_ve.json"),
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "step 2" in result.stdout
    model = create_model(ncsnpp_config)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.999)
    load_reference_checkpoint(reference_dir / CKPT, model, ema=ema)
    x, t = ckpt_io["x"], ckpt_io["t"]
    raw_ref = _score(model, x, t)
    ema.copy_to(model.parameters())
    ema_ref = _score(model, x, t)
    converted, _ = load_inference(out)
    assert torch.equal(_score(converted, x, t), ema_ref)
    converted_raw, _ = load_inference(out, weights="raw")
    assert torch.equal(_score(converted_raw, x, t), raw_ref)


def test_save_inference_is_atomic_and_checked(tmp_path):
    model, config = _mlp()
    ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
    out = save_inference(model, config, tmp_path / "inf", ema=ema)
    assert sorted(os.listdir(out)) == ["config.json", "ema.safetensors", "model.safetensors"]
    save_inference(model, config, out, ema=ema)  # overwriting leaves no temporary files
    assert sorted(os.listdir(out)) == ["config.json", "ema.safetensors", "model.safetensors"]
    data = (out / "ema.safetensors").read_bytes()
    (out / "ema.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ema.safetensors: sha256"):
        load_inference(out)
    with torch.no_grad():
        model.Dense_in.weight.add_(1.0)  # raw weights != EMA weights
    save_inference(model, config, out)  # without EMA: raw weights are the default
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert torch.equal(load_inference(out)[0].Dense_in.weight, model.Dense_in.weight)
    with pytest.raises(ValueError, match="no 'ema' weights"):
        load_inference(out, weights="ema")


def test_inference_record_cannot_point_outside_its_directory(tmp_path):
    model, config = _mlp()
    out = save_inference(model, config, tmp_path / "inf")
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes((out / "model.safetensors").read_bytes())
    record = json.loads((out / CONFIG_FILE).read_text())
    record["weights"]["raw"] = "../secret.safetensors"
    record["sha256"] = {}
    (out / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="'raw' weights must be in 'model.safetensors'"):
        load_inference(out)


def test_failed_write_keeps_the_previous_files(tmp_path, monkeypatch):
    model, config = _mlp()
    out = save_inference(model, config, tmp_path / "inf")
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with torch.no_grad():
        model.Dense_in.weight.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        save_inference(model, config, out)
    monkeypatch.undo()
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    load_inference(out)


def test_converter_config_errors(tmp_path, reference_dir):
    path = reference_dir / CKPT
    assert convert_main([str(path), str(tmp_path), "--config", str(tmp_path / "nope.json")]) == 1
    (tmp_path / "bad.json").write_text(json.dumps({"data": {}}))
    assert convert_main([str(path), str(tmp_path), "--config", str(tmp_path / "bad.json")]) == 1
    assert convert_main([str(path), str(tmp_path), "--config", "no_such_config_name"]) == 1


def test_converter_with_a_config_name_reproduces_the_reference_ema_score(
    reference_dir, ckpt_io, tmp_path, capsys
):
    """``--config ve_cifar`` plus the fixture's shrinking overrides (its JSON's ``overrides``)
    converts the reference checkpoint; the EMA score matches the reference's ``score_ema``
    within the fixture README's 2e-5 of max|ref|."""
    overrides = json.loads((reference_dir / "ncsnpp_ve.json").read_text())["overrides"]
    flags = [f"--config.{key}={v['fixture']}" for key, v in overrides.items()]
    out = tmp_path / "ve"
    assert convert_main([str(reference_dir / CKPT), str(out), "--config", "ve_cifar", *flags]) == 0
    assert "step 2" in capsys.readouterr().out
    model, config = load_inference(out)
    assert config.model.nf == 16 and config.model.name == "ncsnpp"
    score = _score(model, ckpt_io["x"], ckpt_io["t"])
    ref = ckpt_io["score_ema"]
    assert (score - ref).abs().max() <= 2e-5 * ref.abs().max()
    assert convert_main([str(reference_dir / CKPT), str(tmp_path / "x"), "--config", "ve_cifar",
                         "--config.model.nff=16"]) == 1
    assert "unknown key 'nff'; valid: " in capsys.readouterr().err


def test_converter_refuses_a_taken_output_path_unless_overwrite(tmp_path, capsys):
    model, config = _mlp()
    ema = ExponentialMovingAverage(model.parameters(), decay=0.99)
    path = tmp_path / "checkpoint_1.pth"
    _reference_style_checkpoint(path, model, ema, step=1)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))

    def convert(out, *extra):
        status = convert_main([str(path), str(out), "--config", str(tmp_path / "config.json"),
                               *extra])
        return status, capsys.readouterr().err

    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    assert convert(a_file) == (1, f"error: output {a_file} exists and is not a directory; "
                                  "choose another path\n")
    assert convert(a_file, "--overwrite")[0] == 1 and a_file.read_text() == "keep me"
    assert convert(tmp_path / "out") == (0, "")
    status, error = convert(tmp_path / "out")
    assert status == 1 and "is not empty; pass --overwrite" in error
    assert convert(tmp_path / "out", "--overwrite") == (0, "")
    # a directory that is not an earlier conversion (e.g. a workdir) is never written into
    status, error = convert(tmp_path, "--overwrite")
    assert status == 1 and "is not an inference directory" in error
    assert json.loads((tmp_path / "config.json").read_text()) == config.to_dict()
