"""A shard processed again supersedes its earlier rows in other dates, in the commit that adds the new ones."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from operators import schema as col
from operators.storage import Location, StorageOptions
from pipelines import hooks
from pipelines.input.shards import Shard
from pipelines.table.commit import commit_files
from pipelines.table.read import read_output
from pipelines.table.records import RUN_RECORD_SCHEMA
from pipelines.table.supersede import Supersede
from pipelines.table.write import WriteDataFiles, WriteSummary

SCHEMA = col.output_schema()
D0, D1, D2 = dt.date(2026, 11, 19), dt.date(2026, 11, 20), dt.date(2026, 11, 21)
# Longer than the 32 characters of most string statistics: shard URIs are bounded by their whole value.
PREFIX = "s3://crawl-bucket/laion-400m/2026-11/shards/"
A, B, C = PREFIX + "a.parquet", PREFIX + "b.parquet", PREFIX + "c.parquet"


def write(uri: str, run_id: str, day: dt.date, *files: list[tuple[str, str]]) -> WriteSummary:
    """One data file per list of (key, shard) rows, written the way a run's task writes it."""
    summary = WriteSummary()
    for rows in files:
        n = len(rows)
        batch = pa.table(
            {
                col.KEY: [k for k, _ in rows],
                col.CAPTION: [f"caption of {k}" for k, _ in rows],
                col.SOURCE_SHARD: [s for _, s in rows],
                col.STATUS: [col.OK] * n,
                col.KEEP: [True] * n,
                col.REJECT_REASON: pa.nulls(n, pa.string()),
                col.CLIP_SCORE: pa.array([0.25] * n, pa.float32()),
            }
        )
        task = WriteDataFiles(Location.resolve(uri, StorageOptions()), SCHEMA, run_id, day, kept_only=False)
        for row in task(batch).to_pylist():
            summary.add(row)
    return summary


def commit(
    uri: str,
    run_id: str,
    day: dt.date,
    summary: WriteSummary,
    supersede: Supersede | None = None,
    read_version: int | None = None,
):
    location = Location.resolve(uri, StorageOptions())
    if read_version is None and DeltaTable.is_deltatable(uri):
        read_version = DeltaTable(uri).version()
    return commit_files(
        location,
        SCHEMA,
        summary,
        day,
        "overwrite_partition",
        metadata={"vlpipe.run_id": run_id},
        read_version=read_version,
        supersede=supersede,
    )


def rows_of(uri: str, version: int | None = None, **where) -> list[dict]:
    table = read_output(uri, version=version)
    for name, value in where.items():
        table = table.filter(pc.field(name) == value)
    return sorted(table.to_pylist(), key=lambda r: r[col.KEY])


def files_of(uri: str, day: dt.date) -> list[str]:
    actions = pa.table(DeltaTable(uri).get_add_actions(flatten=True)).to_pylist()
    return sorted(a["path"] for a in actions if str(a[f"partition.{col.RUN_DATE}"]) == day.isoformat())


def supersede(*shards: str, dates=(D1,)) -> Supersede:
    return Supersede(frozenset(shards), frozenset(d.isoformat() for d in dates))


def test_a_file_mixing_shards_is_rewritten_and_keeps_the_other_shards_rows_exactly(tmp_path):
    uri = str(tmp_path / "t")
    commit(uri, "r1", D1, write(uri, "r1", D1, [("a1", A), ("b1", B), ("a2", A), ("b2", B)], [("a3", A)]))
    before = DeltaTable(uri).version()
    b_rows = rows_of(uri, source_shard=B)

    done = commit(uri, "r2", D2, write(uri, "r2", D2, [("a1", A), ("a2", A), ("a3", A)]), supersede(A))

    assert (done.rows_superseded, done.files_removed, done.files_rewritten) == (3, 1, 1)
    assert rows_of(uri, source_shard=B) == b_rows  # every column of the kept rows, run id and date included
    assert [(r[col.KEY], str(r[col.RUN_DATE])) for r in rows_of(uri, source_shard=A)] == [
        ("a1", "2026-11-21"),
        ("a2", "2026-11-21"),
        ("a3", "2026-11-21"),
    ]
    (rewritten,) = files_of(uri, D1)
    assert rewritten.startswith("run_date=2026-11-20/part-r2-")  # next to the old files, named by the run that wrote it
    meta = pq.ParquetFile(tmp_path / "t" / rewritten).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD" and meta.num_rows == 2
    # The rewrite's statistics are true: a predicate on any column still finds its rows.
    assert [r[col.KEY] for r in rows_of(uri, caption="caption of b2")] == ["b2"]
    assert len(rows_of(uri, before)) == 5  # the old rows, by time travel
    assert DeltaTable(uri).version() == before + 1  # one commit


def test_only_the_files_of_the_recorded_dates_that_may_hold_the_shard_are_read(tmp_path):
    uri = str(tmp_path / "t")
    commit(uri, "r0", D0, write(uri, "r0", D0, [("old-a", A)]))
    commit(uri, "r1", D1, write(uri, "r1", D1, [("a1", A)], [("b1", B)], [("c1", C)], [("a2", A), ("c2", C)]))

    done = commit(uri, "r2", D2, write(uri, "r2", D2, [("a1", A), ("a2", A)]), supersede(A))

    # b1's and c1's files are ruled out by the log's source_shard bounds; D0 processed no shard of this run
    # by the records, so its file is never opened.
    assert done.files_read == 2 and (done.files_removed, done.files_rewritten) == (1, 1)
    assert sorted(r[col.KEY] for r in rows_of(uri)) == ["a1", "a2", "b1", "c1", "c2", "old-a"]


def test_rerunning_the_superseding_date_changes_nothing_else(tmp_path):
    uri = str(tmp_path / "t")
    commit(uri, "r1", D1, write(uri, "r1", D1, [("a1", A), ("b1", B)]))
    commit(uri, "r2", D2, write(uri, "r2", D2, [("a1", A)]), supersede(A))
    day1 = files_of(uri, D1)

    again = commit(uri, "r3", D2, write(uri, "r3", D2, [("a1", A)]), supersede(A))

    assert again.rows_superseded == 0 and files_of(uri, D1) == day1
    assert [(r[col.KEY], r[col.RUN_ID]) for r in rows_of(uri)] == [("a1", "r3"), ("b1", "r1")]


def test_a_file_compacted_away_before_the_commit_is_planned_again(tmp_path):
    from pipelines.table.compact import compact

    uri = str(tmp_path / "t")
    commit(uri, "r1", D1, write(uri, "r1", D1, [("a1", A)], [("b1", B)]))
    start = DeltaTable(uri).version()
    raced = []

    def compacted_meanwhile(point: str) -> None:
        # Between planning (remove a1's file) and the transaction, a compaction replaces that file.
        if point == "commit:planned" and not raced:
            raced.append(compact(Location.resolve(uri, StorageOptions()), [D1]))

    hooks.install(compacted_meanwhile)
    try:
        done = commit(uri, "r2", D2, write(uri, "r2", D2, [("a1", A)]), supersede(A), read_version=start)
    finally:
        hooks.install(None)
    assert raced[0][0].files_removed == 2
    assert (done.rows_superseded, done.files_rewritten) == (1, 1)  # the compacted file, found again and rewritten
    assert [(r[col.KEY], r[col.RUN_ID]) for r in rows_of(uri)] == [("a1", "r2"), ("b1", "r1")]


def test_a_run_that_dies_before_the_transaction_leaves_its_rewrites_invisible(tmp_path):
    uri = str(tmp_path / "t")
    commit(uri, "r1", D1, write(uri, "r1", D1, [("a1", A), ("b1", B)]))
    before = DeltaTable(uri).version()

    def dies(point: str) -> None:
        if point == "commit:planned":
            raise KeyboardInterrupt  # SIGINT between the rewrite and the commit

    hooks.install(dies)
    try:
        with pytest.raises(KeyboardInterrupt):
            commit(uri, "r2", D2, write(uri, "r2", D2, [("a1", A)]), supersede(A))
    finally:
        hooks.install(None)
    orphans = list((tmp_path / "t" / "run_date=2026-11-20").glob("part-r2-*.parquet"))
    assert len(orphans) == 1  # the rewrite was written, like any file of a run that dies before its commit
    assert DeltaTable(uri).version() == before and [r[col.KEY] for r in rows_of(uri)] == ["a1", "b1"]


def test_a_shard_that_failed_to_read_supersedes_nothing(tmp_path):
    uri = str(tmp_path / "t")
    commit(uri, "r1", D1, write(uri, "r1", D1, [("a1", A), ("b1", B)]))
    done = commit(uri, "r2", D2, write(uri, "r2", D2, [("a1", A)]), supersede())
    assert done.rows_superseded == done.files_read == 0 and len(rows_of(uri)) == 3


def shard(uri: str) -> Shard:
    return Shard(uri, uri.removeprefix("s3://"), 1, None)


def test_the_records_name_the_other_dates_that_processed_a_shard():
    rows = [
        {"run_date": day, "status": status, "input_shards": [{"uri": uri, "size": 1, "mtime": None}]}
        for day, status, uri in ((D0, "succeeded", A), (D1, "failed", A), (D1, "succeeded", B), (D2, "partial", A))
    ]
    records = pa.Table.from_pylist(rows, schema=RUN_RECORD_SCHEMA)
    found = Supersede.from_records([shard(A)], records, D2)
    # A failed run counts too: its commit may have landed before its record said otherwise.
    assert found == Supersede(frozenset([A]), frozenset([D0.isoformat(), D1.isoformat()]))
