"""One Parquet data file of the output table: where it goes, how it is written, its Delta statistics.

The run's write tasks and the commit's rewrites (``pipelines.table.supersede``) write
files the same way, so every file of the table has the same compression and
statistics whoever wrote it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable

from operators import schema as col
from operators.storage import Location

_STATS_PREFIX = 32
# A shard URI is short next to a 100 kB caption: with its whole value as bounds, the log tells
# which files can hold a shard's rows without opening them (pipelines.table.supersede).
_PREFIX_OF = {col.SOURCE_SHARD: 2048}


def new_file_path(partition_dir: str, run_id: str) -> str:
    """A fresh data file's path relative to the table root; the run id names the run that wrote it."""
    return f"{partition_dir}/part-{run_id}-{uuid.uuid4().hex}.parquet"


def partition_dir(run_date: dt.date) -> str:
    return f"{col.RUN_DATE}={run_date.isoformat()}"


def remove_run_files(table: Location, run_date: dt.date, run_id: str) -> int:
    """Remove the data files ``run_id`` wrote into its partition: only for a run that never committed
    (a resumed run writes its output again). Returns how many there were."""
    fs, directory = table.filesystem, f"{table.path.rstrip('/')}/{partition_dir(run_date)}"
    prefix = f"part-{run_id}-"
    found = [
        e.path
        for e in fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
        if e.is_file and e.base_name.startswith(prefix)
    ]
    for path in found:
        fs.delete_file(path)
    return len(found)


def write_data_file(table: Location, path: str, data: pa.Table) -> int:
    """Write ``data`` (without the partition column) at ``path`` under the table root; returns its size."""
    fs, root = table.filesystem, table.path.rstrip("/")
    fs.create_dir(f"{root}/{path.rsplit('/', 1)[0]}", recursive=True)
    pq.write_table(data, f"{root}/{path}", filesystem=fs, compression="zstd")
    return fs.get_file_info(f"{root}/{path}").size


def read_data_file(table: Location, path: str, columns: list[str] | None = None) -> pa.Table:
    """One data file as written: no partition column inferred from its directory."""
    with table.filesystem.open_input_file(f"{table.path.rstrip('/')}/{path}") as f:
        return pq.ParquetFile(f).read(columns=columns)


@dataclass(frozen=True)
class DataFile:
    """One data file of a table version, as its add action describes it."""

    path: str
    size: int
    partition: str  # the run_date partition value, ISO format
    rows: int | None
    # Bounds of source_shard from the log's statistics; None where the writer recorded none.
    low_shard: str | None = None
    high_shard: str | None = None


@dataclass(frozen=True)
class NewFile:
    """A data file written but not yet committed: what its add action needs."""

    path: str
    size: int
    stats: str


def table_files(delta: DeltaTable) -> list[DataFile]:
    """Every data file of the table version ``delta`` holds."""
    actions = pa.table(delta.get_add_actions(flatten=True))

    def column(name: str) -> list:
        return actions.column(name).to_pylist() if name in actions.column_names else [None] * actions.num_rows

    partitions = actions.column(f"partition.{col.RUN_DATE}").cast(pa.string()).to_pylist()
    return [
        DataFile(path, size, partition, rows, low, high)
        for path, size, partition, rows, low, high in zip(
            column("path"),
            column("size_bytes"),
            partitions,
            column("num_records"),
            column(f"min.{col.SOURCE_SHARD}"),
            column(f"max.{col.SOURCE_SHARD}"),
        )
    ]


def file_stats(data: pa.Table) -> dict:
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
                low, high = _string_bounds(low, high, _PREFIX_OF.get(name, _STATS_PREFIX))
            stats["minValues"][name] = _json_value(low)
            stats["maxValues"][name] = _json_value(high)
    return stats


def _has_stats(type_: pa.DataType) -> bool:
    return (
        pa.types.is_string(type_)
        or pa.types.is_large_string(type_)
        or pa.types.is_boolean(type_)
        or pa.types.is_integer(type_)
        or pa.types.is_floating(type_)
        or pa.types.is_date(type_)
        or pa.types.is_timestamp(type_)
    )


def _string_bounds(low: str, high: str, prefix: int) -> tuple[str, str]:
    """Prefix bounds keep the log small with 100 kB captions and stay true bounds.

    A prefix is <= the string; a prefix followed by U+10FFFF (the largest code point, and the
    largest UTF-8 byte sequence) is >= every string that starts with that prefix.
    """
    low = low[:prefix]
    if len(high) > prefix:
        high = high[:prefix] + "\U0010ffff"
    return low, high


def _json_value(value):
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return value
