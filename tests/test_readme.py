"""The README: its test command is the one CI runs, its quick start gives exact CPU and GPU
commands, its digits figures and links (its Python blocks run in ``test_docs.py``)."""

from __future__ import annotations

import re

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    lines = README.splitlines()
    command = lines[lines.index("<!-- test-command -->") + 1].strip()
    assert command.startswith("python -m pytest")
    ci = (REPO / ".ci" / "run").read_text()
    assert "test-command" in ci and "README.md" in ci


def _quick_start_commands() -> dict[str, str]:
    """The quick start table's ``| machine | `command` |`` rows: machine -> command."""
    rows = re.findall(r"^\| ([^|]+?) \| `([^`]+)` \|$", README, re.M)
    return {machine: command for machine, command in rows if "pip install" in command}


def test_the_quick_start_shows_the_cpu_and_gpu_install_side_by_side():
    """Two exact first commands: the CPU one takes torch's CPU build from its index first, then
    both install the toolkit and train the digits the same way; setup.cfg bounds torch below
    only, so that either build satisfies it."""
    commands = _quick_start_commands()
    cpu = next(c for m, c in commands.items() if m.lower().startswith("cpu"))
    gpu = next(c for m, c in commands.items() if "gpu" in m.lower())
    cpu_torch = "pip install torch --index-url https://download.pytorch.org/whl/cpu && "
    assert cpu.startswith(cpu_torch) and cpu.removeprefix(cpu_torch) == gpu
    assert gpu == "pip install -e . && python main.py --config digits --mode train " \
                  "--workdir runs/digits"
    requires = [line.strip() for line in (REPO / "setup.cfg").read_text().splitlines()
                if re.match(r"\s+torch\b", line)]
    assert requires == [requires[0]] and re.fullmatch(r"torch>=[\d.]+", requires[0]), requires


def test_the_readme_gives_the_digits_figures_and_links_every_docs_page():
    expected = README[README.index("## What to expect from the digits run"):]
    expected = expected[:expected.index("\n## ", 1)]
    for what in ("bits/dim", "Fréchet Digits Distance", "classifier score"):
        assert re.search(rf"^\| {what}[^|]*\| \d", expected, re.M), what
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", README))
    assert linked == {p.name for p in (REPO / "docs").glob("*.md")}
