"""Small runs in this process, without Ray: the same passes, steps and operators as on Ray.

A run of a few thousand rows spent most of its wall time starting things rather than
working: a local Ray (3.5-6 s on two cores) and each model actor's fresh process importing
torch and transformers (4-6 s, paid again every run). Here the models load once, in the
driver; decoding (Pillow releases the GIL while it decodes and resizes) runs on a thread
per core, ahead of the model steps, which run in this thread. Batches have the sizes they
have on Ray; every row is accounted for, staged and committed the same way.

Ray stays the executor for a cluster (``ray_address``, ``RAY_ADDRESS``, a Ray this process
is already connected to) and for any run larger than ``in_process_max_rows``: there a
worker that dies costs a retry, not the run, and steps run on as many nodes as there are.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as Pool
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from operators.storage import Location
from pipelines.config import PipelineConfig
from pipelines.execute.batches import Head, StepRun, quiet_idle_threads, rebatch
from pipelines.execute.source import Source
from pipelines.execute.staging import Spill
from pipelines.execute.steps import Pass, Step

log = logging.getLogger(__name__)


def in_process_reason(config: PipelineConfig, rows: int | None) -> str | None:
    """Why the run goes in this process (what ``vlpipe plan`` prints), or None where Ray runs it."""
    if config.executor == "in_process":
        return "executor: in_process"
    if config.executor == "ray" or rows is None or rows > config.in_process_max_rows:
        return None
    if config.ray_address or os.environ.get("RAY_ADDRESS") or _ray_connected():
        return None
    return f"{rows:,} rows, at most in_process_max_rows ({config.in_process_max_rows:,}), and no Ray cluster given"


def gpu_shortfall(run_passes: list[Pass], reason: str) -> str | None:
    """Why this machine cannot run the model steps' GPU requests in process, naming the config key."""
    asks = [
        step for run_pass in run_passes for step in run_pass.steps if step.kind == "actor" and step.resources.num_gpus
    ]
    if not asks:
        return None
    import torch

    have = torch.cuda.device_count()
    for step in asks:
        if step.resources.num_gpus > have:
            return (
                f"{step.anchor.config_key or step.anchor.name}.resources asks for {step.resources.num_gpus:g} "
                f"GPU(s), but this machine has {have} (the run is in this process: {reason})"
            )
    return None


def _ray_connected() -> bool:
    """Whether this process already uses a Ray (a notebook's, a test's): then its runs go there."""
    ray = sys.modules.get("ray")  # never imported just to ask: a small run need not load Ray at all
    return ray is not None and ray.is_initialized()


def cpu_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class LocalExecutor:
    """Steps in this process: CPU work (read, prepare, decode) on a thread per core, ahead of the
    model and storage steps, which run in the calling thread with each model loaded once."""

    def __init__(self, threads: int | None = None):
        quiet_idle_threads()
        self.threads = threads or cpu_threads()
        self._pool: ThreadPoolExecutor | None = None
        self._ray = None

    def stream(self, steps: tuple[Step, ...], source: Source, head: Head, reads_inside: bool) -> Iterator[pa.Table]:
        batches: Iterable[pa.Table] = source.all_tables()
        for index, step in enumerate(steps):
            batches = self._apply(batches, step, head if index == 0 else ())
        return iter(batches)

    def spill(self, stream: Iterable[pa.Table], run_pass: Pass, staging: Location, head: Head) -> Iterator[dict]:
        spill = Spill(run_pass.aggregate, staging, head)
        for batch in rebatch(stream, run_pass.spill_rows):
            yield from spill(batch).to_pylist()

    def rows(self, stream: Iterable[pa.Table]) -> Iterator[dict]:
        for summary in stream:
            yield from summary.to_pylist()

    def run_task(self, function: Callable, *args):
        return function(*args)

    def read_parquet(self, paths: list[str], filesystem, columns: list[str], *, include_paths: bool = False):
        return self._on_ray().read_parquet(paths, filesystem, columns, include_paths=include_paths)

    def shuffling(self):
        return self._on_ray().shuffling()

    def describe(self, run_pass: Pass) -> list[str]:
        lines = []
        for index, step in enumerate(run_pass.steps):
            reads = " + ".join(("read",) * (run_pass.reads_inside and index == 0) + tuple(s.name for s in step.stages))
            where = f"{self.threads} thread(s)" if on_pool(step) else "this thread"
            lines.append(f"  step {step.name}: {reads} -- {where}, batch {step.resources.batch_size}")
        return lines

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _apply(self, batches: Iterable[pa.Table], step: Step, head: Head) -> Iterator[pa.Table]:
        """The step over ``batches``, re-cut to its batch size: on the pool for CPU work, else here."""
        batches = rebatch(batches, step.resources.batch_size)
        if on_pool(step):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vlpipe-cpu")
            return ordered_map(self._pool, _per_thread(step, head), batches, ahead=2 * self.threads)
        return map(StepRun.build(step, head), batches)

    def _on_ray(self):
        """A decision too large for one task shuffles with Ray Data: a local Ray, started once, on demand."""
        if self._ray is None:
            from pipelines.execute.ray import RayExecutor

            log.info("the whole-run decision shuffles its rows with Ray Data: starting a local Ray")
            self._ray = RayExecutor.local()
        return self._ray


def on_pool(step: Step) -> bool:
    """CPU work (read, prepare, decode) runs on the thread pool; models and storage in the main thread."""
    return step.kind == "task"


def _per_thread(step: Step, head: Head) -> Callable[[pa.Table], pa.Table]:
    """The step with its operators built once in each pool thread that runs it (none is shared)."""
    local = threading.local()

    def run(batch: pa.Table) -> pa.Table:
        if not hasattr(local, "run"):
            local.run = StepRun.build(step, head)
        return local.run(batch)

    return run


def ordered_map(pool: Pool, function: Callable, items: Iterable, ahead: int) -> Iterator:
    """``function`` over ``items`` on ``pool``, in order, with at most ``ahead`` in flight: the pool
    works on the next batches while the caller's thread runs a model on this one."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
