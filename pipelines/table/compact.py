"""``vlpipe compact``: rewrite a partition's small data files into large ones, in one commit.

Nightly runs in ``append`` mode and busy dates leave many small files; engines
then open more files than they need. Compaction is Delta's ``optimize``: one
atomic commit that removes the small files and adds the rewritten ones, so a
reader sees either the old files or the new, never both; earlier versions stay
readable by time travel until ``VACUUM``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, WriterProperties

from operators import schema as col
from operators.storage import Location

DEFAULT_TARGET_BYTES = 256 << 20


@dataclass(frozen=True)
class Compaction:
    """What compacting one partition did."""

    run_date: dt.date
    files_removed: int
    files_added: int
    version: int

    def __str__(self) -> str:
        if not self.files_removed:
            return f"{col.RUN_DATE}={self.run_date}: nothing to compact"
        return (
            f"{col.RUN_DATE}={self.run_date}: {self.files_removed} file(s) -> {self.files_added} "
            f"(table version {self.version})"
        )


def compact(
    table: Location, run_dates: list[dt.date] | None = None, target_bytes: int = DEFAULT_TARGET_BYTES
) -> list[Compaction]:
    """Compact each given date's partition (every partition by default), one commit per partition."""
    delta = DeltaTable(table.uri, storage_options=table.delta_options)
    dates = run_dates or partition_dates(delta)
    return [_compact_one(delta, day, target_bytes) for day in dates]


def partition_dates(delta: DeltaTable) -> list[dt.date]:
    actions = pa.table(delta.get_add_actions(flatten=True))
    values = actions.column(f"partition.{col.RUN_DATE}").to_pylist()
    return sorted({v if isinstance(v, dt.date) else dt.date.fromisoformat(str(v)) for v in values})


def _compact_one(delta: DeltaTable, day: dt.date, target_bytes: int) -> Compaction:
    metrics = delta.optimize.compact(
        partition_filters=[(col.RUN_DATE, "=", day.isoformat())],
        target_size=target_bytes,
        writer_properties=WriterProperties(compression="ZSTD"),
        commit_properties=CommitProperties(
            custom_metadata={"vlpipe.operation": "compact", "vlpipe.run_date": day.isoformat()}
        ),
    )
    if isinstance(metrics, str):
        metrics = json.loads(metrics)
    delta.update_incremental()
    return Compaction(
        day, int(metrics.get("numFilesRemoved", 0)), int(metrics.get("numFilesAdded", 0)), delta.version()
    )
