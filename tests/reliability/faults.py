"""A fault-injection hook (``pipelines.hooks``): die once at a point a test armed.

A test arms ``batch:clip`` by creating ``$VLPIPE_FAULTS/batch-clip``. Renaming the
marker is atomic, so exactly one process dies per arming, and the retried task
or restarted actor then runs normally.
"""

from __future__ import annotations

import os

HOOK = "tests.reliability.faults:die_once_if_armed"


def marker(point: str) -> str:
    return point.replace(":", "-")


def die_once_if_armed(point: str) -> None:
    folder = os.environ.get("VLPIPE_FAULTS")
    if not folder:
        return
    armed = os.path.join(folder, marker(point))
    try:
        os.rename(armed, f"{armed}.fired")
    except OSError:
        return
    os._exit(1)
