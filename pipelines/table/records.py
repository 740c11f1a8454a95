"""The run record: one row per run, appended to a Delta table beside the output."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from operators.storage import Location, StorageOptions
from pipelines.table.read import delta_dataset, located

RUN_RECORD_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("run_date", pa.date32()),
        ("status", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("duration_s", pa.float64()),
        ("config_hash", pa.string()),
        ("config_json", pa.string()),
        ("output_uri", pa.string()),
        ("table_version", pa.int64()),
        (
            "input_shards",
            pa.list_(pa.struct([("uri", pa.string()), ("size", pa.int64()), ("mtime", pa.timestamp("us", tz="UTC"))])),
        ),
        ("failed_shards", pa.list_(pa.struct([("uri", pa.string()), ("error", pa.string())]))),
        ("rows_in", pa.int64()),
        ("rows_kept", pa.int64()),
        ("rows_rejected", pa.int64()),
        ("rows_written", pa.int64()),
        ("rows_superseded", pa.int64()),
        ("rows_resumed", pa.int64()),
        ("rejected_by_reason", pa.string()),
        ("rows_per_second", pa.float64()),
        ("models_json", pa.string()),
        ("endpoints_json", pa.string()),
        ("versions_json", pa.string()),
        ("error", pa.string()),
    ]
)


@dataclass
class RunRecord:
    """What one run did; the same numbers the CLI prints."""

    run_id: str
    run_date: dt.date
    status: str
    started_at: dt.datetime
    finished_at: dt.datetime
    config_hash: str
    config_json: str
    output_uri: str
    table_version: int | None = None
    input_shards: list[dict] = field(default_factory=list)
    failed_shards: list[dict] = field(default_factory=list)
    rows_in: int = 0
    rows_kept: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rows_written: int = 0
    rows_superseded: int = 0  # earlier rows of the run's shards its commit removed from other dates
    rows_resumed: int = 0  # rows an earlier attempt of the run had staged, which this one took over
    models: dict[str, dict] = field(default_factory=dict)
    # Per served stage (caption, ask): requests, retries, tokens, requests/s, cost (operators.endpoint.usage).
    endpoints: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def duration_s(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def to_row(self) -> dict:
        """The record as one row of ``RUN_RECORD_SCHEMA``."""
        row = asdict(self)
        row.update(
            duration_s=self.duration_s,
            rows_rejected=self.rows_rejected,
            rejected_by_reason=json.dumps(self.rejected_by_reason, sort_keys=True),
            rows_per_second=self.rows_in / self.duration_s if self.duration_s > 0 else None,
            models_json=json.dumps(row.pop("models"), sort_keys=True),
            endpoints_json=json.dumps(row.pop("endpoints"), sort_keys=True),
            versions_json=json.dumps(row.pop("versions"), sort_keys=True),
        )
        return row


def append_run_record(where: Location | str, storage: StorageOptions, record: RunRecord) -> None:
    """Append one run to the run-record table (created on first use)."""
    location = located(where, storage)
    table = pa.Table.from_pylist([record.to_row()], schema=RUN_RECORD_SCHEMA)
    # "merge": a table written by an older vlpipe gains the columns added since (its rows read them as null).
    write_deltalake(location.uri, table, mode="append", schema_mode="merge", storage_options=location.delta_options)


def read_run_records(where: Location | str, storage: StorageOptions = StorageOptions()) -> pa.Table:
    """All run records, oldest first; empty if no run has been recorded yet."""
    location = located(where, storage)
    if not DeltaTable.is_deltatable(location.uri, storage_options=location.delta_options):
        return RUN_RECORD_SCHEMA.empty_table()
    return _with_every_column(delta_dataset(location).to_table()).sort_by("started_at")


def _with_every_column(records: pa.Table) -> pa.Table:
    """Records of a table no newer vlpipe has appended to yet lack the newer columns: null there."""
    for column in RUN_RECORD_SCHEMA:
        if column.name not in records.column_names:
            records = records.append_column(column, pa.nulls(records.num_rows, column.type))
    return records


def format_runs(records: pa.Table, *, limit: int = 10) -> str:
    """The latest runs as a fixed-width table, newest first."""
    rows = records.to_pylist()[-limit:][::-1]
    if not rows:
        return "no runs recorded yet"
    header = (
        "run_id",
        "date",
        "status",
        "shards",
        "failed",
        "rows_in",
        "kept",
        "rejected",
        "superseded",
        "resumed",
        "seconds",
        "rows/s",
        "version",
    )
    lines = [
        (
            r["run_id"],
            str(r["run_date"]),
            r["status"],
            str(len(r["input_shards"] or [])),
            str(len(r["failed_shards"] or [])),
            str(r["rows_in"]),
            str(r["rows_kept"]),
            str(r["rows_rejected"]),
            "-" if r["rows_superseded"] is None else str(r["rows_superseded"]),
            str(r["rows_resumed"]) if r["rows_resumed"] else "-",
            f"{r['duration_s']:.1f}",
            f"{r['rows_per_second']:.1f}" if r["rows_per_second"] else "-",
            "-" if r["table_version"] is None else str(r["table_version"]),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *lines])
