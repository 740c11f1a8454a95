"""Which of the table's files a dedup method reads as history, without Ray."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
from deltalake import write_deltalake

from operators import schema as col
from operators.storage import Location, StorageOptions
from pipelines.dedup.history import history_files

D1, D2, D3 = dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)


def rows(day: dt.date, phash: list | None) -> pa.Table:
    columns = {col.KEY: ["a", "b"], col.RUN_DATE: pa.array([day, day], pa.date32())}
    if phash is not None:
        columns[col.IMAGE_PHASH] = pa.array(phash, pa.int64())
    return pa.table(columns)


def test_history_is_the_other_dates_files_that_hold_the_method_column(tmp_path):
    uri = str(tmp_path / "table")
    write_deltalake(uri, rows(D1, None), partition_by=[col.RUN_DATE])  # written before dedup.near was on
    write_deltalake(uri, rows(D2, [5, None]), mode="append", partition_by=[col.RUN_DATE], schema_mode="merge")
    write_deltalake(uri, rows(D2, [None, None]), mode="append", partition_by=[col.RUN_DATE])  # near was off
    write_deltalake(uri, rows(D3, [7, 8]), mode="append", partition_by=[col.RUN_DATE])
    table = Location.resolve(uri, StorageOptions())

    assert sorted(day for _, day in history_files(table, D3)) == [D1, D2, D2]  # not the run's own date
    assert [day for _, day in history_files(table, D3, col.IMAGE_PHASH)] == [D2]  # the file with a hash
    assert sorted(day for _, day in history_files(table, D1, col.IMAGE_PHASH)) == [D2, D3]
