"""Write data files from Ray tasks, then commit them to Delta Lake in one transaction.

Data files land under the table directory but are invisible until the commit
adds them to the log, so a run that dies before committing leaves the table as
it was (the orphans are removed by ``VACUUM``). Ray's own ``write_delta`` cannot
replace a single partition atomically, which idempotent re-runs need.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from functools import partial
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Schema
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.transaction import AddAction, create_table_with_add_actions

from operators import schema as col
from operators.resources import Resources
from operators.stage import Stage
from operators.storage import Location
from pipelines.errors import ConcurrentRunError

_STATS_PREFIX = 32
_SUMMARY_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("rows_written", pa.int64()),
        ("stats", pa.string()),
        ("outcomes", pa.string()),
    ]
)


# Writing Parquet is mostly waiting on storage: no CPU slot (see pipelines.execute.IO_RESOURCES).
WRITER_NUM_CPUS = 0


def write_stage(table: Location, schema: pa.Schema, run_id: str, run_date: dt.date, *, kept_only: bool,
                rows_per_file: int) -> Stage:
    """The writer's contract: it reads every output column that no stage may leave out."""
    optional = tuple(n for n in schema.names if n not in _REQUIRED and n not in (col.RUN_ID, col.RUN_DATE))
    return Stage(
        name="write", kind="task", reads=tuple(n for n in schema.names if n in _REQUIRED), optional=optional,
        adds=("path", "size", "rows_written", "stats", "outcomes"),
        resources=Resources(num_cpus=WRITER_NUM_CPUS, num_gpus=0, batch_size=rows_per_file),
        build=partial(WriteDataFiles, table, schema, run_id, run_date, kept_only),
        details=(f"to {table.uri} (partition {col.RUN_DATE}={run_date})",
                 "kept rows only" if kept_only else "every row, with keep and reject_reason",
                 f"up to {rows_per_file:,} rows per file"),
    )


_REQUIRED = (col.KEY, col.CAPTION, col.SOURCE_SHARD, col.STATUS, col.KEEP, col.REJECT_REASON, col.IMAGE_BYTES)


class WriteDataFiles:
    """Ray task: write one batch as one Parquet data file and return a one-row summary.

    The summary counts every row by outcome (``kept`` or its reject reason), also
    the rows that ``kept_only`` leaves out of the file.
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
            path = f"{col.RUN_DATE}={self.run_date.isoformat()}/part-{self.run_id}-{uuid.uuid4().hex}.parquet"
            fs, root = self.table.filesystem, self.table.path.rstrip("/")
            fs.create_dir(f"{root}/{path.rsplit('/', 1)[0]}", recursive=True)
            pq.write_table(data, f"{root}/{path}", filesystem=fs, compression="zstd")
            size = fs.get_file_info(f"{root}/{path}").size
        summary = {
            "path": path, "size": size, "rows_written": n,
            "stats": json.dumps(_file_stats(data)) if n else None,
            "outcomes": json.dumps(dict(outcomes)),
        }
        return pa.Table.from_pylist([summary], schema=_SUMMARY_SCHEMA)


@dataclass
class WriteSummary:
    """What the write tasks reported, added up."""

    files: list[dict] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)

    def add(self, row: dict) -> None:
        """Fold in one task's summary row."""
        self.outcomes.update(json.loads(row["outcomes"]))
        if row["path"]:
            self.files.append(row)

    @property
    def rows_in(self) -> int:
        return sum(self.outcomes.values())

    @property
    def rows_written(self) -> int:
        return sum(f["rows_written"] for f in self.files)


def table_version(table: Location) -> int | None:
    """The table's current version, or None before its first commit."""
    if not DeltaTable.is_deltatable(table.uri, storage_options=table.delta_options):
        return None
    return DeltaTable(table.uri, storage_options=table.delta_options).version()


def commit_files(
    table: Location, schema: pa.Schema, summary: WriteSummary, run_date: dt.date,
    mode: str, metadata: dict[str, str], read_version: int | None,
) -> int:
    """Add the written files to the table in one commit; return the new table version.

    ``overwrite_partition`` replaces the run date's partition (an idempotent re-run);
    ``append`` adds to it. ``read_version`` is the table version the run started
    from: if another run changed this date's partition since, the commit is refused
    (``ConcurrentRunError``) rather than mixing two runs' rows. Commits to other
    dates in the meantime are fine; the commit is retried on top of them.
    """
    table_uri, options = table.uri, table.delta_options
    now_ms = int(time.time() * 1000)
    partition = {col.RUN_DATE: run_date.isoformat()}
    actions = [AddAction(f["path"], f["size"], partition, now_ms, True, f["stats"]) for f in summary.files]
    # No blind retries inside delta-rs: it would rebase an overwrite onto a concurrent one.
    properties = CommitProperties(custom_metadata=metadata, max_commit_retries=0)
    started_with = _partition_files(table_uri, options, run_date, read_version)
    run_id = metadata["vlpipe.run_id"]
    lost: OSError | None = None
    for _ in range(_COMMIT_ATTEMPTS):
        if lost is not None:
            # The commit request or its answer was lost (reset, timeout): delta-rs does not retry a
            # conditional put, so look whether it landed before trying again.
            landed = _committed_version(table_uri, options, run_id)
            if landed is not None:
                return landed
        if not DeltaTable.is_deltatable(table_uri, storage_options=options):
            try:
                create_table_with_add_actions(
                    table_uri, Schema.from_arrow(schema), actions, mode="append", partition_by=[col.RUN_DATE],
                    storage_options=options, commit_properties=properties,
                )
                return 0
            except OSError as err:
                lost = err
                continue
            except DeltaError:
                if not DeltaTable.is_deltatable(table_uri, storage_options=options):
                    raise
                continue  # another run created the table first: check it like any concurrent commit
        delta = DeltaTable(table_uri, storage_options=options)
        if mode == "overwrite_partition" and _partition_files(table_uri, options, run_date, delta.version()) != started_with:
            raise ConcurrentRunError(
                f"another run committed run_date={run_date} to {table_uri} while this run was working "
                f"(table version {read_version} -> {delta.version()}); this run's files were not committed"
            )
        try:
            delta.create_write_transaction(
                actions, mode="overwrite" if mode == "overwrite_partition" else "append", schema=schema,
                partition_by=[col.RUN_DATE],
                partition_filters=[(col.RUN_DATE, "=", run_date.isoformat())] if mode == "overwrite_partition" else None,
                commit_properties=properties,
            )
        except CommitFailedError:
            continue  # someone committed first; look again at what they changed
        except OSError as err:
            lost = err
            continue
        return _version_of(table_uri, options, run_id)
    if lost is not None:
        raise lost
    raise ConcurrentRunError(f"could not commit to {table_uri}: {_COMMIT_ATTEMPTS} attempts lost to concurrent commits")


_COMMIT_ATTEMPTS = 20


def _partition_files(table_uri: str, options: dict, run_date: dt.date, version: int | None) -> set[str]:
    if version is None:
        return set()
    table = DeltaTable(table_uri, storage_options=options, version=version)
    actions = pa.table(table.get_add_actions(flatten=True))
    values = actions.column(f"partition.{col.RUN_DATE}").cast(pa.string()).to_pylist()
    return {path for path, value in zip(actions.column("path").to_pylist(), values) if value == run_date.isoformat()}


def _version_of(table_uri: str, options: dict, run_id: str) -> int:
    """The version this run's commit got (others may have committed right after it)."""
    version = _committed_version(table_uri, options, run_id)
    if version is None:
        raise RuntimeError(f"commit of run {run_id} not found in the history of {table_uri}")
    return version


def _committed_version(table_uri: str, options: dict, run_id: str) -> int | None:
    if not DeltaTable.is_deltatable(table_uri, storage_options=options):
        return None
    for entry in DeltaTable(table_uri, storage_options=options).history(50):
        if entry.get("vlpipe.run_id") == run_id:
            return int(entry["version"])
    return None


def _file_stats(data: pa.Table) -> dict:
    """Delta file statistics for every flat column, so engines can skip files on any predicate.

    Statistics must cover every column: for a column without them, deltalake's pyarrow
    dataset states ``col >= null`` as the file's guarantee, and a filter on that column
    then skips every file (``status == 'ok'`` returned 0 rows).
    """
    stats: dict = {"numRecords": data.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    for name, column in zip(data.column_names, data.columns):
        if not _has_stats(column.type):
            continue
        stats["nullCount"][name] = column.null_count
        if column.null_count < len(column):
            bounds = pc.min_max(column)
            low, high = bounds["min"].as_py(), bounds["max"].as_py()
            if isinstance(low, str):
                low, high = _string_bounds(low, high)
            stats["minValues"][name] = _json_value(low)
            stats["maxValues"][name] = _json_value(high)
    return stats


def _has_stats(type_: pa.DataType) -> bool:
    return (pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_boolean(type_)
            or pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_date(type_)
            or pa.types.is_timestamp(type_))


def _string_bounds(low: str, high: str) -> tuple[str, str]:
    """Prefix bounds keep the log small with 100 kB captions and stay true bounds.

    A prefix is <= the string; a prefix followed by U+10FFFF (the largest code point, and the
    largest UTF-8 byte sequence) is >= every string that starts with that prefix.
    """
    low = low[:_STATS_PREFIX]
    if len(high) > _STATS_PREFIX:
        high = high[:_STATS_PREFIX] + "\U0010FFFF"
    return low, high


def _json_value(value):
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return value
