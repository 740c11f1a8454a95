"""Nightly incremental runs: only new or changed shards, idempotent dates, safe concurrency."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from jobs.demo import write_sample_shards
from operators import schema as col
from operators.storage import Location, StorageOptions
from pipelines.config import validate_config
from pipelines.input.nightly import plan_nightly
from pipelines.input.shards import Shard, list_shards
from pipelines.run import run_nightly
from pipelines.table.commit import ConcurrentRunError
from pipelines.table.read import read_output
from pipelines.table.records import RUN_RECORD_SCHEMA, read_run_records

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
D1, D2, D3 = dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)


def shard(name: str, size: int = 100, minute: int = 0) -> Shard:
    return Shard(f"s3://b/{name}", f"b/{name}", size, T0 + dt.timedelta(minutes=minute))


def records(*runs) -> pa.Table:
    rows = []
    for run_date, shards, status in runs:
        rows.append(
            {
                "run_id": f"r{len(rows)}",
                "run_date": run_date,
                "status": status,
                "config_hash": "h",
                "started_at": T0 + dt.timedelta(hours=len(rows)),
                "input_shards": [{"uri": s.uri, "size": s.size, "mtime": s.mtime} for s in shards],
            }
        )
    return pa.Table.from_pylist(rows, schema=RUN_RECORD_SCHEMA)


def test_only_shards_no_other_date_processed_are_new():
    a, b, c = shard("a"), shard("b"), shard("c")
    plan = plan_nightly([a, b, c], records((D1, [a, b], "succeeded")), D2, "h", force=False)
    assert plan.shards == [c] and plan.new == [c]


def test_a_failed_run_does_not_count_as_processed():
    a, b = shard("a"), shard("b")
    plan = plan_nightly([a, b], records((D1, [a], "succeeded"), (D1, [b], "failed")), D2, "h", force=False)
    assert plan.shards == [b]


def test_a_rewritten_shard_is_new_again():
    a, b = shard("a"), shard("b")
    rewritten = shard("b", size=120, minute=5)
    plan = plan_nightly([a, rewritten], records((D1, [a, b], "succeeded")), D2, "h", force=False)
    assert plan.shards == [rewritten]


def test_rerunning_a_date_keeps_its_shards_and_adds_new_ones():
    a, b, c = shard("a"), shard("b"), shard("c")
    history = records((D1, [a], "succeeded"), (D2, [b], "succeeded"))
    assert plan_nightly([a, b, c], history, D2, "h", force=False).shards == [b, c]
    up_to_date = plan_nightly([a, b], history, D2, "h", force=False)
    assert up_to_date.nothing_to_do and "up to date" in up_to_date.reason
    assert plan_nightly([a, b], history, D2, "h", force=True).shards == [b]
    assert plan_nightly([a, b], history, D2, "other-config", force=False).shards == [b]


def test_nothing_new_is_a_no_op_that_says_so():
    a = shard("a")
    plan = plan_nightly([a], records((D1, [a], "succeeded")), D2, "h", force=False)
    assert plan.nothing_to_do and "nothing new" in plan.reason


@pytest.mark.slow
def test_nightly_runs_end_to_end(tiny_clip_dir, tmp_path):
    crawl, spare, out = tmp_path / "crawl", tmp_path / "spare", str(tmp_path / "out")
    paths = write_sample_shards(
        spare, num_shards=3, rows_per_shard=8, broken_per_shard=1, mismatch_fraction=0.25, seed=3
    )
    crawl.mkdir()
    for path in paths[:2]:  # shards A and B
        shutil.copy(path, crawl / path.name)
    raw = {
        "input": {"uri": str(crawl)},
        "clip": {"model": {"source": str(tiny_clip_dir)}},
        "output": {"uri": out},
        "executor": "in_process",
    }

    def nightly(day, force=False):
        return run_nightly(validate_config({**raw, "run_date": day.isoformat()}), force=force)

    def partition(day) -> list[str]:
        table = read_output(out, run_date=day, columns=[col.KEY])
        return sorted(table.column(col.KEY).to_pylist())

    def current(version=None) -> list[tuple]:
        rows = read_output(out, version=version, columns=[col.KEY, col.SOURCE_SHARD, col.RUN_DATE, col.RUN_ID])
        return sorted((r[col.KEY], r[col.SOURCE_SHARD], r[col.RUN_DATE], r[col.RUN_ID]) for r in rows.to_pylist())

    plan, first = nightly(D1)
    assert first.rows_in == 16 and len(plan.shards) == 2
    shutil.copy(paths[2], crawl / paths[2].name)  # shard C arrives
    plan, second = nightly(D2)
    assert [s.uri.rsplit("/", 1)[1] for s in plan.shards] == ["00002.parquet"] and second.rows_in == 8
    day2 = partition(D2)

    plan, nothing = nightly(D2)
    assert nothing is None and "up to date" in plan.reason
    plan, again = nightly(D2, force=True)
    assert partition(D2) == day2 and len(set(day2)) == 8  # same rows, no duplicates
    assert len(partition(D1)) == 16

    # Shard B is rewritten in place (the same rows, a new mtime): D3 processes it again and its rows
    # move from D1 to D3 in D3's commit; each key is in the current version once.
    later = (crawl / paths[1].name).stat().st_mtime + 60
    os.utime(crawl / paths[1].name, (later, later))
    shards = list_shards(Location.resolve(str(crawl), StorageOptions()))
    plan, third = nightly(D3)
    assert [s.uri for s in plan.shards] == [shards[1].uri] and third.rows_superseded == 8
    rows = current()
    assert len(rows) == len({r[0] for r in rows}) == 24
    assert {r[1] for r in rows} == {s.uri for s in shards}  # source_shard spells a shard as Shard.uri does
    assert {(r[2], r[3]) for r in rows if r[1] == shards[1].uri} == {(D3, third.run_id)}
    old = [r for r in current(again.table_version) if r[1] == shards[1].uri]  # time travel
    assert len(old) == 8 and {(r[2], r[3]) for r in old} == {(D1, first.run_id)}

    plan, fourth = nightly(D3, force=True)  # re-running the superseding date changes nothing
    assert fourth.rows_superseded == 0 and [r[:3] for r in current()] == [r[:3] for r in rows]
    runs = read_run_records(str(tmp_path / "out" / "_vlpipe_runs"), validate_config(raw).storage)
    assert runs.column("run_id").to_pylist() == [r.run_id for r in (first, second, again, third, fourth)]
    assert runs.column("rows_superseded").to_pylist() == [0, 0, 0, 8, 0]


@pytest.mark.slow
def test_two_nightly_runs_at_once_leave_exactly_one_partition_version(tiny_clip_dir, tmp_path):
    write_sample_shards(tmp_path / "crawl", num_shards=2, rows_per_shard=8, broken_per_shard=1, mismatch_fraction=0.25)
    config = validate_config(
        {
            "input": {"uri": str(tmp_path / "crawl")},
            "clip": {"model": {"source": str(tiny_clip_dir)}},
            "output": {"uri": str(tmp_path / "out")},
            "run_date": "2026-11-05",
            "executor": "in_process",
        }
    )
    outcomes: list = []
    barrier = threading.Barrier(2)

    def fire():
        barrier.wait()
        try:
            outcomes.append(run_nightly(config)[1])
        except ConcurrentRunError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=fire) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o for o in outcomes if isinstance(o, ConcurrentRunError)]
    assert len(errors) == 1 and "another run committed run_date=2026-11-05" in str(errors[0])
    table = DeltaTable(str(tmp_path / "out")).to_pyarrow_table()
    assert table.num_rows == 16 and len(set(table.column(col.KEY).to_pylist())) == 16
    assert len(set(table.column(col.RUN_ID).to_pylist())) == 1
