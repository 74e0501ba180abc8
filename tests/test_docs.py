"""Every Python block of README.md and docs/*.md runs as written.

The blocks of one page run in order in one namespace, inside a temporary working directory, so a
page reads like one session. A block whose previous line is ``<!-- skip: REASON -->`` needs what a
test machine lacks (a GPU, CIFAR-10, an official checkpoint, ...): it is only compiled, and its
test is skipped with that reason. Relative links between the pages must point at existing files.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from score_sde.utils.registry import Registry

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*skip:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


def python_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """``(first code line, source, skip reason or None)`` of each ```python block of ``page``."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"{page}: the code block opened on line {i + 1} is not closed")
        if fence.group(1) == "python":
            previous = next((line for line in reversed(lines[:i]) if line.strip()), "")
            skip = SKIP.fullmatch(previous.strip())
            blocks.append((i + 2, "\n".join(lines[i + 1:end]) + "\n",
                           skip.group(1) if skip else None))
        i = end + 1
    return blocks


def _page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def _compiled(page: Path, line: int, source: str):
    # Leading newlines make tracebacks point at the line of the Markdown file.
    return compile("\n" * (line - 1) + source, str(page), "exec")


@pytest.fixture
def restore_registries(monkeypatch):
    """Registrations made by a page (the extending guide registers examples) end with its test.

    Every registering module is imported first: a registry snapshotted before its entries are
    registered would be restored empty while the modules that fill it stay imported."""
    import importlib

    from models.utils import ARCHITECTURE_MODULES

    for name in ("sde_lib", "samplers", "likelihood", "models.utils", "models.normalization",
                 "score_sde.losses", "score_sde.divergence", "score_sde.datasets",
                 *ARCHITECTURE_MODULES):
        importlib.import_module(name)
    for module in list(sys.modules.values()):
        for value in list(getattr(module, "__dict__", {}).values()):
            if type(value) is Registry:
                monkeypatch.setattr(value, "_entries", dict(value._entries))


@pytest.fixture
def one_thread():
    """Small tensors: one torch thread is fastest, and stays fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


RUNNABLE = [page for page in PAGES if any(skip is None for _, _, skip in python_blocks(page))]


@pytest.mark.parametrize("page", RUNNABLE, ids=_page_id)
def test_page_blocks_run(page, tmp_path, monkeypatch, restore_registries, one_thread):
    """The page's runnable blocks, in order, in one namespace, in a temporary directory."""
    blocks = [(line, source) for line, source, skip in python_blocks(page) if skip is None]
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for line, source in blocks:
        exec(_compiled(page, line, source), namespace)


SKIPPED = [pytest.param(page, line, source, reason, id=f"{_page_id(page)}:{line}")
           for page in PAGES for line, source, reason in python_blocks(page) if reason]


@pytest.mark.parametrize("page, line, source, reason", SKIPPED)
def test_skip_marked_block(page, line, source, reason):
    """A skip-marked block is valid Python; it is not run, for the reason its marker gives."""
    _compiled(page, line, source)
    pytest.skip(f"{_page_id(page)} line {line}: {reason}")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings: lower case, punctuation dropped, spaces -> '-'."""
    prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # no code comments
    headings = re.findall(r"^#+ (.+)$", prose, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_exist(page):
    """Links to files of the checkout (``docs/samplers.md#sampling``) and their headings resolve."""
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{_page_id(page)} links to missing {target}"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{_page_id(page)}: no heading for {target}"


def _update_docs():
    spec = importlib.util.spec_from_file_location(
        "update_docs", REPO / "benchmarks" / "update_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_update_docs_pastes_tables_between_markers(tmp_path):
    update_docs = _update_docs()
    tables = tmp_path / "out"
    tables.mkdir()
    (tables / "cost.md").write_text("| a |\n|---|\n| 1 |\n")
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- bench:cost -->\nold\n<!-- /bench:cost -->\nafter\n"
                    "<!-- bench:missing -->\nkept\n<!-- /bench:missing -->\n")
    changed = update_docs.update_page(page, tables)
    assert changed == ["cost"]
    assert page.read_text() == ("intro\n<!-- bench:cost -->\n| a |\n|---|\n| 1 |\n"
                                "<!-- /bench:cost -->\nafter\n"
                                "<!-- bench:missing -->\nkept\n<!-- /bench:missing -->\n")
    assert update_docs.update_page(page, tables) == []  # idempotent


def test_update_docs_refuses_unbalanced_markers(tmp_path):
    update_docs = _update_docs()
    page = tmp_path / "page.md"
    page.write_text("<!-- bench:cost -->\nno end\n")
    with pytest.raises(ValueError, match="cost"):
        update_docs.update_page(page, tmp_path)
