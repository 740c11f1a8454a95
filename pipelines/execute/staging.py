"""Staging: a pass's rows in files below the table, each batch's partial, the decision.

A whole-run stage (an ``Aggregate``: dedup, the top fraction) cannot decide a row before it has
seen the run. The first pass writes its rows to staging files below the table (``Spill``) and
returns a small partial per batch; ``decide`` combines them, and the second pass reads the
staged files back and applies the decision (``ApplyAggregate``). The driver never holds the rows.

A resumable run without a whole-run stage stages its rows on their way to the writer
(``StageRows``). Either way each staged file holds its rows' places in the input
(``SOURCE_ROW``) and its partial (in the file's metadata), so the files alone are the run's
progress (``pipelines.execute.progress``).
"""

from __future__ import annotations

import base64
import io
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators import schema as col
from operators.resources import Resources
from operators.stage import Stage, Staged, Tasks
from operators.storage import Location
from pipelines import hooks
from pipelines.execute.source import Source, parquet_source

log = logging.getLogger(__name__)

STAGING_DIR = "_vlpipe_staging"  # below the table, hidden from Delta readers like every "_" folder
ROW_BITS = 20  # a staged row's id: its file's id above, its row in the file below
PARTIAL_KEY = b"vlpipe.partial"  # a staged file's partial, base64 in its Parquet metadata


class Spill:
    """First-pass sink of an aggregate: write the batch to a staging file, return its path, rows
    and partial. ``head`` runs first (the decision of an aggregate just before)."""

    def __init__(self, aggregate: Stage, staging: Location, head: tuple[Callable, ...] = ()):
        self.aggregate = aggregate.build()
        self.staging = staging
        self.head = head

    def __call__(self, batch: pa.Table) -> pa.Table:
        hooks.reach("spill")
        for operator in self.head:
            batch = operator(batch)
        data = write_partial(self.aggregate.partial(batch))
        path = write_staged(batch, self.staging, data)
        return pa.table(
            {
                "path": pa.array([path], pa.string()),
                "partial": pa.array([data], pa.binary()),
                "rows": pa.array([batch.num_rows], pa.int64()),
            }
        )


def write_staged(batch: pa.Table, staging: Location, partial: bytes = b"") -> str | None:
    """``batch`` as a staging file (each row with its ``ROW_ID``, ``partial`` in the metadata); its path."""
    if not batch.num_rows:
        return None
    file_id = uuid.uuid4()
    path = f"{staging.path}/{file_id.hex}.parquet"
    staged = with_row_ids(batch, file_id.int)
    metadata = {**(staged.schema.metadata or {}), PARTIAL_KEY: base64.b64encode(partial)}
    pq.write_table(staged.replace_schema_metadata(metadata), path, filesystem=staging.filesystem)
    hooks.reach(f"spilled:{path}")
    return path


def stage_rows_stage(staging: Location, rows: int) -> Stage:
    """Stage the rows on their way to the writer, ``rows`` a file: a resumable run's progress
    where no whole-run stage stages them."""
    return Stage(
        name="stage_rows",
        kind="io",
        reads=(col.SOURCE_SHARD, col.SOURCE_ROW),  # written with every row: what the next attempt skips
        adds=(),
        build=partial(StageRows, staging),
        resources=Resources(num_cpus=0, num_gpus=0, batch_size=rows),
        details=(f"to {staging.uri}, {rows:,} rows a file: a stopped run resumes from them",),
    )


class StageRows:
    """Write each batch to a staging file and pass it on unchanged."""

    def __init__(self, staging: Location):
        self.staging = staging

    def __call__(self, batch: pa.Table) -> pa.Table:
        hooks.reach("spill")
        write_staged(batch, self.staging)
        return batch


def write_partial(partial: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, partial.schema) as writer:
        writer.write_table(partial)
    return sink.getvalue()


def with_row_ids(batch: pa.Table, file_id: int) -> pa.Table:
    """The batch with ``schema.ROW_ID``: which staged file (42 random bits) and which row of it."""
    if batch.num_rows >= 1 << ROW_BITS:
        raise ValueError(f"a staged file holds at most {1 << ROW_BITS} rows")
    rows = ((file_id & ((1 << 42) - 1)) << ROW_BITS) + np.arange(batch.num_rows, dtype=np.int64)
    return batch.drop_columns([c for c in (col.ROW_ID,) if c in batch.column_names]).append_column(
        col.ROW_ID, pa.array(rows, pa.int64())
    )


def read_partial(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


def staged_partial(schema: pa.Schema) -> bytes:
    """The partial a staged file was written with (``Spill``)."""
    return base64.b64decode((schema.metadata or {}).get(PARTIAL_KEY, b""))


@dataclass(frozen=True)
class ApplyAggregate:
    """Second-pass head: the aggregate's decision with the run's combined state."""

    aggregate: Stage
    state: object

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.aggregate.build().apply(batch, self.state).drop_columns([col.ROW_ID])


@dataclass(frozen=True)
class Decided:
    """A whole-run stage's decision: its state, and how long deciding took (after the first pass)."""

    name: str
    state: object
    seconds: float


def decide(
    aggregate: Stage, spilled: list[dict], staging: Location, tasks: Tasks
) -> tuple[Source, tuple[ApplyAggregate], Decided]:
    """An aggregate's decision from its spill's rows; the second pass's source, head and the ``Decided``.

    ``staging`` is where the decision may keep files of its own; ``tasks`` is the executor, for a
    decision that needs more than the partials (dedup reads columns of the staged rows back and
    may shuffle them).
    """
    paths = [r["path"] for r in spilled if r["path"]]
    start = time.perf_counter()
    staged = Staged(paths, staging, tasks, sum(r["rows"] for r in spilled))
    state = aggregate.build().combine([read_partial(r["partial"]) for r in spilled], staged)
    seconds = time.perf_counter() - start
    log.info("%s over the whole run (%.2f s): %s", aggregate.name, seconds, state)
    second = parquet_source(paths, staging.filesystem)
    return second, (ApplyAggregate(aggregate, state),), Decided(aggregate.name, state, round(seconds, 3))


def remove_staging(staging: Location) -> None:
    try:
        if staging.filesystem.get_file_info(staging.path).type != pafs.FileType.NotFound:
            staging.filesystem.delete_dir(staging.path)
    except OSError as err:
        log.warning("could not remove the staging files %s: %s", staging.uri, err)
