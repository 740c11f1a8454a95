"""The run-record table: records written by an older vlpipe stay readable and appendable."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
from deltalake import write_deltalake

from operators.storage import StorageOptions
from pipelines.table.records import RUN_RECORD_SCHEMA, RunRecord, append_run_record, format_runs, read_run_records

T0 = dt.datetime(2026, 11, 20, 3, tzinfo=dt.timezone.utc)


def record(run_id: str, started: dt.datetime, **fields) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        run_date=started.date(),
        status="succeeded",
        started_at=started,
        finished_at=started + dt.timedelta(seconds=10),
        config_hash="h",
        config_json="{}",
        output_uri="/out/t",
        table_version=0,
        rows_in=40,
        rows_kept=40,
        **fields,
    )


def test_a_table_from_before_rows_superseded_is_read_and_appended_to(tmp_path):
    uri = str(tmp_path / "_vlpipe_runs")
    older = pa.schema([f for f in RUN_RECORD_SCHEMA if f.name != "rows_superseded"])
    write_deltalake(uri, pa.Table.from_pylist([record("old", T0).to_row()], schema=older))

    assert read_run_records(uri).column("rows_superseded").to_pylist() == [None]
    append_run_record(uri, StorageOptions(), record("new", T0 + dt.timedelta(days=1), rows_superseded=40))

    runs = read_run_records(uri)
    assert runs.column("run_id").to_pylist() == ["old", "new"]
    assert runs.column("rows_superseded").to_pylist() == [None, 40]
    header, new, old = format_runs(runs).splitlines()
    assert header.split()[8] == "superseded" and new.split()[8] == "40" and old.split()[8] == "-"
