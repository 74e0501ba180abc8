"""The README's runnable examples and its test command stay true."""

from __future__ import annotations

import re

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_first_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks[:2]):  # the self-contained examples under "A first example"
        exec(compile(block, f"README block {i}", "exec"), {})


def test_ci_runs_the_readme_test_command():
    lines = README.splitlines()
    command = lines[lines.index("<!-- test-command -->") + 1].strip()
    assert command.startswith("python -m pytest")
    ci = (REPO / ".ci" / "run").read_text()
    assert "test-command" in ci and "README.md" in ci
