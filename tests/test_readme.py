"""The README's test command is the one CI runs (its Python blocks run in ``test_docs.py``)."""

from __future__ import annotations

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    lines = README.splitlines()
    command = lines[lines.index("<!-- test-command -->") + 1].strip()
    assert command.startswith("python -m pytest")
    ci = (REPO / ".ci" / "run").read_text()
    assert "test-command" in ci and "README.md" in ci
