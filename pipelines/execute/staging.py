"""Staging for whole-run stages: the first pass's rows in files, each batch's partial, the decision.

A whole-run stage (an ``Aggregate``: dedup, the top fraction) cannot decide a row before it has
seen the run. The first pass writes its rows to staging files below the table (``Spill``) and
returns a small partial per batch; ``decide`` combines them, and the second pass reads the
staged files back and applies the decision (``ApplyAggregate``). The driver never holds the rows.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators import schema as col
from operators.stage import Stage, Staged, Tasks
from operators.storage import Location
from pipelines.execute.source import Source, parquet_source

log = logging.getLogger(__name__)

STAGING_DIR = "_vlpipe_staging"  # below the table, hidden from Delta readers like every "_" folder
SPILL_ROWS = 8192
ROW_BITS = 20  # a staged row's id: its file's id above, its row in the file below


class Spill:
    """First-pass sink of an aggregate: write the batch to a staging file, return its partial.
    ``head`` runs first (the decision of an aggregate just before)."""

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

    ``tasks`` is the executor, for a decision that needs more than the partials (dedup reads
    columns of the staged rows back and may shuffle them).
    """
    paths = [r["path"] for r in spilled if r["path"]]
    start = time.perf_counter()
    state = aggregate.build().combine([read_partial(r["partial"]) for r in spilled], Staged(paths, staging, tasks))
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
