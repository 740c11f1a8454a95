"""What a benchmark run cost the machine: memory, worker processes, busy cores, spilling.

Memory is the process tree's PSS (proportional set size, ``/proc/PID/smaps_rollup``):
a page shared by k processes counts 1/k in each, so Ray's object store, mapped by
the raylet and every worker, is counted once in the sum rather than once per
process as RSS would. RSS is kept beside it as the upper bound.
"""

from __future__ import annotations

import gc
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class TreeSample:
    pss: int
    rss: int
    ray_workers: int


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                # The command name may hold spaces; the parent pid is the second field after it.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree_pids(root: int) -> list[int]:
    children, pids, todo = _children_by_parent(), [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids


def _pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _is_ray_worker(pid: int) -> bool:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read(5) == b"ray::"


def sample_tree(root: int) -> TreeSample:
    pss = rss = workers = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * _PAGE
            pss += _pss_bytes(pid)
            workers += _is_ray_worker(pid)
        except (OSError, IndexError, ValueError):
            continue  # the process ended between listing and reading
    return TreeSample(pss, rss, workers)


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


class Usage:
    """Samples the process tree while a block runs: peaks of PSS, RSS and Ray workers; cores busy."""

    # Reading smaps_rollup walks each process's page tables: ~50 ms of CPU per sample of a Ray
    # tree with a filled object store, a quarter of a core at 5 samples/s, taken from the run.
    MAX_OWN_SHARE = 0.02

    def __init__(self, interval: float = 0.2):
        self._interval = interval
        self.peak_pss = self.peak_rss = self.peak_workers = 0
        self.cores_busy = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            s = sample_tree(os.getpid())
            self.peak_pss, self.peak_rss = max(self.peak_pss, s.pss), max(self.peak_rss, s.rss)
            self.peak_workers = max(self.peak_workers, s.ray_workers)
            cost = time.perf_counter() - start
            self._stop.wait(max(self._interval, cost / self.MAX_OWN_SHARE))

    def __enter__(self):
        self._cpu_start = cpu_times()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        busy, total = (end - start for end, start in zip(cpu_times(), self._cpu_start))
        self.cores_busy = busy / total if total else 0.0

    def figures(self) -> dict:
        return {"peak_pss_mb": round(self.peak_pss / 2**20, 1), "peak_rss_mb": round(self.peak_rss / 2**20, 1),
                "peak_ray_workers": self.peak_workers, "cores_busy": round(self.cores_busy, 3)}


def spilled_mib() -> int:
    """Object-store bytes Ray has spilled to disk since the cluster started (0 before any)."""
    import ray
    from ray._private.internal_api import memory_summary

    # This process's cluster by address: found by auto-detection, another Ray on the machine fails it.
    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    found = re.search(r"Spilled (\d+) MiB", summary)
    return int(found.group(1)) if found else 0


@contextmanager
def measured(result: dict, images: int, sync=lambda: None):
    """Time the block and record images/s, memory, workers and busy cores into ``result``."""
    gc.collect()
    with Usage() as usage:
        start = time.perf_counter()
        yield
        sync()
        seconds = time.perf_counter() - start
    result.update(images=images, seconds=round(seconds, 6), images_per_s=float(f"{images / seconds:.4g}"),
                  **usage.figures())
