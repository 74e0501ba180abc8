"""Evaluation records and resumable per-sample-seeded sampling."""

from __future__ import annotations

import json
import math

import pytest
import torch

import sde_lib
from samplers.base import SAMPLERS, Sampler
from score_sde.evaluation import records
from score_sde.evaluation.records import (
    evaluation_record,
    read_record,
    sample_for_eval,
    write_record,
)

# Data N(0, I) under the VP SDE stays N(0, I) at every t, so the exact score is -x.
SDE = sde_lib.VPSDE()


class _Langevin(Sampler):
    """A stand-alone stochastic sampler for these tests: x += step * score + sqrt(2 step) z."""

    stochastic = True

    def __init__(self, *, n_steps: int = 4, step: float = 0.1, **options) -> None:
        super().__init__(**options)
        self.n_steps, self.step = n_steps, step

    def run(self, sde, score_fn, x, *, noise, progress=False, callback=None):
        t = x.new_ones(x.shape[0])
        for _ in range(self.n_steps):
            x = x + self.step * score_fn(x, t) + (2 * self.step) ** 0.5 * noise.randn_like(x)
        return x, {"n_steps": self.n_steps}


METHOD = "test_records_langevin"
OPTIONS = {"n_steps": 4}  # noise after x_T: seeds matter throughout


@pytest.fixture(autouse=True)
def langevin_registered(monkeypatch):
    """Registered for each test only, so registry-wide sampler contract tests never see it."""
    monkeypatch.setitem(SAMPLERS._entries, METHOD, _Langevin)


def exact_score(x, t):
    return -x


class Interrupted(Exception):
    pass


class FailingScore:
    """The exact score that raises on call number ``fail_at`` (a crash mid-run)."""

    def __init__(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, x, t):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupted
        return -x


def _draw(**kwargs):
    args = dict(sde=SDE, score_fn=exact_score, shape_per_sample=(3,), num_samples=7,
                batch_size=3, base_seed=100, method=METHOD)
    args.update(kwargs)
    options = {**OPTIONS, **args.pop("options", {})}
    return sample_for_eval(**args, **options)


def test_sample_k_depends_only_on_seed_base_plus_k():
    x, info = _draw()
    assert x.shape == (7, 3)
    torch.testing.assert_close(_draw(batch_size=2)[0], x, rtol=0, atol=0)
    torch.testing.assert_close(_draw(num_samples=4, base_seed=103)[0], x[3:], rtol=0, atol=0)
    assert not torch.equal(_draw(base_seed=101)[0], x)
    assert info["seeds"] == {"base": 100, "first": 100, "last": 106,
                             "rule": "sample k uses seed base + k"}
    assert info["nfe"] == 4 and info["nfe_per_batch"] == [4, 4, 4] and info["nfe_total"] == 12


def test_batches_stream_through_on_batch():
    full, _ = _draw()
    seen = []
    none, info = _draw(on_batch=seen.append, keep_samples=False)
    assert none is None and [len(x) for x in seen] == [3, 3, 1]
    assert torch.equal(torch.cat(seen), full) and info["nfe_total"] == 12


def test_resume_after_interruption_draws_only_missing_batches(tmp_path):
    full, _ = _draw()
    # crash during the second batch: batch 0 (4 score calls) is on disk, batch 1 is not
    crashing = FailingScore(fail_at=6)
    with pytest.raises(Interrupted):
        _draw(score_fn=crashing, sample_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples_00000.npz"]
    counting = FailingScore(fail_at=-1)
    resumed, info = _draw(score_fn=counting, sample_dir=tmp_path)
    assert counting.calls == 2 * 4  # batches 1 and 2 only
    assert info["resumed_batches"] == 1 and info["nfe_per_batch"] == [4, 4, 4]
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    # a third run loads everything and calls the score not once
    idle = FailingScore(fail_at=1)
    again, info = _draw(score_fn=idle, sample_dir=tmp_path)
    assert idle.calls == 0 and info["resumed_batches"] == 3 and torch.equal(again, full)


@pytest.mark.parametrize("change, named", [
    ({"options": {"step": 0.05}}, "options"),
    ({"base_seed": 0}, "base_seed"),
    ({"batch_size": 2}, "batch_size"),
])
def test_resume_refuses_batches_of_another_configuration(tmp_path, change, named):
    _draw(sample_dir=tmp_path, num_samples=3)
    with pytest.raises(ValueError, match=named):
        _draw(sample_dir=tmp_path, **change)


def test_unreadable_batch_is_reported(tmp_path):
    (tmp_path / "samples_00000.npz").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="samples_00000.npz"):
        _draw(sample_dir=tmp_path)


def test_record_holds_metrics_seeds_sampler_and_nfe(tmp_path):
    _, info = _draw()
    record = evaluation_record(metrics={"fdd": 12.5, "classifier_score": 9.1, "bad": math.nan},
                               sampling=info, checkpoint={"step": 26, "path": "ckpt_26.pth"})
    path = write_record(tmp_path / "eval" / "record.json", record)
    loaded = read_record(path)
    assert loaded == json.loads(path.read_text())
    assert loaded["metrics"] == {"fdd": 12.5, "classifier_score": 9.1, "bad": None}
    assert loaded["num_samples"] == 7
    assert loaded["seeds"]["first"] == 100 and loaded["seeds"]["last"] == 106
    assert loaded["checkpoint"] == {"step": 26, "path": "ckpt_26.pth"}
    sampler = loaded["sampler"]
    assert sampler["method"] == METHOD and sampler["batch_size"] == 3
    assert sampler["shape_per_sample"] == [3] and sampler["device"] == "cpu"
    # the given option and the declared default of the one not given
    assert sampler["options"] == {"n_steps": 4, "step": 0.1}
    assert loaded["nfe"] == 4 and loaded["nfe_total"] == 12
    assert loaded["versions"]["torch"] == torch.__version__
    assert list(path.parent.iterdir()) == [path]  # no temporary file left


def test_the_record_holds_the_options_resolved_at_run_time():
    """PC's N (the SDE's) and its step rule (per-sample, since every sample has its seed) are
    recorded as they ran, not as the ``None`` asked for; a given value is kept."""
    sde = sde_lib.VPSDE(N=6)
    _, info = sample_for_eval(sde, exact_score, (2,), 3, 2, 0, "pc", corrector="langevin")
    options = info["sampler"]["options"]
    assert (options["N"], options["step_rule"], options["corrector"]) == (6, "sample", "langevin")
    assert info["nfe"] == 6 * 2  # one predictor and one corrector call per step
    _, info = sample_for_eval(sde, exact_score, (2,), 3, 2, 0, "pc", N=3)
    assert info["sampler"]["options"]["N"] == 3 and info["nfe"] == 3 * 2


def test_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path = write_record(tmp_path / "record.json", evaluation_record(metrics={"fid": 1.0},
                                                                     num_samples=10))
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(records.os, "replace", crash)
    with pytest.raises(OSError):
        write_record(path, evaluation_record(metrics={"fid": 2.0}, num_samples=10))
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_read_record_checks_the_format(tmp_path):
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not an evaluation record"):
        read_record(tmp_path / "other.json")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="Unknown sampler 'nope'"):
        _draw(method="nope")
    with pytest.raises(ValueError, match="num_samples"):
        _draw(num_samples=0)
    with pytest.raises(ValueError, match="base_seed"):
        _draw(base_seed=-1)


def test_to_jsonable():
    value = {"t": torch.tensor([1.0, 2.0]), "inf": float("inf"), "cls": torch.nn.Linear,
             "dtype": torch.float64, 3: (1, 2)}
    assert records.to_jsonable(value) == {"t": [1.0, 2.0], "inf": None,
                                          "cls": "torch.nn.modules.linear.Linear",
                                          "dtype": "torch.float64", "3": [1, 2]}
