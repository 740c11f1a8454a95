"""How a plan's stages map onto Ray Data: decided here, in one place.

- Consecutive stages become one Ray step: each ``task`` or ``actor`` stage
  anchors a step, and ``fused`` stages run inside the step before them (or the
  one after, when nothing is before). A cheap per-row step as tasks of its own
  needs a CPU per task and starves behind read, decode and the models.
- An ``aggregate`` stage splits the run in two passes: the first writes its rows
  to staging files (never held in memory) and returns each batch's partial; the
  driver combines them; the second reads the staged files back and decides.
- Internal columns (``_...``) are dropped right after their last reader.
- vlpipe lists the files itself (``Source``); a pass whose first step is CPU work
  (decoding) reads them inside that step's tasks, a file per task, so raw bytes
  never wait in the object store (``reads_inside``).
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators import schema as col
from operators.models import ModelLoadError
from operators.prepare import SHARD_PATH
from operators.resources import Resources
from operators.stage import Stage, Staged
from pipelines import hooks
from pipelines.errors import Interrupted, PlanError
from operators.storage import Location

log = logging.getLogger(__name__)

# Retries are Ray Data's own: a worker that dies (OOM, preemption, a decoder crash) costs a
# retry, not the run; an exception raised by a stage fails the run at once. The per-operator
# remote arguments that bounded them (max_retries, max_restarts) are deprecated in Ray 2.60 and
# gone in 2.64, so none are passed.


@dataclass(frozen=True)
class Step:
    """Stages that run together in one Ray ``map_batches``: one anchor plus the fused ones."""

    stages: tuple[Stage, ...]
    drop: tuple[str, ...] = ()

    @property
    def anchor(self) -> Stage:
        """The one stage that says how the step runs (``passes`` never makes a step without one)."""
        return next(s for s in self.stages if s.kind in ("task", "actor"))

    @property
    def name(self) -> str:
        """CamelCase of the anchor's name: what Ray's progress bars and stats show."""
        return "".join(part.capitalize() for part in re.split(r"[_\W]+", self.anchor.name))

    @property
    def resources(self) -> Resources:
        return self.anchor.resources


@dataclass(frozen=True)
class Pass:
    """Steps run on one stream of rows, ending in an aggregate (or, for the last pass, not)."""

    steps: tuple[Step, ...]
    aggregate: Stage | None = None


def passes(stages: list[Stage]) -> list[Pass]:
    """Group the stages after the source into Ray steps, and the steps into passes."""
    drops = _drops(stages)
    result: list[Pass] = []
    members: list[list[tuple[int, Stage]]] = []  # one list per step
    pending: list[tuple[int, Stage]] = []  # fused stages waiting for a step to join

    def close(aggregate: Stage | None) -> None:
        if pending:
            raise PlanError(f"stage {pending[0][1].name!r} is fused but has no step to run in")
        result.append(Pass(tuple(_step(m, drops) for m in members), aggregate))

    for index, stage in enumerate(stages):
        if stage.kind == "source":
            continue
        if stage.kind == "aggregate":
            close(stage)
            members = []
        elif stage.kind == "fused" and members:
            members[-1].append((index, stage))
        elif stage.kind == "fused":
            pending.append((index, stage))
        else:
            members.append([*pending, (index, stage)])
            pending = []
    close(None)
    return result


def _step(members: list[tuple[int, Stage]], drops: dict[int, tuple[str, ...]]) -> Step:
    return Step(tuple(s for _, s in members), tuple(c for i, _ in members for c in drops.get(i, ())))


def _drops(stages: list[Stage]) -> dict[int, tuple[str, ...]]:
    """Stage index -> the internal columns to drop after it: their last reader (or their producer)."""
    last: dict[str, int] = {}
    for index, stage in enumerate(stages):
        for name in stage.adds:
            if name.startswith("_"):
                last.setdefault(name, index)
        for name in stage.reads:
            if name in last:
                last[name] = index
    out: dict[int, list[str]] = {}
    for name, index in last.items():
        out.setdefault(index, []).append(name)
    return {i: tuple(names) for i, names in out.items()}


def map_batches_args(step: Step, cluster_gpus: float, cluster_cpus: float = 2.0,
                     rows: int | None = None) -> dict[str, Any]:
    """A step's declared resources as ``map_batches`` arguments; ``rows``: the run's input rows, if known."""
    resources, actor = step.resources, step.anchor.kind == "actor"
    num_gpus = resources.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if actor and cluster_gpus >= 1 else 0.0
    args: dict[str, Any] = {"batch_size": resources.batch_size, "batch_format": "pyarrow", "zero_copy_batch": True,
                            "num_cpus": resources.num_cpus}
    if num_gpus:
        args["num_gpus"] = num_gpus
    import ray.data

    if actor:
        # One actor per GPU by default; on CPU one actor, leaving cores for decoding.
        size = resources.concurrency or (max(1, int(cluster_gpus // num_gpus)) if num_gpus else 1)
        args["compute"] = ray.data.ActorPoolStrategy(size=size)
    elif is_storage_step(step):
        args["compute"] = storage_pool(resources, cluster_cpus, rows)
    else:
        args["compute"] = ray.data.TaskPoolStrategy(size=task_concurrency(resources, cluster_cpus))
    return args


def is_storage_step(step: Step) -> bool:
    """A task step that asks for no CPU: storage I/O (the writer)."""
    return step.anchor.kind == "task" and step.resources.num_cpus == 0


def storage_pool(resources: Resources, cluster_cpus: float, rows: int | None):
    """Long-lived actors for a storage step that runs many times; tasks for one that runs once or twice.

    As tasks, each write of a long run took a fresh worker process: Ray ends a worker idle for
    1 s, and writes come seconds apart, so every one paid a process start (~1 s of CPU: Python,
    Ray, pyarrow) taken from decoding (20k rows, tiny CLIP: 1.32-1.35 vs 1.24-1.25 s/1k rows with
    actors). An actor always starts a process of its own, though, which a short run waits for
    (the demo's execute: 8.2-8.4 s with a writer actor, 6.5-7.1 s with a task).
    """
    import ray.data

    size = task_concurrency(resources, cluster_cpus)
    if rows is not None and rows <= 2 * resources.batch_size:
        return ray.data.TaskPoolStrategy(size=size)
    return ray.data.ActorPoolStrategy(size=size)


def task_concurrency(resources: Resources, cluster_cpus: float) -> int:
    """How many tasks of a step run at once: as configured, else one per core (or per ``num_cpus``
    cores when a task asks for more than one).

    A task pool of a set size never fuses into the model actors after it (Ray fuses tasks into
    actors only when the task pool has no size, or the actor pool's): decoding then runs on its
    own cores, overlapping inference, instead of in series inside each model actor. (Capping
    fractional-CPU writers at one per core was measured slower: 3.34 vs 2.43 s per 1k rows at 10k.)
    """
    if resources.concurrency:
        return resources.concurrency
    if resources.num_cpus == 0:
        return max(1, int(cluster_cpus // IO_TASKS_CPUS_EACH))
    # A fraction of a CPU is a share of a model actor's slot, not license for more processes than cores.
    return max(1, int(cluster_cpus // max(1.0, resources.num_cpus)))


# Storage steps (read, write, spill) ask for no CPU, so they never queue behind decoding and the
# models for a CPU slot (a 0.25-CPU writer did: blocks piled up in front of it, memory grew with
# the run and Ray started a worker process per slot). Their pools are capped instead: one task (or,
# for write and spill, one actor: ``storage_pool``) per this many cores.
IO_TASKS_CPUS_EACH = 2
IO_RESOURCES = Resources(num_cpus=0, num_gpus=0)


def apply_step(ds, step: Step, cluster: dict[str, float], head: tuple[Callable, ...] = (),
               source: Source | None = None, rows: int | None = None):
    """``ds`` with one step applied; ``head`` are operators run first (an aggregate's decision).

    With a ``source``, ``ds`` is its listing and each task reads its file itself (``reads_inside``).
    """
    args = map_batches_args(step, cluster.get("GPU", 0.0), cluster.get("CPU", 1.0), rows)
    if is_actor_pool(args["compute"]):
        actor = type(step.name, (StepActor,), {})  # named only for Ray's progress bars and stats
        return ds.map_batches(actor, fn_constructor_args=(step, head), **args)
    if source is not None:
        return ds.map_batches(_reading_task_function(step, head, source), **{**args, "batch_size": 1})
    return ds.map_batches(_task_function(step, head), **args)


class StepActor:
    """A model step's actor: builds its operators once, then runs every batch through them."""

    def __init__(self, step: Step, head: tuple[Callable, ...] = ()):
        quiet_idle_threads()
        self.run = StepRun(step, head, build_operators(step))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.run(batch)


def quiet_idle_threads() -> None:
    """Make the model's idle OpenMP threads sleep, not spin, in this actor's process (before torch loads).

    The actor shares the node's cores with decoding; torch's OpenMP threads otherwise busy-wait
    between operations. With the tiny CLIP at 10k rows the CLIP actor burnt 11.8 CPU-s spinning
    for 3.0 CPU-s of work, taken from the decode tasks beside it. A value the user set is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _task_function(step: Step, head: tuple[Callable, ...]) -> Callable[[pa.Table], pa.Table]:
    def run(batch: pa.Table) -> pa.Table:
        return StepRun(step, head, build_operators(step))(batch)

    run.__name__ = run.__qualname__ = step.name
    return run


def _reading_task_function(step: Step, head: tuple[Callable, ...], source: Source) -> Callable:
    """A task that reads one listed file and runs the step on it, a batch of the step's size at a time."""
    rows = step.resources.batch_size

    def run(listing: pa.Table) -> Iterator[pa.Table]:
        step_run = StepRun(step, head, build_operators(step))
        for path in listing.column(SHARD_PATH).to_pylist():
            for table in source.tables(path):
                for offset in range(0, table.num_rows, rows):
                    yield step_run(table.slice(offset, rows))

    run.__name__ = run.__qualname__ = step.name
    return run


@dataclass
class StepRun:
    """One step over one batch, checking each stage's declared columns as it goes."""

    step: Step
    head: tuple[Callable, ...]
    operators: list

    def __call__(self, batch: pa.Table) -> pa.Table:
        for operator in self.head:
            batch = operator(batch)
        for stage, operator in zip(self.step.stages, self.operators):
            hooks.reach(f"batch:{stage.name}")
            batch = operator(batch)
            missing = [c for c in stage.adds if c not in batch.column_names]
            if missing:
                raise PlanError(f"stage {stage.name!r} declares column(s) {', '.join(missing)} but did not add them")
        return batch.drop_columns([c for c in self.step.drop if c in batch.column_names])


def build_operators(step: Step) -> list:
    return [_build(stage) for stage in step.stages]


def _build(stage: Stage):
    try:
        return stage.build()
    except Exception as err:
        if stage.kind != "actor" or isinstance(err, Interrupted):  # a run stopped while its model loads (in process)
            raise
        # Ray fails the run on the first actor that dies in its constructor (no restart loop);
        # this puts the model's own error in the last line of the message the user sees.
        name = getattr(stage.build, "func", stage.build).__name__
        raise ModelLoadError(f"{name} could not load its model: {type(err).__name__}: {err}") from err


class Spill:
    """First-pass sink of an aggregate (a storage actor): write the batch to a staging file, return
    its partial. ``head`` runs first (the decision of an aggregate just before)."""

    def __init__(self, aggregate: Stage, staging: Location, head: tuple[Callable, ...] = ()):
        self.aggregate = aggregate.build()
        self.staging = staging
        self.head = head

    def __call__(self, batch: pa.Table) -> pa.Table:
        for operator in self.head:
            batch = operator(batch)
        path = None
        if batch.num_rows:
            file_id = uuid.uuid4()
            path = f"{self.staging.path}/{file_id.hex}.parquet"
            pq.write_table(with_row_ids(batch, file_id.int), path, filesystem=self.staging.filesystem)
        sink = io.BytesIO()
        partial = self.aggregate.partial(batch)
        with pa.ipc.new_stream(sink, partial.schema) as writer:
            writer.write_table(partial)
        return pa.table({"path": pa.array([path], pa.string()), "partial": pa.array([sink.getvalue()], pa.binary())})


ROW_BITS = 20  # a staged row's id: its file's id above, its row in the file below


def with_row_ids(batch: pa.Table, file_id: int) -> pa.Table:
    """The batch with ``schema.ROW_ID``: which staged file (42 random bits) and which row of it."""
    if batch.num_rows >= 1 << ROW_BITS:
        raise ValueError(f"a staged file holds at most {1 << ROW_BITS} rows")
    rows = ((file_id & ((1 << 42) - 1)) << ROW_BITS) + np.arange(batch.num_rows, dtype=np.int64)
    return batch.drop_columns([c for c in (col.ROW_ID,) if c in batch.column_names]).append_column(
        col.ROW_ID, pa.array(rows, pa.int64()))


def read_partial(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


@dataclass(frozen=True)
class ApplyAggregate:
    """Second-pass head: the aggregate's decision with the run's combined state."""

    aggregate: Stage
    state: object

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.aggregate.build().apply(batch, self.state).drop_columns([col.ROW_ID])


def resource_shortfall(run_passes: list[Pass], cluster: dict[str, float]) -> str | None:
    """Why the cluster cannot run these steps, naming the config key; None when it can."""
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    steps = [step for run_pass in run_passes for step in run_pass.steps]
    actors = [(step, map_batches_args(step, gpus, cpus)) for step in steps if step.anchor.kind == "actor"]
    for step, args in actors:
        need = args.get("num_gpus", 0) * args["compute"].min_size
        if need > gpus:
            key = step.anchor.config_key or step.anchor.name
            return (f"{key}.resources asks for {need:g} GPU(s) ({args['compute'].min_size} actor(s) x "
                    f"{args['num_gpus']:g}), but the Ray cluster has {gpus:g}")
    gpu_actors = [(step, args) for step, args in actors if args.get("num_gpus")]
    together = sum(args["num_gpus"] * args["compute"].min_size for _, args in gpu_actors)
    if together > gpus:  # each fits alone, but all model actors run at once: else some would wait forever
        asks = ", ".join(f"{step.anchor.config_key or step.anchor.name} {args['compute'].min_size} x "
                         f"{args['num_gpus']:g}" for step, args in gpu_actors)
        return (f"the model actors together ask for {together:g} GPU(s) ({asks}), but the Ray cluster has "
                f"{gpus:g}: set each stage's resources.concurrency (or a smaller num_gpus)")
    held = sum(args["num_cpus"] * args["compute"].min_size for _, args in actors)
    tasks = max([0.0] + [step.resources.num_cpus for step in steps if step.anchor.kind != "actor"])
    if held + tasks > cpus:
        keys = "/".join(dict.fromkeys(step.anchor.config_key or step.anchor.name for step, _ in actors)) or "model"
        return (f"the model actors hold {held:g} CPUs and decoding needs {tasks:g} more, but the Ray "
                f"cluster has {cpus:g}: lower {keys}.resources.num_cpus or concurrency (fractions are fine)")
    return None


PARQUET_BATCH_ROWS = 1024  # rows per block read from a Parquet file: one row group is often the whole file


@dataclass(frozen=True)
class Source:
    """Files vlpipe has listed itself, and how to read one of them as bounded tables.

    Ray's own readers list the given files again in a task of their own: 2-3 s of a small
    run's wall time on two cores (ListFiles: 2.0-2.8 s wall, 0.1-0.2 s CPU), every run and
    every pass. ``with_path`` adds the file's path to each row (``SHARD_PATH``, as Ray's
    include_paths does). The S3 filesystem retries on its own.
    """

    paths: tuple[str, ...]
    read_file: Callable[[str], Iterator[pa.Table]]
    name: str
    with_path: bool = False

    def tables(self, path: str) -> Iterator[pa.Table]:
        for table in self.read_file(path):
            yield table.append_column(SHARD_PATH, pa.array([path] * table.num_rows, pa.string())) \
                if self.with_path else table

    def listing(self):
        """One row per file, each in a block of its own: a task per file."""
        import ray.data

        return ray.data.from_items([{SHARD_PATH: path} for path in self.paths],
                                   override_num_blocks=max(1, len(self.paths)))

    def dataset(self, concurrency: int = 1):
        """The files' rows as a step of their own: storage I/O (``IO_RESOURCES``), no CPU slot."""
        import ray.data

        def read(listing: pa.Table) -> Iterator[pa.Table]:
            for path in listing.column(SHARD_PATH).to_pylist():
                yield from self.tables(path)

        read.__name__ = read.__qualname__ = self.name
        return self.listing().map_batches(read, batch_size=1, batch_format="pyarrow", num_cpus=0,
                                          compute=ray.data.TaskPoolStrategy(size=concurrency))


def parquet_source(paths: list[str], filesystem: pafs.FileSystem, columns: list[str] | None = None, *,
                   with_path: bool = False) -> Source:
    """Parquet files vlpipe has listed itself, read in blocks of ``PARQUET_BATCH_ROWS`` rows."""
    return Source(tuple(paths), partial(parquet_blocks, filesystem, columns), "ReadParquet", with_path)


def parquet_blocks(filesystem: pafs.FileSystem, columns: list[str] | None, path: str) -> Iterator[pa.Table]:
    with filesystem.open_input_file(path) as source:
        for part in pq.ParquetFile(source).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            yield pa.Table.from_batches([part])


def reads_inside(run_pass: Pass) -> bool:
    """Whether a pass's files are read inside its first step's tasks rather than as a step of their own.

    A CPU-bound first step (decoding) reads its own files: a read step runs ~25x faster than
    decoding, and its blocks of raw bytes queued in the object store up to Ray Data's budget
    (3.5 GB of 5.3 at a million rows), each also copied through the store once more.
    """
    first = run_pass.steps[0] if run_pass.steps else None
    return first is not None and first.anchor.kind == "task" and first.resources.num_cpus > 0


def is_actor_pool(compute) -> bool:
    import ray.data

    return isinstance(compute, ray.data.ActorPoolStrategy)


STAGING_DIR = "_vlpipe_staging"  # below the table, hidden from Delta readers like every "_" folder
SPILL_ROWS = 8192
SPILL_RESOURCES = Resources(num_cpus=0, num_gpus=0, batch_size=SPILL_ROWS)


def _named(operator: Callable[[pa.Table], pa.Table], name: str) -> Callable[[pa.Table], pa.Table]:
    """A plain function around ``operator``, named for Ray's progress bars and stats."""
    def run(batch: pa.Table) -> pa.Table:
        return operator(batch)

    run.__name__ = run.__qualname__ = name
    return run


def execute(run_passes: list[Pass], source: Source, table: Location, run_id: str, cluster: dict[str, float],
            decided: list | None = None, rows: int | None = None):
    """Run every pass from ``source`` (of ``rows`` rows, where known); yields the last step's rows (the
    writer's summaries). Each aggregate's ``Decided`` (its state and the seconds its decision took) is
    appended to ``decided``."""
    staging = table.child(f"{STAGING_DIR}/{run_id}")
    head: tuple[Callable, ...] = ()
    io_tasks = task_concurrency(IO_RESOURCES, cluster.get("CPU", 1.0))
    # Task pools are sized as a ceiling (see task_concurrency); a small run has fewer blocks than
    # that, which Ray reports as a warning on every run although nothing is wrong.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for", category=UserWarning)
    try:
        for run_pass in run_passes:
            inside = reads_inside(run_pass)
            ds = source.listing() if inside else source.dataset(io_tasks)
            for index, step in enumerate(run_pass.steps):
                ds = apply_step(ds, step, cluster, head if index == 0 else (),
                                source if inside and index == 0 else None, rows)
            if run_pass.steps:
                head = ()
            if run_pass.aggregate is not None:
                # Two whole-run stages in a row (dedup, then the top fraction): the pass between them
                # has no step, so the first one's decision runs inside the second one's spill.
                source, head, outcome = _through_aggregate(ds, run_pass.aggregate, staging, cluster, head, rows)
                if decided is not None:
                    decided.append(outcome)
        yield from ds.iter_rows()
        # Per-stage wall and CPU time of the execution; the benchmark reads it from this log.
        log.debug("Ray Data stats:\n%s", ds.stats())
    finally:
        remove_staging(staging)


def _through_aggregate(ds, aggregate: Stage, staging: Location, cluster: dict[str, float],
                       head: tuple[Callable, ...] = (), rows: int | None = None):
    """Spill the rows to staging files while collecting partials; the second pass's source (the staged
    files) and head."""
    staging.filesystem.create_dir(staging.path, recursive=True)
    compute = storage_pool(SPILL_RESOURCES, cluster.get("CPU", 1.0), rows)
    if is_actor_pool(compute):
        spill, constructor = Spill, {"fn_constructor_args": (aggregate, staging, head)}
    else:
        spill, constructor = _named(Spill(aggregate, staging, head), "Spill"), {}
    spilled = ds.map_batches(spill, batch_size=SPILL_ROWS, batch_format="pyarrow", zero_copy_batch=True,
                             num_cpus=0, compute=compute, **constructor)
    return decide(aggregate, list(spilled.iter_rows()), staging, cluster)


def decide(aggregate: Stage, spilled: list[dict], staging: Location, cluster: dict[str, float] | None):
    """An aggregate's decision from its spill's rows (``cluster`` None: a run without Ray); the second
    pass's source, head and the ``Decided``."""
    paths = [r["path"] for r in spilled if r["path"]]
    start = time.perf_counter()
    state = aggregate.build().combine([read_partial(r["partial"]) for r in spilled], Staged(paths, staging, cluster))
    seconds = time.perf_counter() - start
    log.info("%s over the whole run (%.2f s): %s", aggregate.name, seconds, state)
    second = parquet_source(paths, staging.filesystem)
    return second, (ApplyAggregate(aggregate, state),), Decided(aggregate.name, state, round(seconds, 3))


@dataclass(frozen=True)
class Decided:
    """A whole-run stage's decision: its state, and how long deciding took (after the first pass)."""

    name: str
    state: object
    seconds: float


def remove_staging(staging: Location) -> None:
    try:
        if staging.filesystem.get_file_info(staging.path).type != pafs.FileType.NotFound:
            staging.filesystem.delete_dir(staging.path)
    except OSError as err:
        log.warning("could not remove the staging files %s: %s", staging.uri, err)
