"""A fault-injection hook (``pipelines.hooks``): die once at a point a test armed.

A test arms ``batch:clip`` by creating ``$VLPIPE_FAULTS/batch-clip``. Renaming the
marker is atomic, so exactly one process dies per arming, and the retried task
or restarted actor then runs normally. ``raise-<point>`` raises at every visit
(a bug in a stage); ``stall-<point>`` hangs there (a stuck model), ``slow-<point>`` waits the seconds written in it. Model stages
reach ``row:<stage>:<key>`` for each row: ``raise-row-clip-<key>`` makes one row
raise in the CLIP stage, ``raise-rows-clip`` every row.

For resumed runs: ``kill-at-staged-<n>`` SIGKILLs the driver (whose pid is in ``driver-pid``) once
``n`` rows or more are staged (``spilled:<path>``), and stalls CLIP and staging wherever they run
(it fires once), as when a run's whole node pool goes; and while ``seen-rows-<stage>`` exists, every row
a model stage runs on is appended to it, from every process: the rows a resume did twice.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

HOOK = "tests.reliability.faults:die_once_if_armed"


def marker(point: str) -> str:
    return point.replace(":", "-")


def die_once_if_armed(point: str) -> None:
    folder = os.environ.get("VLPIPE_FAULTS")
    if not folder:
        return
    armed = os.path.join(folder, marker(point))
    if point.startswith("spilled:"):
        _kill_if_staged(Path(folder), Path(point.split(":", 1)[1]).parent)
        return
    if os.path.exists(os.path.join(folder, f"raise-{marker(point)}")):
        raise RuntimeError(f"planted failure at {point}")
    if point.startswith("row:"):
        _count_row(Path(folder), point)
        if os.path.exists(os.path.join(folder, f"raise-rows-{point.split(':')[1]}")):
            raise RuntimeError(f"planted failure at {point}")
        return  # rows are never armed to die
    if os.path.exists(os.path.join(folder, f"stall-{marker(point)}")):
        time.sleep(300)
    slow = os.path.join(folder, f"slow-{marker(point)}")
    if os.path.exists(slow):
        time.sleep(float(Path(slow).read_text() or 0.25))
    try:
        os.rename(armed, f"{armed}.fired")
    except OSError:
        return
    os._exit(1)


def _kill_if_staged(folder: Path, staging: Path) -> None:
    armed = next(folder.glob("kill-at-staged-*[0-9]"), None)
    if armed is None or _rows(staging) < int(armed.name.rsplit("-", 1)[1]):
        return
    try:
        armed.rename(armed.with_name(armed.name + ".fired"))
    except OSError:
        return
    # Nothing goes on once the driver is dead: Ray would finish the batches already sent to workers.
    (folder / "stall-batch-clip").touch()
    (folder / "stall-spill").touch()
    os.kill(int((folder / "driver-pid").read_text()), signal.SIGKILL)


def _rows(staging: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(path).metadata.num_rows for path in staging.glob("*.parquet"))


def _count_row(folder: Path, point: str) -> None:
    _, stage, key = point.split(":", 2)
    seen = folder / f"seen-rows-{stage}"
    if seen.exists():
        with open(seen, "a") as out:  # one short append per row: whole lines from every process
            out.write(key + "\n")
