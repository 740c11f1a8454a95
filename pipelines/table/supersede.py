"""A shard processed again supersedes the rows earlier commits took from it into other dates.

A source shard's rows in the table's current version come from its newest
processing, whatever run_date that run had: when a shard is rewritten in place
and tonight's run processes it again, the rows an earlier date took from it are
removed in the commit that adds tonight's. Files whose rows all come from
superseded shards are removed; a file that also holds other shards' rows is
rewritten without the superseded ones (a new file in the same partition, added
in that commit). The old files stay in the log's history, readable by time
travel until ``VACUUM``.

The run's own date is not handled here: ``output.mode`` decides what happens to it.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.storage import Location
from pipelines.input.shards import Shard
from pipelines.table.datafile import DataFile, NewFile, file_stats, new_file_path, read_data_file, write_data_file

log = logging.getLogger(__name__)

# Reading one column of a file is one or two small ranged GETs: a wide pool hides object-store latency.
_READ_THREADS = 16


@dataclass(frozen=True)
class Supersede:
    """The shards a run processed (URIs, as ``source_shard`` spells them) and the other dates that processed them."""

    shards: frozenset[str]
    run_dates: frozenset[str]  # partition values (ISO dates) whose files may hold rows of those shards

    @classmethod
    def from_records(cls, processed: list[Shard], records: pa.Table, run_date: dt.date) -> Supersede:
        """Only partitions of runs that listed one of the shards can hold its rows; the records say which."""
        uris = frozenset(s.uri for s in processed)
        dates = set()
        # Every status counts: a run recorded as failed may still have committed (its record failed
        # after the commit), and looking into one partition too many only costs a column read.
        for run in records.select(["run_date", "input_shards"]).to_pylist():
            if run["run_date"] != run_date and any(s["uri"] in uris for s in run["input_shards"] or []):
                dates.add(run["run_date"].isoformat())
        return cls(uris, frozenset(dates))


@dataclass(frozen=True)
class Change:
    """Superseding in one data file: it is removed, and ``rewrite`` (its other shards' rows) takes its place."""

    file: DataFile
    rows_removed: int
    rewrite: NewFile | None


class Superseder:
    """Finds, for one commit attempt's table version, the files that hold rows of the superseded shards.

    A data file never changes once written, so what was found for a path holds in any
    later version: a commit attempt that lost a race asks again and only the files that
    are new to it are read. ``files_read`` counts the files whose column was read.
    """

    def __init__(self, table: Location, supersede: Supersede, run_id: str):
        self.table = table
        self.supersede = supersede
        self.run_id = run_id
        self._shards = sorted(supersede.shards)
        self._value_set = pa.array(self._shards, pa.string())
        self._found: dict[str, Change | None] = {}
        self.files_read = 0

    def changes(self, files: list[DataFile], own_partition: str, known: set[str]) -> list[Change]:
        """What to remove and add for the files of one table version.

        ``known`` are the paths of the version the run started from: a file added since
        (by a concurrent run) is looked into whatever its date, as no record may name it yet.
        """
        if not self._shards:
            return []
        wanted = [
            f
            for f in files
            if f.partition != own_partition
            and f.path not in self._found
            and (f.partition in self.supersede.run_dates or f.path not in known)
            and self._may_hold(f)
        ]
        with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(wanted)))) as pool:
            hits = list(pool.map(self._hits, wanted))
        self.files_read += len(wanted)
        for file, found in zip(wanted, hits):
            self._found[file.path] = self._change(file, found) if found else None
        return [c for f in files if (c := self._found.get(f.path)) is not None]

    def _may_hold(self, file: DataFile) -> bool:
        """The log's source_shard bounds rule most files out without reading them (they are true bounds)."""
        if file.low_shard is None or file.high_shard is None:
            return file.rows != 0
        first = bisect.bisect_left(self._shards, file.low_shard)
        return first < len(self._shards) and self._shards[first] <= file.high_shard

    def _superseded(self, column: pa.ChunkedArray) -> pa.ChunkedArray:
        value_set = self._value_set if column.type == pa.string() else self._value_set.cast(column.type)
        return pc.fill_null(pc.is_in(column, value_set=value_set), False)

    def _hits(self, file: DataFile) -> int:
        """How many of the file's rows come from a superseded shard: only that column is read."""
        column = read_data_file(self.table, file.path, [col.SOURCE_SHARD]).column(col.SOURCE_SHARD)
        return pc.sum(self._superseded(column).cast(pa.int64())).as_py() or 0

    def _change(self, file: DataFile, hits: int) -> Change:
        if file.rows is not None and hits >= file.rows:
            return Change(file, hits, None)
        # One file at a time, at most output.rows_per_file rows: the driver never holds a partition.
        data = read_data_file(self.table, file.path)
        if hits >= data.num_rows:
            return Change(file, hits, None)
        kept = data.filter(pc.invert(self._superseded(data.column(col.SOURCE_SHARD))))
        path = new_file_path(file.path.rpartition("/")[0] or f"{col.RUN_DATE}={file.partition}", self.run_id)
        size = write_data_file(self.table, path, kept)
        log.debug("rewrote %s without %d superseded row(s): %s", file.path, hits, path)
        return Change(file, hits, NewFile(path, size, json.dumps(file_stats(kept))))
