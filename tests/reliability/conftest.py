"""Fault injection for the reliability tests.

``VLPIPE_FAULTS`` and the hook (``VLPIPE_HOOK``) must be in the environment before
the session's Ray starts, so that Ray's workers inherit them; a test then arms a
point by creating a file named after it there (see ``tests.reliability.faults``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from pipelines.hooks import ENV as HOOK_ENV
from tests.reliability.faults import HOOK

os.environ.setdefault("VLPIPE_FAULTS", tempfile.mkdtemp(prefix="vlpipe-faults-"))
os.environ.setdefault(HOOK_ENV, HOOK)


@pytest.fixture
def faults() -> Path:
    """The fault folder, emptied after the test so no armed fault leaks into the next one."""
    folder = Path(os.environ["VLPIPE_FAULTS"])
    yield folder
    for marker in folder.iterdir():
        marker.unlink()
