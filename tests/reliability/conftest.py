"""Fault injection for the reliability tests.

``VLPIPE_FAULTS`` must be in the environment before the session's Ray starts, so
that Ray's workers inherit it; a test then arms a fault point by creating a file
named after it there (see ``pipelines.plan.fault_point``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("VLPIPE_FAULTS", tempfile.mkdtemp(prefix="vlpipe-faults-"))


@pytest.fixture
def faults() -> Path:
    """The fault folder, emptied after the test so no armed fault leaks into the next one."""
    folder = Path(os.environ["VLPIPE_FAULTS"])
    yield folder
    for marker in folder.iterdir():
        marker.unlink()
