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
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

_PAGE = os.sysconf("SC_PAGE_SIZE")
_HZ = os.sysconf("SC_CLK_TCK")
DRIVER = "driver (this process)"
IDLE_WORKER = "ray::IDLE"
_METHOD = re.compile(r"\.[A-Za-z_]\w*$")  # "ray::MapWorker(MapBatches(Clip)).submit": the actor's method


@dataclass(frozen=True)
class TreeSample:
    pss: int
    rss: int
    ray_workers: int
    cpu: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> (what it runs, CPU s since its start)


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


def _title(pid: int, root: int) -> str:
    """What a process runs: a Ray worker's current task or actor (its process title), the script of
    another Python process (Ray's daemons), else the program's name."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read(512).decode(errors="replace").split("\0")
    if args[0].startswith("ray::"):
        return args[0].split(" ")[0]
    if pid == root:
        return DRIVER
    program = os.path.basename(args[0].split(" ")[0])
    if program.startswith("python"):
        rest = iter(args[1:])
        for arg in rest:
            if arg == "-m":
                return next(rest, program)
            if arg == "-c":
                return f"{program} -c"
            if arg and not arg.startswith("-"):
                return os.path.basename(arg)
    return program


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _HZ  # utime + stime


def sample_tree(root: int) -> TreeSample:
    pss = rss = workers = 0
    cpu = {}
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * _PAGE
            pss += _pss_bytes(pid)
            title = _title(pid, root)
            cpu[pid] = (title, _cpu_seconds(pid))
            workers += title.startswith("ray::")
        except (OSError, IndexError, ValueError):
            continue  # the process ended between listing and reading
    return TreeSample(pss, rss, workers, cpu)


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


class Usage:
    """Samples the process tree while a block runs: peaks of PSS, RSS and Ray workers; cores busy;
    CPU seconds by what each process runs (``cpu_split``).

    The split credits each process's CPU time between two samples to what it ran at the second (an
    idle worker: to what it ran last), so a worker that changes task between samples is split
    roughly; a process that lives less than a sampling interval is missed (``cpu_split`` is then
    short of the machine's busy time).
    """

    # Reading smaps_rollup walks each process's page tables: ~50 ms of CPU per sample of a Ray
    # tree with a filled object store, a quarter of a core at 5 samples/s, taken from the run.
    MAX_OWN_SHARE = 0.02

    def __init__(self, interval: float = 0.2):
        self._interval = interval
        self.peak_pss = self.peak_rss = self.peak_workers = 0
        self.cores_busy = self.busy_cpu_s = 0.0
        self.cpu_split: Counter[str] = Counter()
        self._cpu_seen: dict[int, float] | None = None
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            s = sample_tree(os.getpid())
            self.peak_pss, self.peak_rss = max(self.peak_pss, s.pss), max(self.peak_rss, s.rss)
            self.peak_workers = max(self.peak_workers, s.ray_workers)
            self.add_sample(s)
            cost = time.perf_counter() - start
            self._stop.wait(max(self._interval, cost / self.MAX_OWN_SHARE))

    def add_sample(self, sample: TreeSample) -> None:
        first, seen = self._cpu_seen is None, self._cpu_seen or {}
        for pid, (title, seconds) in sample.cpu.items():
            role = self._role(pid, title)
            if not first:  # the first sample is the baseline: CPU spent before the block
                self.cpu_split[role] += seconds - seen.get(pid, 0.0)
            seen[pid] = seconds
        self._cpu_seen = seen

    def _role(self, pid: int, title: str) -> str:
        """An actor by its class, whatever method it runs; an idle Ray worker by the task it ran last,
        which spent the CPU since the sample before (samples come seconds apart, tasks end between)."""
        if title.startswith("ray::"):
            title = _METHOD.sub("", title)
        if title == IDLE_WORKER:
            return self._roles.get(pid, title)
        self._roles[pid] = title
        return title

    def __enter__(self):
        self._cpu_start = cpu_times()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.add_sample(sample_tree(os.getpid()))
        busy, total = (end - start for end, start in zip(cpu_times(), self._cpu_start))
        self.cores_busy = busy / total if total else 0.0
        self.busy_cpu_s = busy / _HZ

    def figures(self) -> dict:
        return {
            "peak_pss_mb": round(self.peak_pss / 2**20, 1),
            "peak_rss_mb": round(self.peak_rss / 2**20, 1),
            "peak_ray_workers": self.peak_workers,
            "cores_busy": round(self.cores_busy, 3),
            "busy_cpu_s": round(self.busy_cpu_s, 2),
            "cpu_split_s": {title: round(s, 2) for title, s in self.cpu_split.most_common() if s >= 0.01},
        }


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
    result.update(
        images=images, seconds=round(seconds, 6), images_per_s=float(f"{images / seconds:.4g}"), **usage.figures()
    )
