"""What installing the toolkit takes over: only the design's five top-level names and the
``score_sde`` package, so that other code's ``datasets``, ``utils`` or ``main`` keep working."""

from __future__ import annotations

import configparser
import importlib
import os
import subprocess
import sys

from conftest import REPO
from test_main import TINY_DIGITS

DESIGN = {"sde_lib", "models", "samplers", "likelihood", "configs"}


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser


def test_only_the_design_names_and_score_sde_are_installed_top_level():
    cfg = _setup_cfg()
    modules = set(cfg["options"]["py_modules"].split())
    packages = {p.split(".")[0] for p in cfg["options.packages.find"]["include"].split()}
    assert modules | packages == DESIGN | {"score_sde"}
    # nothing else at the top of the checkout is importable by accident (main.py is the script)
    tops = {p.name.removesuffix(".py") for p in REPO.iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert tops == DESIGN | {"score_sde", "main"}, sorted(tops)


def test_the_console_command_runs_the_same_cli_as_main_py(tmp_path):
    """The entry point's target, started the way pip's ``score-sde`` script starts it (its own
    argv[0], from another directory), prints the CLI's flags and refuses a missing workdir
    with the one-line error, creating nothing."""
    scripts = _setup_cfg()["options.entry_points"]["console_scripts"]
    name, target = (s.strip() for s in scripts.strip().split("="))
    module, func = target.split(":")
    assert name == "score-sde" and module == "score_sde.cli"
    assert callable(getattr(importlib.import_module(module), func))
    assert "from score_sde.cli import run" in (REPO / "main.py").read_text()
    script = (f"import sys; sys.argv[0] = {str(tmp_path / name)!r}; "
              f"from {module} import {func}; sys.exit({func}())")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def console(*args):
        return subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    usage = console("--helpshort")
    assert "Traceback" not in usage.stderr, usage.stderr[-3000:]  # absl exits 1 after help
    assert all(f"--{flag}" in usage.stdout for flag in ("config", "mode", "workdir"))
    refused = console("--config=digits", "--mode=sample", "--workdir=run")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--workdir run does not exist" in refused.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_a_foreign_datasets_package_is_left_alone(tmp_path):
    """With another ``datasets`` package (e.g. Hugging Face's) on the path, a digits training
    through main.py runs from outside the checkout, and inside the checkout ``import datasets``
    finds the foreign package."""
    foreign = tmp_path / "site"
    (foreign / "datasets").mkdir(parents=True)
    (foreign / "datasets" / "__init__.py").write_text("FOREIGN = 'hf'\n")
    env = dict(os.environ, PYTHONPATH=str(foreign), OMP_NUM_THREADS="1")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    workdir = outside / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--noprogress", *TINY_DIGITS,
         "--config.training.n_iters=2", "--config.training.snapshot_freq=2",
         "--workdir=run"], cwd=outside, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "checkpoints" / "checkpoint_1.pth").is_file()
    found = subprocess.run([sys.executable, "-c", "import datasets; print(datasets.FOREIGN)"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert found.stdout.strip() == "hf", found.stderr
