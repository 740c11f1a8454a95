"""Helpers for the docs tests: the site's Markdown, its fenced blocks, and the reference generator."""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
HOOK = DOCS / "hooks" / "reference.py"

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")


def markdown_files() -> list[Path]:
    """The README and every page of the site that is a file (the reference pages are generated)."""
    return [README, *sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)]


def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, line number of the opening fence, content) of each fenced code block."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, language, start = match["fence"], match["info"].strip().split(" ")[0], i + 1
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append((language, start, "\n".join(body)))
        i += 1
    return blocks


@cache
def reference():
    """The MkDocs hook module that generates the reference pages (importable without MkDocs running)."""
    spec = importlib.util.spec_from_file_location("vlpipe_docs_reference", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
