"""Class-conditional training and sampling end to end, and batched classifier-free guidance.

Labels reach the network through every loss (sharded rows keep theirs), the data iterator reads
them without changing the batches, validation names the numbers it refuses, batched guidance
equals the two-call one and the exact guided score of a Gaussian mixture, the official DiT
channel rule touches channels 0-2 only, and ``--mode sample --classes`` records its classes.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from torch import nn

import samplers
import sde_lib
from models.utils import create_model, get_score_fn
from score_sde import datasets, losses
from score_sde.oracle import GaussianMixture
from score_sde.training import classes, distributed, validation
from score_sde.training.images import class_rows
from score_sde.training.sampling import generate, sampling_record, sampling_score_fn

# -- helpers -----------------------------------------------------------------------------------


class Recorder(nn.Module):
    """A network that records the class labels it is called with ('absent' without them)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5))
        self.seen: list = []

    def forward(self, x, labels, **kwargs):
        self.seen.append(kwargs.get("class_labels", "absent"))
        return x * self.weight + 1e-3 * labels.float().reshape(-1, *[1] * (x.dim() - 1))


def _toy_config(num_classes=4, cfg_scale=None):
    """toy_2d on the analytic 4-mode mixture ('gmm', 4 classes), a small MLP."""
    config = importlib.import_module("configs.toy_2d").get_config()
    config.device = "cpu"
    config.data.dataset = "gmm"
    config.data.num_samples = 256
    config.training.batch_size = 64
    config.model.nf = 16
    config.model.num_classes = num_classes
    config.sampling.cfg_scale = cfg_scale
    config.sampling.nfe = 6
    return config


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = create_model(config).eval()
    with torch.no_grad():  # the null row apart from the others, so guidance visibly matters
        model.label_embedding.weight[-1].mul_(3.0)
    return model


LOSSES = {
    "sde": lambda: (sde_lib.VPSDE(), losses.get_sde_loss_fn(sde_lib.VPSDE(), True)),
    "ssm": lambda: (sde_lib.VPSDE(), losses.get_ssm_loss_fn(sde_lib.VPSDE(), True,
                                                            num_probes=2)),
    "ddpm": lambda: (sde_lib.VPSDE(), losses.get_ddpm_loss_fn(sde_lib.VPSDE(), True)),
    "smld": lambda: (sde_lib.VESDE(N=10), losses.get_smld_loss_fn(sde_lib.VESDE(N=10), True)),
}


# -- losses --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_labels_reach_the_model_in_every_loss_and_change_no_draw(name):
    _, loss_fn = LOSSES[name]()
    batch = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = Recorder()
    with_labels = loss_fn(model, batch, generator=torch.Generator().manual_seed(1),
                          class_labels=y)
    without = loss_fn(model, batch, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.seen[0], y)
    assert model.seen[-1] == "absent"  # an unconditional call is the plain model(x, t_label)
    assert torch.equal(with_labels, without)  # the labels draw nothing

    model.seen.clear()
    loss_fn(model, batch, generator=torch.Generator().manual_seed(1), shard=slice(2, 4),
            class_labels=y)
    assert torch.equal(model.seen[0], y[2:4])  # the shard's own rows


def test_step_fn_passes_labels_to_the_loss_in_training_and_evaluation():
    sde = sde_lib.VPSDE()
    model = Recorder()
    state = dict(model=model, ema=None, step=0,
                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    y = torch.tensor([3, 1, 2, 0])
    train = losses.get_step_fn(sde, True, optimize_fn=lambda opt, params, step: opt.step())
    train(state, torch.randn(4, 2), generator=torch.Generator().manual_seed(0), class_labels=y)
    losses.get_step_fn(sde, False)(state, torch.randn(4, 2), class_labels=y)
    assert len(model.seen) == 2 and all(torch.equal(s, y) for s in model.seen)
    with pytest.raises(ValueError, match=r"class_labels must be an integer tensor \(4,\)"):
        train(state, torch.randn(4, 2), class_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="class_labels must be an integer tensor"):
        train(state, torch.randn(4, 2), class_labels=torch.zeros(4))


def test_sharded_losses_with_labels_average_to_the_whole_batch_loss():
    """Two shards' losses average to the global one only if every row keeps its own label: the
    model's output depends on the label, so a misaligned shard changes the loss."""
    config = _toy_config()
    model = _model(config)
    sde = sde_lib.VPSDE()
    loss_fn = losses.get_sde_loss_fn(sde, False)
    batch = torch.randn(8, 2)
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])

    def loss(**kw):
        return loss_fn(model, batch, generator=torch.Generator().manual_seed(5), class_labels=y,
                       **kw)

    whole = loss()
    halves = (loss(shard=slice(0, 4)) + loss(shard=slice(4, 8))) / 2
    assert torch.allclose(halves, whole, rtol=1e-6)
    flipped = loss_fn(model, batch, generator=torch.Generator().manual_seed(5),
                      class_labels=y.roll(1))
    assert not torch.allclose(flipped, whole, rtol=1e-3)  # the check above can see labels


# -- data ----------------------------------------------------------------------------------------


def test_iterator_with_labels_reads_the_same_batches_and_resumes():
    config = importlib.import_module("configs.digits").get_config()
    data = datasets.get_dataset(config, "train")
    plain = datasets.DataIterator(data, 16, seed=3)
    labelled = datasets.DataIterator(data, 16, seed=3, with_labels=True)
    for _ in range(3):
        x, y = next(labelled)
        assert torch.equal(next(plain), x) and y.dtype == torch.int64
    assert plain.state_dict() == labelled.state_dict()
    # the labels are those of the samples drawn: recover each row's index from its pixels
    order = labelled._order[32:48]
    assert torch.equal(y, data.labels[order])
    resumed = datasets.DataIterator(data, 16, seed=3, with_labels=True)
    resumed.load_state_dict(labelled.state_dict())
    a, b = next(labelled), next(resumed)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_sharded_dataset_keeps_every_rows_label():
    config = _toy_config()
    data = datasets.get_dataset(config, "train")
    ctx = distributed.Context(rank=1, world_size=2)
    sharded = distributed.shard_dataset(data, 32, ctx)
    x_all, y_all = next(datasets.DataIterator(data, 32, seed=0, with_labels=True))
    x, y = next(datasets.DataIterator(sharded, 32, seed=0, with_labels=True))
    assert torch.equal(y, y_all)  # the loss shards them with the rows
    assert torch.equal(x[16:], x_all[16:]) and not x[:16].any()


# -- validation ----------------------------------------------------------------------------------


def test_a_dataset_without_classes_or_with_too_many_is_refused_naming_both_numbers():
    config = _toy_config()
    config.data.dataset = "toy_2d"  # the checkerboard: no classes
    with pytest.raises(ValueError, match=r"num_classes=4 .* 'toy_2d' \(train split\) has no "
                                         r"classes \(0\)"):
        validation.validate_dataset(config, ("train",))
    digits = importlib.import_module("configs.digits").get_config()
    digits.model.num_classes = 5
    with pytest.raises(ValueError, match=r"'digits' \(train split\) has 10 classes, more than "
                                         r"config.model.num_classes=5"):
        validation.validate_dataset(digits, ("train",))
    digits.model.num_classes = 0  # unconditional: nothing to check
    validation.validate_dataset(digits, ("train",))


@pytest.mark.parametrize("key, value, error, message", [
    ("classes", (3, 12), ValueError, r"config.sampling.classes=3,12: \[12\] outside \[0, 9\]"),
    ("classes", (1.5,), TypeError, "must hold integers"),
    ("cfg_scale", -0.5, ValueError, "finite number >= 0"),
    ("cfg_scale", float("nan"), ValueError, "finite number >= 0"),
    ("num_classes", -1, ValueError, "num_classes must be an integer >= 0"),
])
def test_class_and_guidance_keys_are_checked(key, value, error, message):
    config = importlib.import_module("configs.digits").get_config()
    config.model.num_classes = 10
    (config.model if key == "num_classes" else config.sampling)[key] = value
    with pytest.raises(error, match=message):
        validation.validate_config(config)


def test_an_unconditional_model_is_refused_classes_and_guidance():
    config = importlib.import_module("configs.digits").get_config()
    config.sampling.classes = (3,)
    with pytest.raises(ValueError, match=r"classes=3 given, but the model is unconditional"):
        validation.validate_config(config)
    config.sampling.classes = None
    config.sampling.cfg_scale = 1.5
    with pytest.raises(ValueError, match=r"cfg_scale=1.5 needs a class-conditional model .*"
                                         r"num_classes=0"):
        validation.validate_config(config)
    model = create_model(_toy_config(num_classes=0))
    with pytest.raises(ValueError, match="class labels given to the unconditional MLP"):
        sampling_score_fn(_toy_config(num_classes=0), sde_lib.VPSDE(), model,
                          torch.tensor([0, 1]))


def test_official_guidance_needs_three_channels():
    config = importlib.import_module("configs.digits").get_config()
    config.model.num_classes = 10
    config.sampling.cfg_scale = 4.0
    config.sampling.cfg_official = True
    with pytest.raises(ValueError, match="needs images with at least 3 channels; the data has "
                                         "1 channel"):
        validation.validate_config(config)
    cfg = samplers.ClassifierFreeGuidance.batched(lambda x, t: x.clone(), 3.0, official_dit=True)
    with pytest.raises(ValueError, match=r"official_dit=True guides channels 0-2 and needs at "
                                         r"least 3 channels .* \(2, 1, 4, 4\)"):
        cfg(torch.zeros(2, 1, 4, 4), torch.ones(2))


def test_the_classes_flag_is_parsed_and_checked():
    from score_sde.cli import apply_classes_flag

    config = importlib.import_module("configs.digits").get_config()
    config.model.num_classes = 10
    apply_classes_flag(config, "sample", ["3", "7"])
    assert config.sampling.classes == (3, 7)
    with pytest.raises(ValueError, match=r"--classes=3,10: \[10\] outside \[0, 9\] "
                                         r"\(config.model.num_classes=10\)"):
        apply_classes_flag(config, "sample", ["3", "10"])
    with pytest.raises(ValueError, match="comma-separated class indices"):
        apply_classes_flag(config, "sample", ["3", "seven"])
    with pytest.raises(ValueError, match="--classes applies to --mode sample, not --mode train"):
        apply_classes_flag(config, "train", ["3"])
    config.model.num_classes = 0
    with pytest.raises(ValueError, match="--classes=3 given, but the model is unconditional"):
        apply_classes_flag(config, "sample", ["3"])


# -- classifier-free guidance ------------------------------------------------------------------


def _cond_uncond_doubled(model, config, y):
    sde = sde_lib.VPSDE()
    null = torch.full_like(y, model.null_label)
    return (get_score_fn(sde, model, continuous=True, class_labels=y),
            get_score_fn(sde, model, continuous=True, class_labels=null),
            get_score_fn(sde, model, continuous=True, class_labels=torch.cat([y, null])))


def test_batched_guidance_equals_the_two_call_guidance_and_counts_one_nfe_per_call():
    config = _toy_config()
    model = _model(config)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    cond, uncond, doubled = _cond_uncond_doubled(model, config, y)
    two = samplers.ClassifierFreeGuidance(cond, uncond, 3.0)
    one = samplers.ClassifierFreeGuidance.batched(doubled, 3.0)
    x, t = torch.randn(6, 2), torch.rand(6) * 0.9 + 0.05
    with torch.no_grad():
        a, b, c, u = two(x, t), one(x, t), cond(x, t), uncond(x, t)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert (a - c).abs().max() > 0.1 * c.abs().max()  # the guidance term is not negligible
    assert torch.allclose(b, u + 4.0 * (c - u), rtol=1e-5, atol=1e-5)  # DiT's s = w + 1 = 4

    sde = sde_lib.VPSDE()
    kw = dict(nfe=6, generator=None, seeds=list(range(6)))
    x1, info1 = samplers.sample(sde, one, (6, 2), "dpm_solver++_2m", **kw)
    x2, info2 = samplers.sample(sde, two, (6, 2), "dpm_solver++_2m", **kw)
    assert info1["nfe"] == 6 and info2["nfe"] == 12  # one (2B) network call per evaluation
    assert info1["guidance"]["batched"] and not info2["guidance"]["batched"]
    assert info1["guidance"]["w"] == 3.0 and info1["guidance"]["cfg_scale"] == 4.0
    assert torch.allclose(x1, x2, rtol=1e-4, atol=1e-4)


def test_guidance_scale_one_is_the_conditional_model():
    config = _toy_config()
    model = _model(config)
    y = torch.tensor([3, 2, 1, 0])
    cond, _, doubled = _cond_uncond_doubled(model, config, y)
    x, t = torch.randn(4, 2), torch.full((4,), 0.5)
    with torch.no_grad():
        guided = samplers.ClassifierFreeGuidance.batched(doubled, 0.0)(x, t)  # s = 1
        assert torch.equal(guided, doubled(torch.cat([x, x]), torch.cat([t, t]))[:4])
        assert torch.allclose(guided, cond(x, t), rtol=1e-5, atol=1e-6)
    # through the config: s = 1 samples the conditional model alone, bit for bit
    g = dict(inverse_scaler=lambda v: v)
    one, info = generate(_toy_config(cfg_scale=1.0), sde_lib.VPSDE(), model, (4, 2),
                         generator=torch.Generator().manual_seed(0), class_labels=y, **g)
    plain, _ = generate(_toy_config(), sde_lib.VPSDE(), model, (4, 2),
                        generator=torch.Generator().manual_seed(0), class_labels=y, **g)
    assert torch.equal(one, plain) and "guidance" not in info


def test_batched_guidance_is_the_exact_guided_score_of_a_gaussian_mixture():
    """With exact scores, (1 + w) score(x | y) - w score(x) = score(x) + (1 + w) grad log p_t(y|x)
    (Bayes): the batched guidance equals classifier guidance at scale s = 1 + w with the exact
    class posterior of the mixture, computed by autograd instead."""
    sde = sde_lib.VPSDE()
    mixture = GaussianMixture.ring(n_modes=4, radius=2.0, std=0.5)
    y = torch.tensor([0, 1, 2, 3, 1])

    def doubled(x, t):  # rows 0..B-1 of class y, rows B..2B-1 the unconditional score
        B = x.shape[0] // 2
        return torch.cat([mixture.score(x[:B], t[:B], sde, label=y),
                          mixture.score(x[B:], t[B:], sde)])

    def log_prob_fn(x, t, labels):
        return mixture.class_log_posterior(x, t, sde).gather(1, labels[:, None]).squeeze(1)

    x, t = torch.randn(5, 2, dtype=torch.float64) * 2, torch.full((5,), 0.3, dtype=torch.float64)
    for s in (0.0, 1.5, 4.0):
        guided = samplers.ClassifierFreeGuidance.batched(doubled, s - 1.0)(x, t)
        exact = samplers.ClassifierGuidance(mixture.score_fn(sde), log_prob_fn, y, s)(x, t)
        assert torch.allclose(guided, exact, rtol=1e-9, atol=1e-9), s


def test_official_rule_changes_only_channels_0_to_2_and_guides_eps_with_v_conditional():
    calls = []

    class Doubled:
        """A fake 4-channel network on the doubled batch, with the learned-variance interface."""

        def __call__(self, x, t):
            calls.append("score")
            return self.eps_and_v(x, t, count=False)[0] * -1.0

        def eps_and_v(self, x, t, count=True):
            if count:
                calls.append("eps_and_v")
            B = x.shape[0] // 2
            half = torch.cat([torch.ones(B), torch.zeros(B)])[:, None, None, None]
            eps = x * (1.0 + half) + 0.1 * torch.arange(4.0)[None, :, None, None]
            return eps, eps * 0.5 + 2.0 * half

    x, t = torch.randn(3, 4, 2, 2), torch.full((3,), 0.4)
    fn = Doubled()
    cond = fn(torch.cat([x, x]), torch.cat([t, t]))[:3]
    plain = samplers.ClassifierFreeGuidance.batched(fn, 3.0)
    official = samplers.ClassifierFreeGuidance.batched(fn, 3.0, official_dit=True)
    calls.clear()
    a, b = plain(x, t), official(x, t)
    assert calls == ["score", "score"]
    assert torch.equal(b[:, :3], a[:, :3])  # channels 0-2 guided as usual
    assert torch.equal(b[:, 3:], cond[:, 3:])  # channel 3: the conditional half's own output
    assert (a[:, 3:] - cond[:, 3:]).abs().min() > 0  # which plain guidance does change
    assert (b[:, :3] - cond[:, :3]).abs().min() > 0

    eps_all, v_all = fn.eps_and_v(torch.cat([x, x]), torch.cat([t, t]), count=False)
    calls.clear()
    eps, v = official.eps_and_v(x, t)
    assert calls == ["eps_and_v"] and official.nfe_per_call == 1  # counted once
    eps_c, eps_u = eps_all[:3], eps_all[3:]
    assert torch.allclose(eps[:, :3], (eps_u + 4.0 * (eps_c - eps_u))[:, :3])
    assert torch.equal(eps[:, 3:], eps_c[:, 3:]) and torch.equal(v, v_all[:3])
    assert not hasattr(samplers.ClassifierFreeGuidance.batched(lambda x, t: x, 1.0), "eps_and_v")


def test_the_two_function_constructor_still_works_and_checks_its_inputs():
    f = lambda x, t: -x  # noqa: E731
    cfg = samplers.ClassifierFreeGuidance(f, lambda x, t: -2 * x, w=2.0)
    assert cfg.nfe_per_call == 2 and torch.allclose(cfg(torch.ones(2, 2), 0.5), torch.ones(2, 2))
    with pytest.raises(ValueError, match="w must be a finite number"):
        samplers.ClassifierFreeGuidance(f, f, float("inf"))
    with pytest.raises(TypeError, match="needs cond_score_fn and uncond_score_fn"):
        samplers.ClassifierFreeGuidance(f, None, 1.0)
    with pytest.raises(ValueError, match="channels must be None"):
        samplers.ClassifierFreeGuidance.batched(f, 1.0, channels=0)


# -- sampling records and grids -----------------------------------------------------------------


def test_sample_classes_cycle_and_records_list_them_with_s_and_w():
    config = _toy_config(cfg_scale=1.5)
    assert classes.sample_classes(config) == (0, 1, 2, 3)
    assert classes.sample_class_labels((3, 7), 3, 4).tolist() == [7, 3, 7, 3]
    model = _model(config)
    x, info = generate(config, sde_lib.VPSDE(), model, (5, 2), inverse_scaler=lambda v: v,
                       generator=torch.Generator().manual_seed(0))
    record = sampling_record(config, info)
    assert record["classes"]["classes"] == [0, 1, 2, 3]
    g = record["guidance"]
    assert (g["cfg_scale"], g["w"], g["batched"], g["nfe_per_call"]) == (1.5, 0.5, True, 1)
    assert record["nfe"] == 6 and "cfg_official" not in record["not_applied"]
    unconditional = sampling_record(_toy_config(num_classes=0), {"nfe": 6})
    assert "classes" not in unconditional and "guidance" not in unconditional
    assert not set(configs_class_keys()) & set(unconditional["not_applied"])


def configs_class_keys():
    from configs.sampling import CLASS_KEYS

    return CLASS_KEYS


def test_class_rows_put_one_class_per_row_where_that_fits():
    images = torch.arange(5.0)[:, None, None, None].expand(5, 1, 2, 2) / 10
    arranged, cols = class_rows(images, torch.tensor([3, 7, 3, 7, 3]))
    assert cols == 3 and arranged.shape == (6, 1, 2, 2)
    assert arranged[:, 0, 0, 0].tolist() == pytest.approx([0.0, 0.2, 0.4, 0.1, 0.3, 0.0])
    assert class_rows(images, torch.zeros(5, dtype=torch.long)) is None  # one class
    assert class_rows(torch.zeros(10, 1, 2, 2), torch.arange(10)) is None  # 10 rows of one


# -- end to end ----------------------------------------------------------------------------------


def _trained_digits(workdir):
    """Two steps of a tiny class-conditional DDPM++ on the digits (10 classes)."""
    from score_sde.training.loop import train

    config = importlib.import_module("configs.digits").get_config()
    config.device, config.model.nf, config.model.num_classes = "cpu", 8, 10
    t = config.training
    t.n_iters, t.batch_size, t.snapshot_freq, t.eval_freq, t.log_freq = 2, 8, 2, 2, 2
    config.sampling.nfe = 3
    torch.manual_seed(0)
    return config, train(config, workdir, progress=False)


def _check_sample_folder(folder, nfe):
    from PIL import Image

    record = json.loads((folder / "info.json").read_text())["sampling"]
    assert record["classes"]["classes"] == [3, 7]
    assert (record["guidance"]["cfg_scale"], record["guidance"]["w"]) == (4.0, 3.0)
    assert record["guidance"]["batched"] and record["nfe"] == nfe
    assert np.load(folder / "sample.npz")["labels"].tolist() == [3, 7, 3, 7, 3, 7]
    width, height = Image.open(folder / "sample.png").size
    assert width * (2 * 10 + 2) == height * (3 * 10 + 2)  # 2 rows (classes) x 3 columns


def test_training_and_sampling_with_classes_write_labels_and_records(tmp_path):
    from score_sde.cli import apply_classes_flag
    from score_sde.training.inference import run_sample

    config, state = _trained_digits(tmp_path)
    assert state["iterators"]["train"].with_labels and state["step"] == 2
    labels = np.load(tmp_path / "samples" / "iter_2" / "sample.npz")["labels"]
    assert labels.tolist() == list(range(8))  # the snapshot: sample i has class i mod 10
    apply_classes_flag(config, "sample", ["3", "7"])  # what --classes=3,7 does
    config.sampling.cfg_scale = 4.0
    folder = run_sample(config, tmp_path, num_samples=6, progress=False)
    _check_sample_folder(folder, nfe=3)


@pytest.mark.slow
def test_sample_mode_with_the_classes_flag_end_to_end(tmp_path):
    _trained_digits(tmp_path)
    result = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--noprogress", "--config=digits",
         "--config.model.nf=8", "--config.model.num_classes=10", "--config.sampling.nfe=3",
         "--config.sampling.cfg_scale=4.0", f"--workdir={tmp_path}", "--mode=sample",
         "--num_samples=6", "--classes=3,7"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_sample_folder(tmp_path / "eval" / "samples_step_2", nfe=3)


def test_likelihood_of_a_class_conditional_model_uses_each_images_label(tmp_path, monkeypatch):
    from score_sde.training import inference
    from score_sde.training.checkpoints import save_checkpoint
    from score_sde.training.loop import build

    config = _toy_config()
    config.eval.rtol = config.eval.atol = 1e-2
    state, _ = build(config)
    save_checkpoint(tmp_path / "ckpt.pth", state)
    seen = []
    real = inference.get_score_fn

    def recording(*args, **kwargs):
        seen.append(kwargs.get("class_labels"))
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "get_score_fn", recording)
    path = inference.run_likelihood(config, tmp_path, checkpoint=str(tmp_path / "ckpt.pth"),
                                    max_images=6, progress=False)
    summary = json.loads(path.read_text())
    assert summary["class_labels"].startswith("the data's own labels")
    test_labels = datasets.get_dataset(config, "test").labels[:6]
    assert torch.equal(seen[-1], test_labels)


@pytest.mark.slow
def test_two_gloo_ranks_train_a_class_conditional_run_like_one_process(tmp_path):
    """Under torchrun each rank keeps the labels of its rows: two ranks equal one process (a
    misaligned label would change the gradient of the label embedding)."""
    from test_distributed import TOY, _final, _main

    cond = [*TOY, "--config.data.dataset=gmm", "--config.model.num_classes=4",
            "--config.training.n_iters=3"]
    _main(*cond, f"--workdir={tmp_path / 'two'}", nproc=2)
    _main(*cond, f"--workdir={tmp_path / 'one'}")
    two, one = _final(tmp_path / "two"), _final(tmp_path / "one")
    assert two["step"] == one["step"] == 3 and two["data"] == one["data"]
    moved = (one["model"]["label_embedding.weight"] - two["model"]["label_embedding.weight"])
    scale = one["model"]["label_embedding.weight"][:4].abs().max()
    assert moved.abs().max() <= 1e-5 * scale
    for name, a in one["model"].items():
        assert torch.allclose(a, two["model"][name], rtol=1e-5, atol=1e-6), name


def test_eval_loss_and_bits_per_dim_use_the_data_labels(tmp_path):
    from score_sde.evaluation import run

    config = _toy_config()
    config.eval.batch_size = 128
    config.eval.rtol = config.eval.atol = 1e-2
    seen = []

    def eval_step(state, batch, *, generator=None, class_labels=None):
        seen.append(class_labels)
        return batch.new_tensor(1.0)

    loss = run.eval_loss(config, None, eval_step)
    test_labels = datasets.get_dataset(config, "test").labels
    assert torch.equal(torch.cat(seen), test_labels) and loss["class_labels"] == run.DATA_LABELS

    model, sde, bound = _model(config), sde_lib.VPSDE(), []

    def class_score_fn(labels):
        bound.append(labels)
        return get_score_fn(sde, model, continuous=True, class_labels=labels)

    out = tmp_path / "bpd.npz"
    summary = run.eval_bpd(config, get_score_fn(sde, model, continuous=True), sde, out, False,
                           class_score_fn=class_score_fn)
    assert torch.equal(torch.cat(bound), test_labels)
    assert summary["class_labels"] == run.DATA_LABELS and np.isfinite(summary["mean"])
    assert "class_labels" in str(np.load(out)["settings"])  # not the unconditional cache


def test_evaluation_samples_bind_each_batchs_classes_and_resume_checks_them(tmp_path):
    from score_sde.evaluation.records import sample_for_eval

    mixture, sde, ranges = GaussianMixture.ring(n_modes=4), sde_lib.VPSDE(), []

    def batch_score_fn(start, stop):
        ranges.append((start, stop))
        labels = classes.sample_class_labels((0, 1, 2, 3), start, stop - start)
        return mixture.score_fn(sde, label=labels)

    kw = dict(sample_dir=tmp_path, batch_score_fn=batch_score_fn, nfe=4)
    x, info = sample_for_eval(sde, None, (2,), 6, 4, 0, "ddim",
                              conditioning={"classes": [0, 1, 2, 3]}, **kw)
    assert ranges == [(0, 4), (4, 6)] and info["sampler"]["conditioning"]["classes"] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="differs in: conditioning"):
        sample_for_eval(sde, None, (2,), 6, 4, 0, "ddim", conditioning={"classes": [3]}, **kw)
