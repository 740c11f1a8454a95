"""`vlpipe compact`: a partition's small files become one, in one commit, and readers see the same rows."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
from deltalake import DeltaTable

from jobs.cli import main
from operators import schema as col
from operators.storage import Location, StorageOptions
from pipelines.table.commit import commit_files
from pipelines.table.compact import compact
from pipelines.table.read import read_output
from tests.pipelines.table.test_commit import SCHEMA, written

DAY, OTHER = dt.date(2026, 11, 20), dt.date(2026, 11, 21)


def append(uri: str, run_id: str, keys: list[str], day: dt.date = DAY) -> int:
    return commit_files(
        Location.resolve(uri, StorageOptions()),
        SCHEMA,
        written(uri, run_id, keys, day),
        day,
        "append",
        metadata={"vlpipe.run_id": run_id},
        read_version=None,
    ).version


def files_of(uri: str, day: dt.date, version: int | None = None) -> int:
    actions = pa.table(DeltaTable(uri, version=version).get_add_actions(flatten=True)).to_pylist()
    return sum(1 for a in actions if str(a[f"partition.{col.RUN_DATE}"]) == day.isoformat())


def test_compacting_a_date_rewrites_its_small_files_into_one_commit(tmp_path):
    uri = str(tmp_path / "t")
    for i in range(4):
        before = append(uri, f"r{i}", [f"k{i}-{j}" for j in range(3)])
    append(uri, "other", ["x"], OTHER)
    rows_before = read_output(uri).sort_by(col.KEY)

    (result,) = compact(Location.resolve(uri, StorageOptions()), [DAY])
    assert (result.files_removed, result.files_added) == (4, 1) and result.version == before + 2
    assert files_of(uri, DAY) == 1 and files_of(uri, OTHER) == 1  # the other date is untouched
    assert read_output(uri).sort_by(col.KEY).equals(rows_before)  # same rows, same types
    # The rewritten file carries statistics, so predicates still select rows rather than skip the file.
    assert read_output(uri, run_date=DAY, kept_only=True).num_rows == 12
    assert files_of(uri, DAY, version=before) == 4  # time travel still sees the old files
    assert DeltaTable(uri).history(1)[0]["vlpipe.operation"] == "compact"


def test_vlpipe_compact_reports_each_partition(tmp_path, capsys):
    uri = str(tmp_path / "t")
    for i in range(2):
        append(uri, f"r{i}", [f"k{i}"])
    append(uri, "o", ["x"], OTHER)
    assert main(["compact", uri]) == 0
    out = capsys.readouterr().out
    assert f"run_date={DAY}: 2 file(s) -> 1" in out and f"run_date={OTHER}: nothing to compact" in out
