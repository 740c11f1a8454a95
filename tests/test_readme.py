"""The README and the docs are what users read: they must match the code and CI."""

from __future__ import annotations

import re
from pathlib import Path

from operators import schema as col
from tests.docs import DOCS, reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_output_column_is_documented():
    """The generated column reference lists every column, each with a meaning."""
    page = reference().columns_page()
    documented = dict(re.findall(r"^\| `([a-z0-9_]+)` \| `[^`]+` \| \w+ \| (.*) \|$", page, flags=re.M))
    schema = col.output_schema(include_image_bytes=True)
    assert set(schema.names) <= set(documented)
    assert all(documented[name].strip() for name in schema.names), "a column without a meaning (COLUMN_DOCS)"
    assert set(col.IMAGE_STATUSES) | set(col.REJECT_REASONS) <= set(re.findall(r"`([a-z_]+)`", page))


def test_every_status_and_reason_is_explained_in_the_guide():
    guide = "\n".join(p.read_text() for p in (DOCS / "guide").glob("*.md"))
    assert set(col.IMAGE_STATUSES) | set(col.REJECT_REASONS) <= set(re.findall(r"`([a-z_]+)`", guide))


def test_ci_runs_the_readme_test_command():
    lines = (ROOT / ".ci/run").read_text().splitlines()
    commands = [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]
    assert commands == ["make test"] and "make test " in README
