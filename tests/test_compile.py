"""``torch.compile`` of the network (``training.compile``, ``sampling.compile``;
``utils.compile``): a clear error where the backend cannot run, compiled training equal to eager
with checkpoints free of the ``_orig_mod.`` wrapper prefix (loading strictly into an uncompiled
model), compiled sampling equal to eager.

The default suite trains with the ``aot_eager`` backend (dynamo's graph capture and
AOTAutograd, a few seconds) and runs one tiny inductor forward (the backend users get; it
generates and builds C++ on a CPU, ~15 s), skipped with the reason where no C++ compiler is
present; inductor training and sampling run in the ``slow`` tests.
"""

from __future__ import annotations

import functools

import pytest
import torch

from configs.toy_2d import get_config
from models.utils import create_model
from score_sde.training import acceleration, checkpoints, loop
from score_sde.training.sampling import generate, get_sde
from score_sde.utils import compile as compile_utils
from score_sde.utils.precision import unwrap_model

NO_INDUCTOR = compile_utils.compile_unavailable("cpu")


def test_compile_where_the_backend_cannot_run_is_refused_naming_why_and_the_key(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_utils.shutil, "which", lambda name: None)
    reason = compile_utils.compile_unavailable("cpu")
    assert "needs a C++ compiler on cpu (none of g++, c++, clang++ is on PATH" in reason
    with pytest.raises(RuntimeError, match=r"config.sampling.compile=True: torch.compile cannot "
                                           r"run here: the inductor backend needs a C\+\+ "
                                           r".*Set config.sampling.compile=False"):
        compile_utils.compile_model(torch.nn.Linear(2, 2), "cpu", key="config.sampling.compile")


def _toy(workdir_compile: bool, n_iters: int = 3):
    config = get_config()
    config.device = "cpu"
    config.model.nf = 16
    config.data.num_samples = 256
    config.training.batch_size = 32
    config.training.n_iters = n_iters
    config.training.snapshot_freq = 100
    config.training.snapshot_freq_for_preemption = 100
    config.training.log_freq = 100
    config.training.eval_freq = 100
    config.training.snapshot_sampling = False
    config.training.compile = workdir_compile
    config.optim.warmup = 0  # training moves the weights in 3 steps
    return config


def _train_compiled_and_eager(tmp_path, monkeypatch, backend):
    if backend != "inductor":
        monkeypatch.setattr(compile_utils, "compile_model",
                            functools.partial(compile_utils.compile_model, backend=backend))
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        workdir = tmp_path / f"compile_{compiled}"
        loop.train(_toy(compiled), workdir, progress=False)
        runs[compiled] = torch.load(checkpoints.meta_path(workdir), weights_only=True)
    eager, compiled = runs[False], runs[True]
    assert list(compiled["model"]) == list(eager["model"])  # keys unchanged: no _orig_mod.
    assert not any("_orig_mod" in k for k in compiled["model"])
    model = create_model(_toy(False))
    model.load_state_dict(compiled["model"], strict=True)  # loads into an uncompiled model
    torch.manual_seed(0)
    init = create_model(_toy(False)).state_dict()
    for k in eager["model"]:  # the same training (rounding aside) ...
        torch.testing.assert_close(compiled["model"][k], eager["model"][k], rtol=1e-4,
                                   atol=1e-6)
    assert max((eager["model"][k] - init[k]).abs().max() for k in init) > 1e-3  # ... that moved
    # the compiled network's outputs equal the eager one's on the same weights
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(64, 2, generator=g), torch.rand(64, generator=g) * 999
    out = acceleration.compiled(model, "cpu", "config.training.compile")(x, t)
    ref = model(x, t)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_compiled_training_equals_eager_and_its_checkpoint_loads_uncompiled(tmp_path,
                                                                           monkeypatch):
    _train_compiled_and_eager(tmp_path, monkeypatch, "aot_eager")


@pytest.mark.skipif(NO_INDUCTOR is not None, reason=f"torch.compile (inductor): {NO_INDUCTOR}")
def test_a_tiny_inductor_network_equals_eager_and_keeps_its_state_dict_keys():
    """The default backend compiles a tiny score network: outputs within 1e-5 of eager, and the
    state dict of what a run saves (the bare network) loads strictly into an uncompiled one."""
    torch.manual_seed(0)
    config = _toy(False)
    config.model.nf = 16
    model = create_model(config).eval()
    network = compile_utils.compile_model(model, "cpu")
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(16, 2, generator=g), torch.rand(16, generator=g) * 999
    with torch.no_grad():
        out, ref = network(x, t), model(x, t)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert unwrap_model(network) is model
    saved = unwrap_model(network).state_dict()
    assert not any("_orig_mod" in k for k in saved)
    create_model(config).load_state_dict(saved, strict=True)


@pytest.mark.slow
@pytest.mark.skipif(NO_INDUCTOR is not None, reason=f"torch.compile (inductor): {NO_INDUCTOR}")
def test_inductor_training_equals_eager_and_its_checkpoint_loads_uncompiled(tmp_path,
                                                                           monkeypatch):
    _train_compiled_and_eager(tmp_path, monkeypatch, "inductor")


@pytest.mark.slow
@pytest.mark.skipif(NO_INDUCTOR is not None, reason=f"torch.compile (inductor): {NO_INDUCTOR}")
def test_inductor_sampling_equals_eager():
    config = _toy(False)
    torch.manual_seed(0)
    model = create_model(config).eval()
    sde = get_sde(config)
    config.sampling.nfe = 6
    samples = {}
    for compiled in (False, True):
        config.sampling.compile = compiled
        samples[compiled], _ = generate(config, sde, model, (16, 2), inverse_scaler=lambda x: x,
                                        generator=torch.Generator().manual_seed(1))
    # 6 solver steps amplify the network's rounding differences (1e-5 in its outputs, above)
    torch.testing.assert_close(samples[True], samples[False], rtol=1e-4, atol=1e-4)
    assert unwrap_model(acceleration.compiled(model, "cpu", "k")) is model
