"""The Delta commit: one commit per run, and concurrent runs never mix their rows."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from operators import schema as col
from operators.storage import Location, StorageOptions
from pipelines.table.commit import ConcurrentRunError, commit_files, table_version
from pipelines.table.write import WriteDataFiles, WriteSummary

SCHEMA = col.output_schema()
DAY = dt.date(2026, 11, 20)


def written(uri: str, run_id: str, keys: list[str], run_date=DAY) -> WriteSummary:
    """Write one data file the way a run's Ray task does, without Ray."""
    n = len(keys)
    batch = pa.table(
        {
            col.KEY: keys,
            col.CAPTION: ["c"] * n,
            col.SOURCE_SHARD: ["s"] * n,
            col.STATUS: [col.OK] * n,
            col.KEEP: [True] * n,
            col.REJECT_REASON: pa.nulls(n, pa.string()),
        }
    )
    summary = WriteSummary()
    for row in WriteDataFiles(Location.resolve(uri, StorageOptions()), SCHEMA, run_id, run_date, kept_only=False)(
        batch
    ).to_pylist():
        summary.add(row)
    return summary


def commit(uri, run_id, summary, read_version, run_date=DAY) -> int:
    return commit_files(
        Location.resolve(uri, StorageOptions()),
        SCHEMA,
        summary,
        run_date,
        "overwrite_partition",
        metadata={"vlpipe.run_id": run_id},
        read_version=read_version,
    ).version


def keys(uri: str) -> list[str]:
    return sorted(DeltaTable(uri).to_pyarrow_table().column(col.KEY).to_pylist())


def test_columns_of_stages_that_did_not_run_are_written_as_nulls(tmp_path):
    uri = str(tmp_path / "t")
    commit(uri, "r1", written(uri, "r1", ["a", "b"]), None)
    row = DeltaTable(uri).to_pyarrow_table().to_pylist()[0]
    assert row[col.CAPTION_GENERATED] is None and row[col.ITM_SCORE] is None and row[col.KEY] in ("a", "b")


def test_two_runs_of_the_same_date_started_together_commit_once(tmp_path):
    uri = str(tmp_path / "t")
    commit(uri, "r0", written(uri, "r0", ["old"]), None)
    start = table_version(Location.resolve(uri, StorageOptions()))
    first, second = written(uri, "r1", ["a", "b"]), written(uri, "r2", ["a", "b"])

    assert commit(uri, "r1", first, start) == start + 1
    with pytest.raises(ConcurrentRunError, match="another run committed run_date=2026-11-20"):
        commit(uri, "r2", second, start)
    assert keys(uri) == ["a", "b"]  # one run's rows, no duplicates
    assert DeltaTable(uri).version() == start + 1


def test_a_concurrent_commit_to_another_date_does_not_block_the_run(tmp_path):
    uri = str(tmp_path / "t")
    commit(uri, "r0", written(uri, "r0", ["x"]), None)
    start = table_version(Location.resolve(uri, StorageOptions()))
    other_day = DAY - dt.timedelta(days=1)
    commit(uri, "r1", written(uri, "r1", ["y"], run_date=other_day), start, run_date=other_day)
    version = commit(uri, "r2", written(uri, "r2", ["z"]), start)
    assert version == start + 2 and keys(uri) == ["y", "z"]
    assert json.loads(json.dumps(DeltaTable(uri).history(1)[0]["vlpipe.run_id"])) == "r2"


def test_two_first_runs_creating_the_table_do_not_both_land(tmp_path):
    uri = str(tmp_path / "t")
    first, second = written(uri, "r1", ["a"]), written(uri, "r2", ["a"])
    assert commit(uri, "r1", first, None) == 0
    with pytest.raises(ConcurrentRunError):
        commit(uri, "r2", second, None)
    assert keys(uri) == ["a"]


def test_predicates_on_any_column_find_their_rows(tmp_path):
    """Engines prune files on the commit's statistics: they must be true bounds for every column."""
    from pipelines.table.read import delta_dataset

    uri = str(tmp_path / "t")
    long_caption = "a" * 40 + "zzz" * 30_000  # a 90 kB caption, longer than the stats prefix
    batch = pa.table(
        {
            col.KEY: ["a", "b", "c"],
            col.CAPTION: ["short", long_caption, "a" * 40 + "b"],
            col.SOURCE_SHARD: ["s"] * 3,
            col.STATUS: [col.OK, col.OK, col.DECODE_ERROR],
            col.IMAGE_WIDTH: pa.array([10, 20, None], pa.int32()),
            col.KEEP: [True, False, False],
            col.REJECT_REASON: [None, col.LOW_CLIP_SCORE, col.DECODE_ERROR],
        }
    )
    summary = WriteSummary()
    for row in WriteDataFiles(Location.resolve(uri, StorageOptions()), SCHEMA, "r1", DAY, kept_only=False)(
        batch
    ).to_pylist():
        summary.add(row)
    commit(uri, "r1", summary, None)
    data = delta_dataset(uri, StorageOptions())

    def matching(predicate) -> list[str]:
        return sorted(data.to_table(filter=predicate).column(col.KEY).to_pylist())

    assert matching(pc.field(col.STATUS) == col.OK) == ["a", "b"]
    assert matching(pc.field(col.KEEP) == True) == ["a"]  # noqa: E712 (an Arrow expression)
    assert matching(pc.field(col.RUN_ID) == "r1") == ["a", "b", "c"]
    assert matching(pc.field(col.CAPTION) == long_caption) == ["b"]
    assert matching(pc.field(col.CAPTION) > "a" * 40 + "zzz") == ["a", "b"]  # "short" sorts after it too
    assert matching(pc.field(col.IMAGE_WIDTH) >= 20) == ["b"]
    assert matching(pc.field(col.ITM_SCORE).is_null()) == ["a", "b", "c"]
    assert matching(pc.field(col.REJECT_REASON) == col.DECODE_ERROR) == ["c"]


def test_a_table_from_before_a_new_column_gains_it_and_keeps_its_other_columns(tmp_path):
    """Commits are appends with explicit removes, which keep the table's schema: new columns are added first."""
    uri = str(tmp_path / "t")
    older = pa.schema([f for f in SCHEMA if f.name not in (col.IMAGE_SHA256, col.DUPLICATE_OF)])
    location = Location.resolve(uri, StorageOptions())

    def run(run_id: str, schema: pa.Schema, run_date: dt.date) -> None:
        batch = pa.table(
            {
                col.KEY: [run_id],
                col.CAPTION: ["c"],
                col.SOURCE_SHARD: ["s"],
                col.STATUS: [col.OK],
                col.KEEP: [True],
                col.REJECT_REASON: pa.nulls(1, pa.string()),
                col.IMAGE_SHA256: [f"sha-{run_id}"],
            }
        )
        summary = WriteSummary()
        for row in WriteDataFiles(location, schema, run_id, run_date, kept_only=False)(batch).to_pylist():
            summary.add(row)
        commit_files(
            location,
            schema,
            summary,
            run_date,
            "overwrite_partition",
            metadata={"vlpipe.run_id": run_id},
            read_version=table_version(location),
        )

    run("old", older, DAY)
    run("new", SCHEMA, DAY + dt.timedelta(days=1))
    rows = {r[col.KEY]: r for r in DeltaTable(uri).to_pyarrow_table().to_pylist()}
    assert rows["old"][col.IMAGE_SHA256] is None and rows["new"][col.IMAGE_SHA256] == "sha-new"
    run("narrower", older, DAY + dt.timedelta(days=2))  # a run of an older config hides no column of the others
    assert {r[col.KEY]: r[col.IMAGE_SHA256] for r in DeltaTable(uri).to_pyarrow_table().to_pylist()} == {
        "old": None,
        "new": "sha-new",
        "narrower": None,
    }
    operations = [(h.get("vlpipe.operation"), h.get("vlpipe.run_id")) for h in DeltaTable(uri).history()][::-1]
    assert operations == [(None, "old"), ("add_columns", None), (None, "new"), (None, "narrower")]
