"""The Ray executor: how steps map onto Ray Data, decided here, in one place.

- A ``task`` step (decoding) is a task pool of a set size; a pass whose first step is a task
  reads its files inside that step's tasks, a file per task (``Pass.reads_inside``), so raw
  bytes never wait in the object store.
- An ``actor`` step (a model) is an actor pool: one actor per GPU, or one on CPU.
- An ``io`` step (the writer, the spill) takes no CPU slot: long-lived actors for a step that
  runs many times, tasks for one that runs once or twice (``storage_pool``).

Retries are Ray Data's own: a worker that dies (OOM, preemption, a decoder crash) costs a
retry, not the run; an exception raised by a stage fails the run at once. The per-operator
remote arguments that bounded them (max_retries, max_restarts) are deprecated in Ray 2.60 and
gone in 2.64, so none are passed.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import ray
import ray.data

from operators.input.prepare import SHARD_PATH
from operators.resources import Resources
from operators.storage import Location
from pipelines.errors import PlanError
from pipelines.execute.batches import Head, StepRun, quiet_idle_threads
from pipelines.execute.source import Source
from pipelines.execute.staging import Spill
from pipelines.execute.steps import Pass, Step

log = logging.getLogger(__name__)

# Storage steps (read, write, spill) ask for no CPU, so they never queue behind decoding and the
# models for a CPU slot (a 0.25-CPU writer did: blocks piled up in front of it, memory grew with
# the run and Ray started a worker process per slot). Their pools are capped instead: one task (or,
# for write and spill, one actor: ``storage_pool``) per this many cores.
IO_TASKS_CPUS_EACH = 2
IO_RESOURCES = Resources(num_cpus=0, num_gpus=0)
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


class RayExecutor:
    """Passes as Ray Data pipelines on the connected cluster, whose ``cluster`` resources size the pools.

    ``rows``: the run's input rows, where the shards' footers give them (a storage step that runs
    once or twice stays a task).
    """

    def __init__(self, cluster: dict[str, float], rows: int | None = None, gpu_share: float = 1.0):
        self.cluster, self.input_rows, self.gpu_share = cluster, rows, gpu_share
        # Task pools are sized as a ceiling (see task_concurrency); a small run has fewer blocks than
        # that, which Ray reports as a warning on every run although nothing is wrong.
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for", category=UserWarning)

    @classmethod
    def local(cls) -> RayExecutor:
        """On this process's Ray (``connect``)."""
        connect()
        return cls(_resources())

    @property
    def cpus(self) -> float:
        return self.cluster.get("CPU", 1.0)

    def stream(self, steps: tuple[Step, ...], source: Source, head: Head, reads_inside: bool):
        ds = _listing(source) if reads_inside else _dataset(source, task_concurrency(IO_RESOURCES, self.cpus, io=True))
        for index, step in enumerate(steps):
            ds = self._apply(ds, step, head if index == 0 else (), source if reads_inside and index == 0 else None)
        return ds

    def spill(self, stream, run_pass: Pass, staging: Location, head: Head) -> Iterator[dict]:
        aggregate, rows = run_pass.aggregate, run_pass.spill_rows
        compute = storage_pool(Resources(num_cpus=0, num_gpus=0, batch_size=rows), self.cpus, self.input_rows)
        if isinstance(compute, ray.data.ActorPoolStrategy):
            spill, constructor = Spill, {"fn_constructor_args": (aggregate, staging, head)}
        else:
            spill, constructor = _named(Spill(aggregate, staging, head), "Spill"), {}
        spilled = stream.map_batches(
            spill,
            batch_size=rows,
            batch_format="pyarrow",
            zero_copy_batch=True,
            num_cpus=0,
            compute=compute,
            **constructor,
        )
        yield from spilled.iter_rows()
        log.debug("Ray Data stats:\n%s", spilled.stats())

    def rows(self, stream) -> Iterator[dict]:
        yield from stream.iter_rows()
        # Per-stage wall and CPU time of the execution; the benchmark reads it from this log.
        log.debug("Ray Data stats:\n%s", stream.stats())

    def run_task(self, function: Callable, *args):
        return ray.get(ray.remote(num_cpus=0, max_retries=3)(function).remote(*args))

    def read_parquet(self, paths: list[str], filesystem, columns: list[str], *, include_paths: bool = False):
        return ray.data.read_parquet(paths, filesystem=filesystem, columns=columns, include_paths=include_paths)

    @contextmanager
    def shuffling(self):
        """Ray's task-based sort shuffle for the datasets made inside: on a small run the default hash shuffle
        starts aggregator actors and took 1.4-3.5 s per groupby, this takes 0.1 s (2 cores)."""
        from ray.data.context import ShuffleStrategy

        context = ray.data.DataContext.get_current()
        before = context.shuffle_strategy
        context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        try:
            yield
        finally:
            context.shuffle_strategy = before

    def describe(self, run_pass: Pass) -> list[str]:
        lines = []
        if not run_pass.reads_inside:
            lines.append(
                f"  ray step Read: read -- tasks (at most {task_concurrency(IO_RESOURCES, self.cpus, io=True)}, "
                "a file each) x 0 CPU"
            )
        for index, step in enumerate(run_pass.steps):
            args = self._args(step)
            lines.append(f"  ray step {step.name}: {_how(step, args, reads=run_pass.reads_inside and index == 0)}")
        return lines

    def close(self) -> None:
        pass

    def _args(self, step: Step) -> dict[str, Any]:
        return map_batches_args(step, self.cluster.get("GPU", 0.0), self.cpus, self.input_rows, self.gpu_share)

    def _apply(self, ds, step: Step, head: Head, source: Source | None):
        """``ds`` with one step applied; with a ``source``, ``ds`` is its listing and each task reads its file."""
        args = self._args(step)
        if isinstance(args["compute"], ray.data.ActorPoolStrategy):
            actor = type(step.name, (StepActor,), {})  # named only for Ray's progress bars and stats
            return ds.map_batches(actor, fn_constructor_args=(step, head), **args)
        if source is not None:
            return ds.map_batches(_reading_task_function(step, head, source), **{**args, "batch_size": 1})
        return ds.map_batches(_task_function(step, head), **args)


def connect() -> None:
    """This process's Ray: the one it is connected to, else ``RAY_ADDRESS``'s, else a local one started here."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)


def start_ray(
    address: str | None, dashboard: bool, run_passes: list[Pass], timeout_s: float, rows: int | None
) -> RayExecutor:
    """Connect to (or start) Ray and wait up to ``timeout_s`` until it can run the passes."""
    if not ray.is_initialized():
        # "local" rather than None: a stale /tmp/ray/ray_current_cluster from an earlier
        # `ray start` must not make a laptop run attach to a dead cluster.
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        on_sigterm = signal.getsignal(signal.SIGTERM)
        # A cluster that exists has its dashboard already; only a local start can choose.
        options = {"include_dashboard": dashboard} if address == "local" else {}
        if address == "local":
            # Ray Data re-reads every shard's footer on a pool of 32 actors, one process each; on a
            # small machine that was 2/3 of a run's worker processes (21 -> 9 at 60k rows, 2 cores).
            # The local Ray's workers inherit this; a value already set wins.
            os.environ.setdefault(FOOTER_ACTORS_ENV, str(max(2, min(32, os.cpu_count() or 2))))
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, **options)
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            # Ray's core worker takes SIGTERM over (and aborts): keep the caller's handler, which
            # ends the run like Ctrl-C, so the run is recorded as interrupted.
            signal.signal(signal.SIGTERM, on_sigterm)
    deadline = time.monotonic() + timeout_s
    while (short := resource_shortfall(run_passes, ray.cluster_resources())) is not None:
        if time.monotonic() >= deadline:
            waited = f" (waited {timeout_s:g} s for the cluster to grow)" if timeout_s else ""
            raise PlanError(short + waited)
        log.info("waiting for the cluster: %s", short)
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    return RayExecutor(_resources(), rows, default_gpu_share(run_passes))


def _resources() -> dict[str, float]:
    return {name: float(value) for name, value in ray.cluster_resources().items()}


def default_gpu_share(run_passes: list[Pass]) -> float:
    """The share of each GPU that a model step left at ``num_gpus: None`` takes.

    A run's model actors are all up at once (see ``resource_shortfall``), so k such steps each
    holding whole GPUs would need k times the cluster. Instead they split every GPU: one actor per
    GPU each, of 1/k of it, rounded down to Ray's resource precision (1e-4) so k of them fit.
    """
    shared = sum(1 for p in run_passes for s in p.steps if s.kind == "actor" and s.resources.num_gpus is None)
    return math.floor(10_000 / max(1, shared)) / 10_000


def map_batches_args(
    step: Step, cluster_gpus: float, cluster_cpus: float = 2.0, rows: int | None = None, gpu_share: float = 1.0
) -> dict[str, Any]:
    """A step's declared resources as ``map_batches`` arguments; ``rows``: the run's input rows, if known;
    ``gpu_share``: what ``num_gpus: None`` means on a cluster with GPUs (``default_gpu_share``)."""
    resources, actor = step.resources, step.kind == "actor"
    num_gpus, shared = resources.num_gpus, resources.num_gpus is None
    if shared:
        num_gpus = gpu_share if actor and cluster_gpus >= 1 else 0.0
    args: dict[str, Any] = {
        "batch_size": resources.batch_size,
        "batch_format": "pyarrow",
        "zero_copy_batch": True,
        "num_cpus": resources.num_cpus,
    }
    if num_gpus:
        args["num_gpus"] = num_gpus
    if actor:
        # By default as many actors as fit the GPUs: one per GPU for a shared step (each holds its
        # share, see default_gpu_share). On CPU one actor, leaving cores for decoding.
        fit = cluster_gpus if shared else cluster_gpus / num_gpus if num_gpus else 1
        size = resources.concurrency or max(1, int(fit))
        args["compute"] = ray.data.ActorPoolStrategy(size=size)
    elif step.kind == "io":
        args["compute"] = storage_pool(resources, cluster_cpus, rows)
    else:
        args["compute"] = ray.data.TaskPoolStrategy(size=task_concurrency(resources, cluster_cpus))
    return args


def storage_pool(resources: Resources, cluster_cpus: float, rows: int | None):
    """Long-lived actors for a storage step that runs many times; tasks for one that runs once or twice.

    As tasks, each write of a long run took a fresh worker process: Ray ends a worker idle for
    1 s, and writes come seconds apart, so every one paid a process start (~1 s of CPU: Python,
    Ray, pyarrow) taken from decoding (20k rows, tiny CLIP: 1.32-1.35 vs 1.24-1.25 s/1k rows with
    actors). An actor always starts a process of its own, though, which a short run waits for
    (the demo's execute: 8.2-8.4 s with a writer actor, 6.5-7.1 s with a task).
    """
    size = task_concurrency(resources, cluster_cpus, io=True)
    if rows is not None and rows <= 2 * resources.batch_size:
        return ray.data.TaskPoolStrategy(size=size)
    return ray.data.ActorPoolStrategy(size=size)


def task_concurrency(resources: Resources, cluster_cpus: float, *, io: bool = False) -> int:
    """How many tasks of a step run at once: as configured, else one per core (or per ``num_cpus``
    cores when a task asks for more than one); a storage step's (``io``) one per ``IO_TASKS_CPUS_EACH``.

    A task pool of a set size never fuses into the model actors after it (Ray fuses tasks into
    actors only when the task pool has no size, or the actor pool's): decoding then runs on its
    own cores, overlapping inference, instead of in series inside each model actor. (Capping
    fractional-CPU writers at one per core was measured slower: 3.34 vs 2.43 s per 1k rows at 10k.)
    """
    if resources.concurrency:
        return resources.concurrency
    if io:
        return max(1, int(cluster_cpus // IO_TASKS_CPUS_EACH))
    # A fraction of a CPU is a share of a model actor's slot, not license for more processes than cores.
    return max(1, int(cluster_cpus // max(1.0, resources.num_cpus)))


def resource_shortfall(run_passes: list[Pass], cluster: dict[str, float]) -> str | None:
    """Why the cluster cannot run these steps, naming the config key; None when it can."""
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    steps = [step for run_pass in run_passes for step in run_pass.steps]
    share = default_gpu_share(run_passes)
    actors = [(step, map_batches_args(step, gpus, cpus, gpu_share=share)) for step in steps if step.kind == "actor"]
    for step, args in actors:
        need = args.get("num_gpus", 0) * args["compute"].min_size
        if need > gpus + 1e-9:
            return (
                f"{_key(step)}.resources asks for {need:g} GPU(s) ({args['compute'].min_size} actor(s) x "
                f"{args['num_gpus']:g}), but the Ray cluster has {gpus:g}"
            )
    gpu_actors = [(step, args) for step, args in actors if args.get("num_gpus")]
    together = sum(args["num_gpus"] * args["compute"].min_size for _, args in gpu_actors)
    if together > gpus + 1e-9:  # each fits alone, but all model actors run at once: else some would wait forever
        asks = ", ".join(f"{_key(step)} {args['compute'].min_size} x {args['num_gpus']:g}" for step, args in gpu_actors)
        return (
            f"the model actors together ask for {together:g} GPU(s) ({asks}), but the Ray cluster has "
            f"{gpus:g}: set each stage's resources.concurrency (or a smaller num_gpus)"
        )
    held = sum(args["num_cpus"] * args["compute"].min_size for _, args in actors)
    tasks = max([0.0] + [step.resources.num_cpus for step in steps if step.kind != "actor"])
    if held + tasks > cpus:
        keys = "/".join(dict.fromkeys(_key(step) for step, _ in actors)) or "model"
        return (
            f"the model actors hold {held:g} CPUs and decoding needs {tasks:g} more, but the Ray "
            f"cluster has {cpus:g}: lower {keys}.resources.num_cpus or concurrency (fractions are fine)"
        )
    return None


def _key(step: Step) -> str:
    return step.anchor.config_key or step.anchor.name


def _how(step: Step, args: dict, reads: bool = False) -> str:
    """``reads``: the step's tasks read the files themselves (``Pass.reads_inside``)."""
    stages = " + ".join(("read",) * reads + tuple(s.name for s in step.stages))
    gpus = f", {args['num_gpus']:g} GPU" if args.get("num_gpus") else ""
    if isinstance(args["compute"], ray.data.ActorPoolStrategy):
        workers = f"{args['compute'].min_size} actor(s)"
    else:
        workers = f"tasks (at most {args['compute'].size}{', a file each' if reads else ''})"
    return f"{stages} -- {workers} x {args['num_cpus']:g} CPU{gpus}, batch {args['batch_size']}"


class StepActor:
    """A model step's actor: builds its operators once, then runs every batch through them."""

    def __init__(self, step: Step, head: Head = ()):
        quiet_idle_threads()
        self.run = StepRun.build(step, head)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.run(batch)


def _task_function(step: Step, head: Head) -> Callable[[pa.Table], pa.Table]:
    def run(batch: pa.Table) -> pa.Table:
        return StepRun.build(step, head)(batch)

    run.__name__ = run.__qualname__ = step.name
    return run


def _reading_task_function(step: Step, head: Head, source: Source) -> Callable:
    """A task that reads one listed file and runs the step on it, a batch of the step's size at a time."""
    rows = step.resources.batch_size

    def run(listing: pa.Table) -> Iterator[pa.Table]:
        step_run = StepRun.build(step, head)
        for path in listing.column(SHARD_PATH).to_pylist():
            for table in source.tables(path):
                for offset in range(0, table.num_rows, rows):
                    yield step_run(table.slice(offset, rows))

    run.__name__ = run.__qualname__ = step.name
    return run


def _named(operator: Callable[[pa.Table], pa.Table], name: str) -> Callable[[pa.Table], pa.Table]:
    """A plain function around ``operator``, named for Ray's progress bars and stats."""

    def run(batch: pa.Table) -> pa.Table:
        return operator(batch)

    run.__name__ = run.__qualname__ = name
    return run


def _listing(source: Source):
    """One row per file, each in a block of its own: a task per file."""
    return ray.data.from_items(
        [{SHARD_PATH: path} for path in source.paths], override_num_blocks=max(1, len(source.paths))
    )


def _dataset(source: Source, concurrency: int = 1):
    """The files' rows as a step of their own: storage I/O (``IO_RESOURCES``), no CPU slot."""

    def read(listing: pa.Table) -> Iterator[pa.Table]:
        for path in listing.column(SHARD_PATH).to_pylist():
            yield from source.tables(path)

    read.__name__ = read.__qualname__ = source.name
    return _listing(source).map_batches(
        read, batch_size=1, batch_format="pyarrow", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=concurrency)
    )
