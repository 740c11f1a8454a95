"""A fault-injection hook (``pipelines.hooks``): die once at a point a test armed.

A test arms ``batch:clip`` by creating ``$VLPIPE_FAULTS/batch-clip``. Renaming the
marker is atomic, so exactly one process dies per arming, and the retried task
or restarted actor then runs normally. ``raise-<point>`` raises at every visit
(a bug in a stage); ``stall-<point>`` hangs there (a stuck model). Model stages
reach ``row:<stage>:<key>`` for each row: ``raise-row-clip-<key>`` makes one row
raise in the CLIP stage, ``raise-rows-clip`` every row.
"""

from __future__ import annotations

import os
import time

HOOK = "tests.reliability.faults:die_once_if_armed"


def marker(point: str) -> str:
    return point.replace(":", "-")


def die_once_if_armed(point: str) -> None:
    folder = os.environ.get("VLPIPE_FAULTS")
    if not folder:
        return
    armed = os.path.join(folder, marker(point))
    if os.path.exists(os.path.join(folder, f"raise-{marker(point)}")):
        raise RuntimeError(f"planted failure at {point}")
    if point.startswith("row:"):
        if os.path.exists(os.path.join(folder, f"raise-rows-{point.split(':')[1]}")):
            raise RuntimeError(f"planted failure at {point}")
        return  # rows are never armed to die
    if os.path.exists(os.path.join(folder, f"stall-{marker(point)}")):
        time.sleep(300)
    try:
        os.rename(armed, f"{armed}.fired")
    except OSError:
        return
    os._exit(1)
