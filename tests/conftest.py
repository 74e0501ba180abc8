"""Shared test fixtures: the reference fixture folder and deterministic torch settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO.parent / "shared" / "fixtures" / "reference"


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/fixtures/reference``; tests using it skip where it is absent (a user's clone)."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference fixtures not found at {REFERENCE_DIR} (only in the dev checkout)")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def sde_values(reference_dir) -> dict:
    """The parsed ``sde_values.json`` of the reference fixtures."""
    return json.loads((reference_dir / "sde_values.json").read_text())
