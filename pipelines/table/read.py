"""Reading a vlpipe table back: for downstream jobs that want vlpipe's conventions.

Nothing here is required: the table is plain Delta Lake, and DuckDB, Polars,
Spark or pandas read it directly (docs/guide/output.md#reading).
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from deltalake import DeltaTable

from operators import schema as col
from operators.storage import Location, StorageOptions


def located(where: Location | str, storage: StorageOptions) -> Location:
    """``where`` resolved, unless it already is."""
    return where if isinstance(where, Location) else Location.resolve(where, storage)


def delta_dataset(
    where: Location | str, storage: StorageOptions = StorageOptions(), *, version: int | None = None
) -> pads.Dataset:
    """A Delta table (at ``version``) as a pyarrow dataset over a native pyarrow filesystem.

    deltalake's default Python filesystem handler can make the interpreter abort at exit
    ("terminate called without an active exception", delta-rs #2184); pyarrow's own does not.
    """
    location = located(where, storage)
    table = DeltaTable(location.uri, version=version, storage_options=location.delta_options)
    return table.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(location.path, location.filesystem))


def read_output(
    uri: str,
    *,
    version: int | None = None,
    storage: StorageOptions = StorageOptions(),
    columns: list[str] | None = None,
    run_date: dt.date | None = None,
    kept_only: bool = False,
) -> pa.Table:
    """The table (at ``version``, for time travel) as a ``pyarrow.Table``.

    ``run_date`` reads one partition; ``kept_only`` only rows that passed the filter.
    Both are pushed down, so other partitions' files are never opened.
    """
    predicate = None
    if run_date is not None:
        predicate = pc.field(col.RUN_DATE) == pa.scalar(run_date, pa.date32())
    if kept_only:
        keep = pc.field(col.KEEP)
        predicate = keep if predicate is None else predicate & keep
    return delta_dataset(uri, storage, version=version).to_table(columns=columns, filter=predicate)


def read_output_dataset(uri: str, *, version: int | None = None, storage: StorageOptions = StorageOptions()):
    """The table as a lazy Ray Dataset, for training or further Ray Data jobs."""
    import ray.data

    return ray.data.read_delta(uri, version=version, storage_options=located(uri, storage).delta_options or None)
