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

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
REFERENCE_DIR = SHARED_FIXTURES / "reference"
#: Every skip for a missing fixture folder says this, so that the summary can count them.
MISSING_FIXTURES = "fixtures not found at"


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
