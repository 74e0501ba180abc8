"""Shared test fixtures: the reference fixture folder and deterministic torch settings.

Every test process runs torch on one thread (and so do the subprocesses it starts, through
``OMP_NUM_THREADS``): the suite gets its parallelism from pytest-xdist's worker processes
(``-n``), and one thread per process keeps OpenMP from busy-waiting for a core when the machine is
shared, where CPU time would otherwise grow far beyond the wall time.
"""

from __future__ import annotations

import os

# Before torch is imported, so that its OpenMP pool is sized once, here and in every child process.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import itertools  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
REFERENCE_DIR = SHARED_FIXTURES / "reference"
#: Every skip for a missing fixture folder says this, so that the summary can count them.
MISSING_FIXTURES = "fixtures not found at"


def latin_square(*axes):
    """The cases of a three-factor grid in a Latin square: each pair of factors meets once.

    ``axes`` are three lists of equal length n; case (a_i, b_j, c_k) is in the square when
    k = (i + j) mod n, so n^2 of the n^3 cases cover every pair of values of every two factors.
    """
    n = len(axes[0])
    if len(axes) != 3 or any(len(a) != n for a in axes):
        raise ValueError(f"latin_square takes three axes of equal length, got "
                         f"{[len(a) for a in axes]}")
    return {(axes[0][i], axes[1][j], axes[2][(i + j) % n]) for i in range(n) for j in range(n)}


def default_subset(axes, keep):
    """Parametrize cases for the full grid of ``axes``: those in ``keep`` run in the default
    suite, the rest under the ``slow`` marker (``-m slow`` runs them). Ids are the values joined
    by ``-``, as stacked ``parametrize`` decorators would give."""
    return [pytest.param(*case, id="-".join(map(str, case)),
                         marks=() if case in keep else pytest.mark.slow)
            for case in itertools.product(*axes)]


def pytest_configure(config):
    torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 4 (each imports torch; more rarely pays off)."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line on why the fixture-based tests skipped, where ``../shared/fixtures`` is absent."""
    skipped = terminalreporter.stats.get("skipped", [])
    missing = sum(1 for r in skipped if MISSING_FIXTURES in str(getattr(r, "longrepr", "")))
    if missing:
        terminalreporter.write_line(
            f"{missing} tests skipped: they compare against the reference implementation's tensors "
            f"in {SHARED_FIXTURES}, which only the developers' checkout has (not a user's clone)."
        )


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/fixtures/reference``; tests using it skip where it is absent (a user's clone)."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference {MISSING_FIXTURES} {REFERENCE_DIR} (only in the dev checkout)")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def sde_values(reference_dir) -> dict:
    """The parsed ``sde_values.json`` of the reference fixtures."""
    return json.loads((reference_dir / "sde_values.json").read_text())
