"""The writer: each batch becomes one Parquet data file below the table, invisible until the commit.

Its summaries (a row per file, with every row counted by outcome) are what the commit adds up.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.endpoint.usage import add_totals, usage_totals
from operators.resources import Resources
from operators.stage import Stage
from operators.storage import Location
from pipelines.table.datafile import file_stats, new_file_path, partition_dir, write_data_file

_SUMMARY_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("rows_written", pa.int64()),
        ("stats", pa.string()),
        ("outcomes", pa.string()),
        ("usage", pa.string()),
    ]
)


# Writing Parquet is mostly waiting on storage: an ``io`` stage, which takes no CPU slot.
WRITER_NUM_CPUS = 0


def write_stage(
    table: Location, schema: pa.Schema, run_id: str, run_date: dt.date, *, kept_only: bool, rows_per_file: int
) -> Stage:
    """The writer's contract: it reads every output column that no stage may leave out."""
    optional = tuple(n for n in schema.names if n not in _REQUIRED and n not in (col.RUN_ID, col.RUN_DATE))
    return Stage(
        name="write",
        kind="io",
        reads=tuple(n for n in schema.names if n in _REQUIRED),
        optional=optional,
        adds=("path", "size", "rows_written", "stats", "outcomes", "usage"),
        resources=Resources(num_cpus=WRITER_NUM_CPUS, num_gpus=0, batch_size=rows_per_file),
        build=partial(WriteDataFiles, table, schema, run_id, run_date, kept_only),
        details=(
            f"to {table.uri} (partition {col.RUN_DATE}={run_date})",
            "kept rows only" if kept_only else "every row, with keep and reject_reason",
            f"up to {rows_per_file:,} rows per file",
        ),
    )


_REQUIRED = (col.KEY, col.CAPTION, col.SOURCE_SHARD, col.STATUS, col.KEEP, col.REJECT_REASON, col.IMAGE_BYTES)


class WriteDataFiles:
    """The writer: write one batch as one Parquet data file and return a one-row summary.

    The summary counts every row by outcome (``kept`` or its reject reason), also
    the rows that ``kept_only`` leaves out of the file, and adds up what their requests to served
    models cost.
    """

    def __init__(self, table: Location, schema: pa.Schema, run_id: str, run_date: dt.date, kept_only: bool):
        self.table = table
        self.schema = schema
        self.run_id = run_id
        self.run_date = run_date
        self.kept_only = kept_only

    def __call__(self, batch: pa.Table) -> pa.Table:
        outcomes = Counter(
            col.KEPT if keep else reason
            for keep, reason in zip(batch.column(col.KEEP).to_pylist(), batch.column(col.REJECT_REASON).to_pylist())
        )
        usage = usage_totals(batch)
        if self.kept_only:
            batch = batch.filter(pc.field(col.KEEP))
        n = batch.num_rows
        batch = batch.append_column(col.RUN_ID, pa.array([self.run_id] * n, pa.string()))
        batch = batch.append_column(col.RUN_DATE, pa.array([self.run_date] * n, pa.date32()))
        # Columns of stages that did not run (captioning, ITM) are written as nulls.
        for column in self.schema:
            if column.name not in batch.column_names:
                batch = batch.append_column(column, pa.nulls(n, column.type))
        data = batch.select(self.schema.names).cast(self.schema)
        path, size = None, 0
        if n:
            # Delta keeps partition values in the log, not in the files.
            data = data.drop_columns([col.RUN_DATE])
            path = new_file_path(partition_dir(self.run_date), self.run_id)
            size = write_data_file(self.table, path, data)
        summary = {
            "path": path,
            "size": size,
            "rows_written": n,
            "stats": json.dumps(file_stats(data)) if n else None,
            "outcomes": json.dumps(dict(outcomes)),
            "usage": json.dumps(usage),
        }
        return pa.Table.from_pylist([summary], schema=_SUMMARY_SCHEMA)


@dataclass
class WriteSummary:
    """What the write tasks reported, added up."""

    files: list[dict] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)  # per served stage (``usage_totals``)

    def add(self, row: dict) -> None:
        """Fold in one task's summary row."""
        self.outcomes.update(json.loads(row["outcomes"]))
        add_totals(self.usage, json.loads(row["usage"]))
        if row["path"]:
            self.files.append(row)

    @property
    def rows_in(self) -> int:
        return sum(self.outcomes.values())

    @property
    def rows_written(self) -> int:
        return sum(f["rows_written"] for f in self.files)
