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

import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor

import pyarrow as pa

from operators.stage import Stage
from operators.storage import Location
from pipelines.config import PipelineConfig
from pipelines.execute import (SPILL_ROWS, STAGING_DIR, Pass, Source, Spill, Step, StepRun, build_operators, decide,
                               quiet_idle_threads, remove_staging)


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
    asks = [step for run_pass in run_passes for step in run_pass.steps
            if step.anchor.kind == "actor" and step.resources.num_gpus]
    if not asks:
        return None
    import torch

    have = torch.cuda.device_count()
    for step in asks:
        if step.resources.num_gpus > have:
            return (f"{step.anchor.config_key or step.anchor.name}.resources asks for {step.resources.num_gpus:g} "
                    f"GPU(s), but this machine has {have} (the run is in this process: {reason})")
    return None


def _ray_connected() -> bool:
    """Whether this process already uses a Ray (a notebook's, a test's): then its runs go there."""
    ray = sys.modules.get("ray")  # never imported just to ask: a small run need not load Ray at all
    return ray is not None and ray.is_initialized()


def cpu_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def execute_in_process(run_passes: list[Pass], source: Source, table: Location, run_id: str,
                       decided: list | None = None, threads: int | None = None) -> Iterator[dict]:
    """Run every pass here; yields the writer's summaries like ``pipelines.execute.execute``."""
    quiet_idle_threads()
    threads = threads or cpu_threads()
    staging = table.child(f"{STAGING_DIR}/{run_id}")
    pool = ThreadPoolExecutor(threads, thread_name_prefix="vlpipe-cpu")
    head: tuple[Callable, ...] = ()
    try:
        for run_pass in run_passes:
            batches: Iterable[pa.Table] = (t for path in source.paths for t in source.tables(path))
            for index, step in enumerate(run_pass.steps):
                batches = _apply(batches, step, head if index == 0 else (), pool, threads)
            if run_pass.steps:
                head = ()
            if run_pass.aggregate is not None:
                source, head, outcome = _through_aggregate(batches, run_pass.aggregate, staging, head)
                if decided is not None:
                    decided.append(outcome)
        for summary in batches:
            yield from summary.to_pylist()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        remove_staging(staging)


def _apply(batches: Iterable[pa.Table], step: Step, head: tuple[Callable, ...], pool: Executor,
           threads: int) -> Iterator[pa.Table]:
    """The step over ``batches``, re-cut to its batch size: on the pool for CPU work, else here."""
    batches = rebatch(batches, step.resources.batch_size)
    if on_pool(step):
        return ordered_map(pool, _per_thread(step, head), batches, ahead=2 * threads)
    return map(StepRun(step, head, build_operators(step)), batches)


def on_pool(step: Step) -> bool:
    """CPU work (read, prepare, decode) runs on the thread pool; models and storage in the main thread."""
    return step.anchor.kind == "task" and step.resources.num_cpus > 0


def _per_thread(step: Step, head: tuple[Callable, ...]) -> Callable[[pa.Table], pa.Table]:
    """The step with its operators built once in each pool thread that runs it (none is shared)."""
    local = threading.local()

    def run(batch: pa.Table) -> pa.Table:
        if not hasattr(local, "run"):
            local.run = StepRun(step, head, build_operators(step))
        return local.run(batch)

    return run


def ordered_map(pool: Executor, function: Callable, items: Iterable, ahead: int) -> Iterator:
    """``function`` over ``items`` on ``pool``, in order, with at most ``ahead`` in flight: the pool
    works on the next batches while the caller's thread runs a model on this one."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def rebatch(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of ``tables`` in tables of exactly ``rows`` rows (the last may hold fewer), as Ray
    Data's ``map_batches(batch_size=rows)`` hands them to a step."""
    held: list[pa.Table] = []
    count = 0
    for table in tables:
        while table.num_rows:
            take = min(rows - count, table.num_rows)
            held.append(table.slice(0, take))
            count += take
            table = table.slice(take)
            if count == rows:
                yield _concat(held)
                held, count = [], 0
    if count:
        yield _concat(held)


def _concat(tables: list[pa.Table]) -> pa.Table:
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")


def _through_aggregate(batches: Iterable[pa.Table], aggregate: Stage, staging: Location,
                       head: tuple[Callable, ...]):
    """Spill the pass's rows to staging files, then decide: as on Ray, with no Ray for the decision."""
    staging.filesystem.create_dir(staging.path, recursive=True)
    spill = Spill(aggregate, staging, head)
    spilled = [row for batch in rebatch(batches, SPILL_ROWS) for row in spill(batch).to_pylist()]
    return decide(aggregate, spilled, staging, None)
