"""The README is what users read: it must match the code and CI."""

from __future__ import annotations

import re
from pathlib import Path

from operators import schema as col

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_output_column_is_documented():
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", README, flags=re.M))
    schema = col.output_schema(include_image_bytes=True)
    assert set(schema.names) <= documented
    assert set(col.IMAGE_STATUSES) | set(col.REJECT_REASONS) <= set(re.findall(r"`([a-z_]+)`", README))


def test_ci_runs_the_readme_test_command():
    commands = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert commands == ["make test"] and "make test " in README
