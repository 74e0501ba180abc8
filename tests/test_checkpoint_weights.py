"""Bad weights (NaN/inf, or an integer, bool or uint8 tensor where the model has a float) are
refused on every load path, naming the file and the tensor: resume, ``--mode sample
--checkpoint`` (.pth and .safetensors), ``load_inference``, the converter and the reference
loader. Legitimate non-float entries (EMA ``num_updates``, optimizer ``step``, uint8 generator
states, integer buffers) still load."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest
import safetensors.torch
import torch
from conftest import REPO
from torch import nn

from models.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    check_tensors,
    load_inference,
    load_model_state,
    load_reference_checkpoint,
    safe_load,
    save_inference,
)
from models.convert import main as convert_main
from models.ema import ExponentialMovingAverage
from models.utils import create_model
from score_sde.training import checkpoints, loop, validation
from score_sde.training.inference import load_ema_model

NAME = "Dense_in.weight"  # a float32 parameter of the toy MLP, the 5th in parameters() order
INDEX = 4
KINDS = ["nan", "inf", "int64", "bool", "uint8"]


def _bad(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """``tensor`` made unusable: a NaN/inf entry, or cast to a non-float dtype."""
    if kind in ("nan", "inf"):
        bad = tensor.detach().clone()
        bad.view(-1)[1] = float(kind)
        return bad
    return (tensor != 0) if kind == "bool" else tensor.detach().to(getattr(torch, kind))


def _expected_message(kind: str, tensor_name: str) -> str:
    if kind in ("nan", "inf"):
        return f"{tensor_name} has NaN or inf values (1 of "
    return f"{tensor_name} is {kind}, the model's is float32"


def _match(kind: str, tensor_name: str) -> str:
    return re.escape(_expected_message(kind, tensor_name))


def _toy_config(n_iters: int = 2):
    config = importlib.import_module("configs.toy_2d").get_config()
    config.device = "cpu"
    config.model.nf = 8
    config.data.num_samples = 64
    t = config.training
    t.n_iters, t.batch_size, t.snapshot_sampling = n_iters, 16, False
    t.snapshot_freq, t.snapshot_freq_for_preemption, t.log_freq, t.eval_freq = 100, 2, 100, 100
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy run of 2 steps: its preemption checkpoint has Adam buffers and an EMA."""
    workdir = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    loop.train(_toy_config(), workdir, progress=False)
    return workdir, torch.load(checkpoints.meta_path(workdir), weights_only=True)


def _poisoned(ckpt: dict, entry: str, kind: str) -> tuple[dict, str]:
    """A copy of a training checkpoint with one tensor of ``entry`` made bad, and its name."""
    ckpt = {**ckpt, "model": dict(ckpt["model"]), "ema": dict(ckpt["ema"]),
            "optimizer": {**ckpt["optimizer"], "state": dict(ckpt["optimizer"]["state"])}}
    if entry == "model":
        ckpt["model"][NAME] = _bad(ckpt["model"][NAME], kind)
        return ckpt, f"model.{NAME}"
    if entry == "ema":
        shadows = list(ckpt["ema"]["shadow_params"])
        shadows[INDEX] = _bad(shadows[INDEX], kind)
        ckpt["ema"]["shadow_params"] = shadows
        return ckpt, f"ema.{NAME}"
    state = dict(ckpt["optimizer"]["state"][INDEX])
    state["exp_avg"] = _bad(state["exp_avg"], kind)
    ckpt["optimizer"]["state"][INDEX] = state
    return ckpt, f"optimizer.state.{INDEX}.exp_avg"


# -- the policy of the one check ------------------------------------------------------------------


def test_dtype_policy_floats_cast_others_exact_and_finiteness_only_for_floats():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    state = model.state_dict()
    assert state["1.num_batches_tracked"].dtype == torch.int64
    for dtype in (torch.float16, torch.bfloat16, torch.float64):  # the allowed casts
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        load_model_state(model, cast, source="half.pth")
        assert model[0].weight.dtype == torch.float32
    with pytest.raises(CheckpointError, match=r"x\.pth: refused .*model\.1\.num_batches_tracked "
                                              r"is int32, the model's is int64 \(allowed: "
                                              r"int64\)"):
        check_tensors({**state, "1.num_batches_tracked": torch.tensor(0, dtype=torch.int32)},
                      "x.pth", state)
    with pytest.raises(CheckpointError, match=r"model\.0\.weight is complex64, the model's is "
                                              r"float32 \(allowed: float16, bfloat16, float32, "
                                              r"float64\)"):
        check_tensors({**state, "0.weight": state["0.weight"].to(torch.complex64)}, "x.pth",
                      state)
    huge = state["0.weight"].double().fill_(1e300)  # finite in float64, inf in float32
    with pytest.raises(CheckpointError, match="model.0.weight has float64 values beyond the "
                                              "range of the model's float32"):
        check_tensors({**state, "0.weight": huge}, "x.pth", state)
    # without a counterpart: floats must be finite, integer counters are not checked
    check_tensors({"step": torch.tensor(7), "rng": torch.zeros(8, dtype=torch.uint8)}, "x.pth")
    with pytest.raises(CheckpointError, match=r"x\.pth: .*optimizer\.step has NaN"):
        check_tensors({"step": torch.tensor(float("nan"))}, "x.pth", what="optimizer")


# -- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["model", "ema", "optimizer"])
@pytest.mark.parametrize("kind", KINDS)
def test_resume_refuses_bad_tensors_naming_file_and_tensor(trained, tmp_path, entry, kind):
    _, ckpt = trained
    bad, name = _poisoned(ckpt, entry, kind)
    path = tmp_path / "checkpoint.pth"
    torch.save(bad, path)
    state, _ = loop.build(_toy_config())
    before = state["model"].state_dict()[NAME].clone()
    with pytest.raises(CheckpointError, match=_match(kind, name)) as info:
        checkpoints.restore_checkpoint(path, state)
    assert str(info.value).startswith(str(path))
    assert torch.equal(state["model"].state_dict()[NAME], before)  # nothing was loaded
    with pytest.raises(CheckpointError, match=_match(kind, name)):
        validation.validate_checkpoint_file(path, _toy_config())  # main.py's check first


def test_resume_of_a_good_checkpoint_loads_its_counters_and_generator_states(trained):
    workdir, ckpt = trained
    assert isinstance(ckpt["ema"]["num_updates"], int)
    assert ckpt["rng"]["torch"].dtype == torch.uint8
    state, _ = loop.build(_toy_config())
    checkpoints.restore_checkpoint(checkpoints.meta_path(workdir), state)
    assert state["step"] == 2 and state["ema"].num_updates == ckpt["ema"]["num_updates"]
    assert torch.equal(state["optimizer"].state_dict()["state"][INDEX]["step"],
                       ckpt["optimizer"]["state"][INDEX]["step"])


# -- --mode sample --checkpoint (.pth and .safetensors) ------------------------------------------


@pytest.mark.parametrize("entry", ["model", "ema"])
@pytest.mark.parametrize("kind", KINDS)
def test_sample_checkpoint_pth_refuses_bad_tensors(trained, tmp_path, entry, kind):
    _, ckpt = trained
    bad, name = _poisoned(ckpt, entry, kind)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match=_match(kind, name)) as info:
        load_ema_model(_toy_config(), path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("kind", KINDS)
def test_sample_checkpoint_safetensors_refuses_bad_tensors(trained, tmp_path, kind):
    _, ckpt = trained
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({**ckpt["model"], NAME: _bad(ckpt["model"][NAME], kind)}, path)
    with pytest.raises(CheckpointError, match=_match(kind, f"model.{NAME}")) as info:
        load_ema_model(_toy_config(), path)
    assert str(info.value).startswith(str(path))
    safetensors.torch.save_file(ckpt["model"], path)  # the same file with good weights loads
    model, step = load_ema_model(_toy_config(), path)
    assert step == 0 and torch.equal(model.state_dict()[NAME], ckpt["model"][NAME])


def _sample_cli_refuses(trained, tmp_path, name, message):
    workdir, ckpt = trained
    if name.endswith(".pth"):
        pth, _ = _poisoned(ckpt, "ema", "nan")
        torch.save(pth, tmp_path / name)
    else:
        safetensors.torch.save_file({**ckpt["model"], NAME: ckpt["model"][NAME].long()},
                                    tmp_path / name)
    flags = ["--config=toy_2d", "--config.model.nf=8", "--config.eval.batch_size=4",
             "--config.sampling.nfe=2", "--mode=sample", "--num_samples=4", "--noprogress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(REPO / "main.py"), *flags, f"--workdir={workdir}",
         f"--checkpoint={tmp_path / name}", "--eval_folder=bad"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert str(tmp_path / name) in result.stderr and message in result.stderr
    assert not (workdir / "bad").exists()


def test_sample_cli_exits_with_the_file_and_tensor_named(trained, tmp_path):
    _sample_cli_refuses(trained, tmp_path, "nan.pth", f"ema.{NAME} has NaN or inf values")


@pytest.mark.slow  # the same exit as the .pth above; the .safetensors refusal of every kind is
# test_sample_checkpoint_safetensors_refuses_bad_tensors (the loader --checkpoint calls)
def test_sample_cli_exits_naming_an_int_safetensors_tensor(trained, tmp_path):
    _sample_cli_refuses(trained, tmp_path, "int.safetensors",
                        f"model.{NAME} is int64, the model's is float32")


# -- load_inference -------------------------------------------------------------------------------


@pytest.mark.parametrize("sha", ["recorded", "absent"])
@pytest.mark.parametrize("kind", KINDS)
def test_load_inference_refuses_bad_tensors_whatever_the_sha256(tmp_path, kind, sha):
    config = _toy_config()
    model = create_model(config)
    out = save_inference(model, config, tmp_path / "inf",
                         ema=ExponentialMovingAverage(model.parameters(), decay=0.9))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    data = safetensors.torch.save({**state, NAME: _bad(state[NAME], kind)})
    (out / "ema.safetensors").write_bytes(data)
    record = json.loads((out / CONFIG_FILE).read_text())
    if sha == "recorded":  # the hash of the bad file: only detects damage, not bad weights
        record["sha256"]["ema.safetensors"] = hashlib.sha256(data).hexdigest()
    else:
        del record["sha256"]["ema.safetensors"]
    (out / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=_match(kind, f"model.{NAME}")) as info:
        load_inference(out)
    assert str(info.value).startswith(str(out / "ema.safetensors"))
    load_inference(out, weights="raw")  # the untouched file still loads


# -- the reference loader and the converter -------------------------------------------------------


def _reference_style(ckpt: dict) -> dict:
    """Our training checkpoint in the reference's layout (``module.`` prefix, 4 entries)."""
    return {"optimizer": ckpt["optimizer"], "ema": ckpt["ema"], "step": ckpt["step"],
            "model": {"module." + k: v for k, v in ckpt["model"].items()}}


@pytest.mark.parametrize("entry", ["model", "ema"])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_loader_and_converter_refuse_bad_tensors(trained, tmp_path, capsys, entry,
                                                           kind):
    _, ckpt = trained
    bad, name = _poisoned(ckpt, entry, kind)
    path = tmp_path / "checkpoint_1.pth"
    torch.save(_reference_style(bad), path)
    model = create_model(_toy_config())
    ema = ExponentialMovingAverage(model.parameters(), decay=0.999)
    with pytest.raises(CheckpointError, match=_match(kind, name)) as info:
        load_reference_checkpoint(path, model, ema=ema)
    assert str(info.value).startswith(str(path))

    (tmp_path / "config.json").write_text(json.dumps(_toy_config().to_dict()))
    out = tmp_path / "converted"
    assert convert_main([str(path), str(out), "--config", str(tmp_path / "config.json")]) == 1
    error = capsys.readouterr().err
    assert str(path) in error and _expected_message(kind, name) in error
    assert not out.exists()


def test_reference_fixture_with_a_nan_ema_weight_is_refused(reference_dir, tmp_path):
    ckpt = safe_load(reference_dir / "ncsnpp_ve_checkpoint.pth")  # its numpy lr needs the allowlist
    ckpt["ema"]["shadow_params"][3] = _bad(ckpt["ema"]["shadow_params"][3], "nan")
    path = tmp_path / "ncsnpp_nan.pth"
    torch.save(ckpt, path)
    config = json.loads((reference_dir / "ncsnpp_ve.json").read_text())["config"]
    out = tmp_path / "converted"
    assert convert_main([str(path), str(out), "--config", str(reference_dir / "ncsnpp_ve.json")
                         ]) == 1
    assert not out.exists()
    model = create_model(ml_collections.ConfigDict(config))
    name = [n for n, p in model.named_parameters() if p.requires_grad][3]
    with pytest.raises(CheckpointError, match=f"ema.{name} has NaN or inf values"):
        load_reference_checkpoint(path, model,
                                  ema=ExponentialMovingAverage(model.parameters(), 0.999))
