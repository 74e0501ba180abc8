"""Paste the benchmarks' saved Markdown tables into the docs.

Each benchmark the docs quote writes its table to ``benchmarks/out/<name>.md``. A page holds it
between ``<!-- bench:<name> -->`` and ``<!-- /bench:<name> -->``; this script replaces what is
between the markers with the saved table and leaves tables it has no file for unchanged.

    python benchmarks/update_docs.py [PAGE ...]      (default: README.md and docs/*.md)
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"
START = re.compile(r"^<!-- bench:([\w.-]+) -->$", re.M)


def write_table(name: str, table: str, out: Path = OUT) -> Path:
    """Save ``table`` (Markdown) as ``out/<name>.md`` for :func:`update_page`; returns the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text(table.rstrip("\n") + "\n")
    return path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of string cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def update_page(page: Path, tables: Path = OUT) -> list[str]:
    """Replace each marked table of ``page`` whose ``tables/<name>.md`` exists; returns the names
    of the tables that changed. Raises ``ValueError`` for a start marker without its end."""
    text = page.read_text()
    changed = []
    for name in START.findall(text):
        start, end = f"<!-- bench:{name} -->\n", f"<!-- /bench:{name} -->"
        head, _, rest = text.partition(start)
        if end not in rest:
            raise ValueError(f"{page}: '<!-- bench:{name} -->' has no '{end}'")
        source = tables / f"{name}.md"
        if not source.is_file():
            continue
        old, _, tail = rest.partition(end)
        new = source.read_text().rstrip("\n") + "\n"
        if new != old:
            text = head + start + new + end + tail
            changed.append(name)
    if changed:
        page.write_text(text)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", type=Path,
                        help="pages to update (default: README.md and docs/*.md)")
    args = parser.parse_args()
    pages = args.pages or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for name in update_page(page):
            print(f"{page}: updated {name}")


if __name__ == "__main__":
    main()
