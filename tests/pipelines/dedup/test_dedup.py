"""Dedup end to end on real Ray: planted duplicates within a night and against the nights before it."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

import pipelines.dedup.stage
from jobs.cli import main
from operators import schema as col
from operators.storage import Location, StorageOptions
from pipelines import hooks
from pipelines.config import validate_config
from pipelines.dedup.history import CENTROIDS_KEY, load_centroids
from pipelines.run import run_pipeline
from pipelines.table.records import read_run_records
from tests.dedup_corpus import ORIGINAL, SIMILAR, planted_corpus, write_corpus_shards

pytestmark = pytest.mark.slow

D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
# Tiny CLIP (random weights) puts these copies at cosine >= 0.998 and distinct images at <= 0.993.
EPS = 0.004
MAX_DISTANCE = 4  # pHash bits: catches re-encoding, resizing, small brightness shifts


def config(inputs, output, run_date, clip_dir, **sections):
    return validate_config(
        {
            "input": {"uri": str(inputs)},
            "clip": {"model": {"source": str(clip_dir)}},
            "output": {"uri": str(output)},
            "run_date": run_date.isoformat(),
            "report": {"enabled": False},
            "dedup": {"exact": True, "near": {"max_distance": MAX_DISTANCE}, "semantic": {"eps": EPS}},
            "executor": "in_process",  # dedup is not Ray's: one run below shuffles on Ray
            **sections,
        }
    )


def partition(output, run_date, version=None) -> dict[str, dict]:
    table = DeltaTable(str(output), version=version).to_pyarrow_table()
    rows = table.filter(pc.equal(table[col.RUN_DATE], run_date)).to_pylist()
    return {r[col.KEY]: r for r in rows}


def decisions(rows: dict[str, dict]) -> dict[str, tuple]:
    return {k: (r[col.KEEP], r[col.REJECT_REASON], r[col.DUPLICATE_OF]) for k, r in rows.items()}


@pytest.fixture(scope="module")
def nights(tiny_clip_dir, tmp_path_factory):
    """Night 1: originals and look-alike distractors. Night 2: transformed copies of them, and exact
    copies of some of those copies under new keys."""
    root = tmp_path_factory.mktemp("dedup")
    items = planted_corpus(5, seed=0)
    first = [i for i in items if i.transform in (ORIGINAL, SIMILAR)]
    copies = [i for i in items if i.group is not None]
    again = [dataclasses.replace(i, key=f"again-{i.key}") for i in copies if i.transform == "jpeg_q30"]
    write_corpus_shards(first, root / "night1")
    write_corpus_shards(copies + again, root / "night2")
    output = root / "table"
    records = [run_pipeline(config(root / "night1", output, D1, tiny_clip_dir))]
    night1 = partition(output, D1)
    records.append(run_pipeline(config(root / "night2", output, D2, tiny_clip_dir)))
    return {
        "root": root,
        "output": output,
        "items": {i.key: i for i in items},
        "again": again,
        "records": records,
        "night1": night1,
        "night2": partition(output, D2),
    }


def test_night_one_has_no_duplicates_among_distinct_look_alike_images(nights):
    assert all(r[col.REJECT_REASON] not in col.DUPLICATE_REASONS for r in nights["night1"].values())
    assert nights["records"][0].rows_kept == len(nights["night1"])


def test_night_two_copies_point_at_night_one_originals_by_method(nights):
    items, night2 = nights["items"], nights["night2"]
    expected = {
        "exact": {col.DUPLICATE_EXACT},
        "jpeg_q30": {col.DUPLICATE_NEAR, col.DUPLICATE_EXACT},
        "resize_50": {col.DUPLICATE_NEAR},
        "brightness": {col.DUPLICATE_NEAR, col.DUPLICATE_SEMANTIC},
    }
    for key, row in night2.items():
        item = items.get(key)
        if item is None or item.transform not in expected:
            continue
        assert row[col.REJECT_REASON] in expected[item.transform], (item.transform, row[col.REJECT_REASON])
        if row[col.REJECT_REASON] != col.DUPLICATE_EXACT or item.transform == "exact":
            assert row[col.DUPLICATE_OF] == {"key": item.group, "run_date": D1}
    hflips = [night2[k] for k, i in items.items() if i.transform == "hflip"]
    assert all(r[col.REJECT_REASON] != col.DUPLICATE_NEAR for r in hflips)  # a mirror image flips the pHash


def test_within_the_night_one_of_two_identical_copies_survives_the_exact_check(nights):
    night2 = nights["night2"]
    for copy in nights["again"]:
        twin = copy.key.removeprefix("again-")
        reasons = {night2[copy.key][col.REJECT_REASON], night2[twin][col.REJECT_REASON]}
        # One is the exact copy of the other; that other is a near duplicate of night 1's original.
        assert reasons == {col.DUPLICATE_EXACT, col.DUPLICATE_NEAR}
        exact = copy.key if night2[copy.key][col.REJECT_REASON] == col.DUPLICATE_EXACT else twin
        assert night2[exact][col.DUPLICATE_OF] == {"key": ({copy.key, twin} - {exact}).pop(), "run_date": D2}


def test_every_row_is_accounted_for_and_night_one_never_changes(nights):
    for record, rows in zip(nights["records"], (nights["night1"], nights["night2"])):
        assert record.rows_in == len(rows) == record.rows_kept + sum(record.rejected_by_reason.values())
    assert nights["records"][1].rejected_by_reason.get(col.DUPLICATE_EXACT, 0) >= 5
    assert partition(nights["output"], D1) == nights["night1"]


def test_night_two_reuses_night_one_centroids_and_rows_carry_their_cluster(nights):
    history = DeltaTable(str(nights["output"])).history()
    named = [entry[CENTROIDS_KEY] for entry in history if CENTROIDS_KEY in entry]
    assert len(named) == 2 and named[0] == named[1]
    assert all(r[col.SEMANTIC_CLUSTER] is not None for r in nights["night2"].values() if r[col.STATUS] == col.OK)


def test_rerunning_night_two_gives_the_same_decisions(nights, tiny_clip_dir, monkeypatch, ray_cluster):
    # Keeping the top 100% changes no decision, but makes two whole-run stages in a row: dedup's
    # decisions must reach the top fraction's pass to give the same table. The nights were decided
    # in one task (they are small); this re-run shuffles on Ray Data as a large run does, which a run
    # in process asks its executor for (it starts a local Ray; here, the session's): same decisions.
    monkeypatch.setattr(pipelines.dedup.stage, "ONE_TASK_ROWS", 0)
    run_pipeline(
        config(
            nights["root"] / "night2",
            nights["output"],
            D2,
            tiny_clip_dir,
            filter={"keep_top_fraction": 1.0},
        )
    )
    assert decisions(partition(nights["output"], D2)) == decisions(nights["night2"])
    assert partition(nights["output"], D1) == nights["night1"]


def test_a_run_that_dies_in_dedup_leaves_no_rows_and_no_centroids(nights, tiny_clip_dir, tmp_path):
    def die(point: str) -> None:
        if point == "dedup:decided":
            raise RuntimeError("killed in dedup")

    output = tmp_path / "table"
    hooks.install(die)
    try:
        with pytest.raises(RuntimeError, match="killed in dedup"):  # after fitting and saving its centroids
            run_pipeline(config(nights["root"] / "night1", output, D1, tiny_clip_dir, dedup={"semantic": {"eps": EPS}}))
    finally:
        hooks.install(None)
    assert not DeltaTable.is_deltatable(str(output))
    assert load_centroids(Location.resolve(str(output), StorageOptions())) is None
    assert read_run_records(str(output / "_vlpipe_runs")).column("status").to_pylist() == ["failed"]


def test_refit_commits_new_centroids_that_later_runs_use(nights, capsys):
    output = nights["output"]
    rows_before = DeltaTable(str(output)).to_pyarrow_table().num_rows
    assert main(["dedup", "refit", str(output), "--clusters", "2"]) == 0
    assert "fitted 2 clusters" in capsys.readouterr().out
    path, centroids = load_centroids(Location.resolve(str(output), StorageOptions()))
    assert centroids.shape[0] == 2 and "refit" in path
    assert DeltaTable(str(output)).to_pyarrow_table().num_rows == rows_before  # no row changes
