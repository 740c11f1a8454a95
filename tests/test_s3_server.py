"""Checks against a real SeaweedFS S3 server on loopback (see tests/s3_server.py).

What the product relies on: pyarrow's S3FileSystem for data files, and
deltalake (delta-rs) committing to ``s3://`` with conditional PUT
(``If-None-Match: *``) so concurrent commits can never overwrite each other.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction, CommitProperties

try:
    from s3_server import S3Server, S3ServerStartError, start_seaweedfs
except ImportError:  # tests/ imported as a package (e.g. --import-mode=importlib)
    from tests.s3_server import S3Server, S3ServerStartError, start_seaweedfs

BUCKET = "vlpipe-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> S3Server:
    server, stop = start_seaweedfs(tmp_path_factory.mktemp("s3server"))
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        stop()


def _uri(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


def _sorted(t: pa.Table, *keys: str) -> pa.Table:
    return t.sort_by([(k, "ascending") for k in keys])


# ----------------------------------------------------------------- basic S3
def test_bucket_creation(s3: S3Server) -> None:
    s3.create_bucket("made-here")
    s3.create_bucket("made-here")  # idempotent for the owner
    listing = s3.request("GET", "/")
    assert listing.status == 200
    assert b"<Name>made-here</Name>" in listing.body
    assert b"<Name>" + BUCKET.encode() + b"</Name>" in listing.body
    info = s3.filesystem().get_file_info("made-here")
    assert info.type == pafs.FileType.Directory
    # No auto-creation: a PUT into a missing bucket fails.
    assert s3.request("PUT", "/no-such-bucket/k", b"x").status == 404


def test_pyarrow_put_get_list(s3: S3Server) -> None:
    fs = s3.filesystem()
    base = f"{BUCKET}/objs-{uuid.uuid4().hex[:8]}"
    payloads = {f"{base}/a.bin": b"hello", f"{base}/sub/b.bin": b"x" * 1000}
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=2)
    for path, data in payloads.items():
        with fs.open_output_stream(path) as f:
            f.write(data)
    for path, data in payloads.items():
        with fs.open_input_stream(path) as f:
            assert f.read() == data
        info = fs.get_file_info(path)
        assert info.type == pafs.FileType.File
        assert info.size == len(data)
        assert info.mtime is not None
        assert before <= info.mtime <= dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=2)

    listed = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = {i.path: i.size for i in listed if i.type == pafs.FileType.File}
    assert files == {p: len(d) for p, d in payloads.items()}
    assert fs.get_file_info(f"{base}/missing").type == pafs.FileType.NotFound

    # Parquet round trip through the same filesystem (what Ray workers do).
    table = pa.table({"id": [1, 2, 3], "s": ["a", "b", None]})
    pq.write_table(table, f"{base}/t.parquet", filesystem=fs)
    assert pq.read_table(f"{base}/t.parquet", filesystem=fs).equals(table)

    fs.delete_file(f"{base}/a.bin")
    assert fs.get_file_info(f"{base}/a.bin").type == pafs.FileType.NotFound


def test_requests_must_be_signed(s3: S3Server) -> None:
    assert s3.request("GET", "/").status == 200
    assert s3.request("GET", "/", sign=False).status == 403
    assert s3.request("GET", f"/{BUCKET}?list-type=2", sign=False).status == 403
    assert s3.request("PUT", f"/{BUCKET}/anon", b"x", sign=False).status == 403
    wrong = s3.request("GET", f"/{BUCKET}?list-type=2", secret_access_key="not-the-secret")
    assert wrong.status == 403
    assert b"SignatureDoesNotMatch" in wrong.body

    bad_fs = S3Server(s3.endpoint_url, s3.access_key_id, "not-the-secret", s3.region).filesystem()
    with pytest.raises(OSError):
        bad_fs.get_file_info(pafs.FileSelector(BUCKET))
    unknown_fs = S3Server(s3.endpoint_url, "AKNOBODY", "whatever", s3.region).filesystem()
    with pytest.raises(OSError), unknown_fs.open_output_stream(f"{BUCKET}/should-not-exist") as f:
        f.write(b"x")
    assert s3.filesystem().get_file_info(f"{BUCKET}/should-not-exist").type == pafs.FileType.NotFound


def test_conditional_put_if_none_match(s3: S3Server) -> None:
    key = f"/{BUCKET}/cond-{uuid.uuid4().hex[:8]}"
    first = s3.request("PUT", key, b"first", {"If-None-Match": "*"})
    assert first.status == 200, first
    second = s3.request("PUT", key, b"second", {"If-None-Match": "*"})
    assert second.status == 412, second
    assert b"PreconditionFailed" in second.body
    assert s3.request("GET", key).body == b"first"

    # Atomic under a race: of 6 simultaneous create-if-absent PUTs of one key,
    # exactly one wins, and the stored object is the winner's.  (Losers can
    # take 1-3 s: SeaweedFS serialises them on a filer lock with 1 s backoff.)
    for trial in range(3):
        race_key = f"{key}-race{trial}"
        barrier = threading.Barrier(6)

        def put(i: int, race_key: str = race_key, barrier=barrier) -> int:
            barrier.wait()
            return s3.request("PUT", race_key, f"w{i}".encode(), {"If-None-Match": "*"}).status

        with ThreadPoolExecutor(6) as ex:
            statuses = list(ex.map(put, range(6)))
        assert sorted(statuses) == [200] + [412] * 5, statuses
        winner = statuses.index(200)
        assert s3.request("GET", race_key).body == f"w{winner}".encode()


# ---------------------------------------------------------------- deltalake
def test_delta_options_are_safe(s3: S3Server) -> None:
    opts = s3.delta_storage_options()
    assert opts["conditional_put"] == "etag"
    assert not any("UNSAFE_RENAME" in k.upper() for k in opts)


def test_delta_write_append_overwrite_partition(s3: S3Server) -> None:
    so = s3.delta_storage_options()
    uri = _uri("table")
    day1 = pa.table({"run_date": ["2026-01-01"] * 3, "id": [1, 2, 3], "v": [1.0, 2.0, 3.0]})
    day2 = pa.table({"run_date": ["2026-01-02"] * 2, "id": [4, 5], "v": [4.0, 5.0]})

    write_deltalake(uri, day1, partition_by=["run_date"], storage_options=so)
    dt_ = DeltaTable(uri, storage_options=so)
    assert dt_.version() == 0
    assert dt_.metadata().partition_columns == ["run_date"]

    write_deltalake(uri, day2, mode="append", storage_options=so)
    got = DeltaTable(uri, storage_options=so).to_pyarrow_table()
    assert got.num_rows == 5

    # Replace only run_date=2026-01-01.
    new_day1 = pa.table({"run_date": ["2026-01-01"] * 2, "id": [10, 11], "v": [10.0, 11.0]})
    write_deltalake(
        uri,
        new_day1,
        mode="overwrite",
        predicate="run_date = '2026-01-01'",
        partition_by=["run_date"],
        storage_options=so,
    )
    dt_ = DeltaTable(uri, storage_options=so)
    assert dt_.version() == 2
    got = _sorted(dt_.to_pyarrow_table(), "id")
    assert got.column("id").to_pylist() == [4, 5, 10, 11]
    assert got.column("run_date").to_pylist() == ["2026-01-02"] * 2 + ["2026-01-01"] * 2
    params = [h["operationParameters"] for h in dt_.history()]  # newest first
    assert [p["mode"] for p in params] == ["Overwrite", "Append", "ErrorIfExists"]
    assert params[0]["predicate"] == "run_date = '2026-01-01'"

    # Every data file the log references exists on S3 (via pyarrow).
    fs = s3.filesystem()
    table_path = uri.removeprefix("s3://")
    for f in dt_.file_uris():
        assert fs.get_file_info(f.removeprefix("s3://")).type == pafs.FileType.File
    log = fs.get_file_info(pafs.FileSelector(f"{table_path}/_delta_log"))
    assert {i.base_name for i in log if i.base_name.endswith(".json")} == {f"{v:020d}.json" for v in range(3)}


def _append_concurrently(
    uri: str, so: dict[str, str], writers: int, rounds: int, retries: int | None
) -> tuple[list[int], list[BaseException]]:
    ok: list[int] = []
    failed: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(writers)

    def writer(w: int) -> None:
        for r in range(rounds):
            rows = w + 1 + r * writers
            t = pa.table(
                {
                    "writer": pa.array([w] * rows, pa.int64()),
                    "round": pa.array([r] * rows, pa.int64()),
                }
            )
            props = CommitProperties(max_commit_retries=retries) if retries is not None else None
            barrier.wait()  # all writers commit at the same moment
            try:
                write_deltalake(uri, t, mode="append", storage_options=so, commit_properties=props)
                with lock:
                    ok.append(rows)
            except Exception as e:
                with lock:
                    failed.append(e)

    with ThreadPoolExecutor(writers) as ex:
        for fut in [ex.submit(writer, w) for w in range(writers)]:
            fut.result()
    return ok, failed


def _assert_log_intact(s3: S3Server, uri: str, expected_rows: int, expected_commits: int) -> None:
    so = s3.delta_storage_options()
    dt_ = DeltaTable(uri, storage_options=so)
    assert dt_.version() == expected_commits - 1
    versions = sorted(h["version"] for h in dt_.history())
    assert versions == list(range(expected_commits))  # no gaps, no duplicates
    fs = s3.filesystem()
    log = fs.get_file_info(pafs.FileSelector(f"{uri.removeprefix('s3://')}/_delta_log"))
    assert sorted(i.base_name for i in log if i.base_name.endswith(".json")) == [
        f"{v:020d}.json" for v in range(expected_commits)
    ]
    # Each commit file is intact JSON lines with exactly one commitInfo.
    for v in range(expected_commits):
        with fs.open_input_stream(f"{uri.removeprefix('s3://')}/_delta_log/{v:020d}.json") as f:
            actions = [json.loads(line) for line in f.read().decode().splitlines() if line]
        assert sum("commitInfo" in a for a in actions) == 1
    assert dt_.to_pyarrow_table().num_rows == expected_rows


def test_delta_concurrent_appends_with_retries(s3: S3Server) -> None:
    so = s3.delta_storage_options()
    uri = _uri("concurrent")
    seed = pa.table({"writer": pa.array([-1], pa.int64()), "round": pa.array([-1], pa.int64())})
    write_deltalake(uri, seed, storage_options=so)

    ok, failed = _append_concurrently(uri, so, writers=4, rounds=3, retries=None)
    # Blind appends do not logically conflict: delta-rs retries on the next
    # version after a 412, so every writer succeeds with a distinct version.
    assert failed == []
    assert len(ok) == 12
    _assert_log_intact(s3, uri, expected_rows=1 + sum(ok), expected_commits=1 + len(ok))


def test_delta_concurrent_appends_without_retries_fail_cleanly(s3: S3Server) -> None:
    so = s3.delta_storage_options()
    uri = _uri("conflict")
    seed = pa.table({"writer": pa.array([-1], pa.int64()), "round": pa.array([-1], pa.int64())})
    write_deltalake(uri, seed, storage_options=so)

    # With no retries, simultaneous commits race for the same version file:
    # the server's 412 makes the losers fail; nothing is overwritten.
    ok, failed = _append_concurrently(uri, so, writers=4, rounds=2, retries=0)
    assert len(ok) + len(failed) == 8
    assert ok, "at least one writer per round must win"
    assert failed, "simultaneous commits with retries=0 should conflict"
    assert all(isinstance(e, CommitFailedError) for e in failed), failed
    _assert_log_intact(s3, uri, expected_rows=1 + sum(ok), expected_commits=1 + len(ok))


def _add_action_for(fs: pafs.S3FileSystem, table_path: str, rel: str, t: pa.Table, pv: dict) -> AddAction:
    info = fs.get_file_info(f"{table_path}/{rel}")
    assert info.type == pafs.FileType.File
    mins, maxs = {}, {}
    for name in t.column_names:
        mm = pc.min_max(t.column(name))
        mins[name], maxs[name] = mm["min"].as_py(), mm["max"].as_py()
    stats = {
        "numRecords": t.num_rows,
        "minValues": mins,
        "maxValues": maxs,
        "nullCount": {n: t.column(n).null_count for n in t.column_names},
    }
    return AddAction(
        path=rel,
        size=info.size,
        partition_values=pv,
        modification_time=int(info.mtime.timestamp() * 1000),
        data_change=True,
        stats=json.dumps(stats),
    )


def test_delta_commit_externally_written_parquet(s3: S3Server) -> None:
    """Parquet written via pyarrow S3FileSystem (as Ray workers will), then
    committed with create_write_transaction(mode="overwrite", partition_filters)."""
    so = s3.delta_storage_options()
    fs = s3.filesystem()
    uri = _uri("txn")
    table_path = uri.removeprefix("s3://")
    schema = pa.schema([("run_date", pa.string()), ("id", pa.int64()), ("label", pa.string())])
    data_schema = pa.schema([f for f in schema if f.name != "run_date"])

    # Existing table with two partitions.
    initial = pa.table(
        {
            "run_date": ["2026-01-01", "2026-01-01", "2026-01-02"],
            "id": [1, 2, 3],
            "label": ["old", "old", "keep"],
        },
        schema=schema,
    )
    write_deltalake(uri, initial, partition_by=["run_date"], storage_options=so)

    # Workers write files for run_date=2026-01-01 (partition column not stored
    # in the file, as Delta expects).
    actions = []
    for part in range(2):
        rel = f"run_date=2026-01-01/part-{part:05d}-{uuid.uuid4()}.parquet"
        t = pa.table(
            {"id": [100 + part * 10 + i for i in range(3)], "label": [f"new{part}"] * 3},
            schema=data_schema,
        )
        pq.write_table(t, f"{table_path}/{rel}", filesystem=fs)
        actions.append(_add_action_for(fs, table_path, rel, t, {"run_date": "2026-01-01"}))

    dt_ = DeltaTable(uri, storage_options=so)
    dt_.create_write_transaction(
        actions,
        mode="overwrite",
        schema=schema,
        partition_by=["run_date"],
        partition_filters=[("run_date", "=", "2026-01-01")],
    )

    dt_ = DeltaTable(uri, storage_options=so)
    assert dt_.version() == 1
    got = _sorted(dt_.to_pyarrow_table(), "id")
    assert got.column("id").to_pylist() == [3, 100, 101, 102, 110, 111, 112]
    assert got.column("label").to_pylist() == ["keep"] + ["new0"] * 3 + ["new1"] * 3
    assert set(got.column("run_date").to_pylist()) == {"2026-01-01", "2026-01-02"}
    # Old 2026-01-01 files are no longer part of the table; 2026-01-02 untouched.
    adds = pa.table(dt_.get_add_actions(flatten=True)).to_pydict()
    assert sorted(adds["path"]) == sorted(
        [a.path for a in actions] + [p for p in adds["path"] if p.startswith("run_date=2026-01-02/")]
    )
    assert sum(p.startswith("run_date=2026-01-02/") for p in adds["path"]) == 1
    assert dt_.history()[0]["operation"] == "WRITE"
    assert dt_.history()[0]["operationParameters"]["mode"] == "Overwrite"

    # Partition pruning works with the committed stats/partition values.
    only_new = dt_.to_pyarrow_table(partitions=[("run_date", "=", "2026-01-01")])
    assert only_new.num_rows == 6


def test_server_timings_reasonable(tmp_path) -> None:
    """A second, independent server starts quickly and stops cleanly."""
    t0 = time.monotonic()
    server, stop = start_seaweedfs(tmp_path)
    try:
        assert stop.startup_seconds is not None and stop.startup_seconds < 15
        assert stop.alive()
        server.create_bucket("other")
        assert server.request("PUT", "/other/k", b"v").status == 200
    finally:
        stop()
    assert not stop.alive()
    assert all(p.returncode is not None for p in stop.procs)
    assert time.monotonic() - t0 < 25


def test_start_failure_reports_log_tail(tmp_path) -> None:
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'fake weed: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(S3ServerStartError, match=r"(?s)exited with code 3.*fake weed: cannot start"):
        start_seaweedfs(tmp_path / "w", weed=str(fake), startup_timeout=5)
