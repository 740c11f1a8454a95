"""Progress: a run that stops before its commit leaves its staged rows, and the next run of the
same date, config and inputs takes them over (``pipelines.execute.progress``).

These runs stop by a stage raising (the run fails and keeps its progress) and run in this
process; ``tests.reliability.test_resume`` kills whole runs on both executors.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyarrow.fs import FileSelector

from jobs.cli import main
from operators import schema as col
from operators.storage import Location, StorageOptions
from pipelines import hooks
from pipelines.config import validate_config
from pipelines.execute.progress import RunKey, _ranges, read_staged
from pipelines.execute.source import parquet_source
from pipelines.run import run_nightly, run_pipeline
from pipelines.table.records import read_run_records
from tests.images import encode, noise
from tests.pipelines.conftest import s3_config
from tests.tars import write_tar

STAGED = 4  # rows per staged file


def config_of(shards: Path, models: dict[str, Path], out: Path, **sections):
    raw = {
        "executor": "in_process",
        "input": {"uri": str(shards)},
        "clip": {"model": {"source": str(models["tiny-clip"])}, "resources": {"batch_size": 3}},
        "output": {"uri": str(out), "rows_per_file": 10},
        "staging_rows": STAGED,
        "run_date": "2026-11-01",
        "report": {"enabled": False},
        **sections,
    }
    return validate_config(raw)


def fail_after_staging(files: int):
    """A hook that makes the run fail once ``files`` staged files are whole, as a crash there would."""
    seen = []

    def hook(point: str) -> None:
        if point.startswith("spilled:"):
            seen.append(point)
            if len(seen) == files:
                raise RuntimeError("the run stops here")

    return hook


def stop_then_resume(config, files: int = 3):
    """Run ``config`` until ``files`` files are staged, then again; the second run's record."""
    stop(config, files)
    return run_pipeline(config)


def table_rows(out: Path) -> dict[str, dict]:
    rows = DeltaTable(str(out)).to_pyarrow_table().drop_columns([col.RUN_ID]).to_pylist()
    return {row[col.KEY]: row for row in rows}


def staging(out: Path) -> list[str]:
    folder = out / "_vlpipe_staging"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _tars(folder: Path) -> Path:
    folder.mkdir()
    for shard in range(3):
        members = []
        for i in range(6):
            key = f"s{shard}-{i}"
            members += [(f"{key}.jpg", encode(noise(seed=10 * shard + i), "JPEG")), (f"{key}.txt", f"noise {key}")]
        write_tar(folder / f"{shard:05d}.tar", members)
    return folder


def _references(folder: Path) -> Path:
    """Parquet shards of image paths relative to ``fetch.base``: the images are fetched, not read from the shards."""
    (folder / "img").mkdir(parents=True)
    (folder / "refs").mkdir()
    for shard in range(2):
        keys = [f"r{shard}-{i}" for i in range(7)]
        for i, key in enumerate(keys):
            (folder / "img" / f"{key}.jpg").write_bytes(encode(noise(seed=100 + 10 * shard + i), "JPEG"))
        table = pa.table({"key": keys, "caption": [f"noise {k}" for k in keys], "url": [f"img/{k}.jpg" for k in keys]})
        pq.write_table(table, folder / "refs" / f"{shard:05d}.parquet")
    return folder


def _inputs(kind: str, local_shards, tmp_path: Path) -> tuple[Path, dict]:
    if kind == "tar":
        return _tars(tmp_path / "tars"), {}
    if kind == "references":
        folder = _references(tmp_path / "refs")
        return folder / "refs", {"columns": {"image_uri": "url"}, "fetch": {"base": str(folder)}}
    return local_shards[0], {}


WHOLE_RUN = {
    "dedup": {"exact": True, "near": {"max_distance": 8}, "semantic": {"eps": 0.02}},
    "filter": {"caption": "best", "keep_top_fraction": 0.6},
}


@pytest.mark.parametrize(
    ("kind", "sections"),
    [
        ("parquet", {}),
        ("tar", {}),
        ("references", {}),
        ("parquet", {**WHOLE_RUN, "caption": {"max_new_tokens": 6, "resources": {"batch_size": 5}}}),
    ],
    ids=["parquet", "tar", "image-references", "captions-dedup-top-fraction"],
)
def test_a_stopped_run_resumes_to_the_table_an_uninterrupted_run_writes(
    kind, sections, local_shards, demo_models, tmp_path, caplog
):
    shards, input_section = _inputs(kind, local_shards, tmp_path)
    if "caption" in sections:
        sections = {**sections, "caption": {**sections["caption"], "model": {"source": str(demo_models["tiny-blip"])}}}
    config = {**sections, "input": {"uri": str(shards), **input_section}}
    reference = run_pipeline(config_of(shards, demo_models, tmp_path / "ref", **config))
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="pipelines")

    record = stop_then_resume(config_of(shards, demo_models, out, **config))

    assert record.status == "succeeded" and record.rows_in == reference.rows_in
    assert record.rows_resumed == 3 * STAGED
    assert re.search(
        rf"resuming run {record.run_id}: {3 * STAGED}( of {reference.rows_in})? rows already done", caplog.text
    )
    assert (record.rows_kept, record.rejected_by_reason) == (reference.rows_kept, reference.rejected_by_reason)
    assert table_rows(out) == table_rows(tmp_path / "ref")  # every column, bitwise
    failed, succeeded = read_run_records(str(out / "_vlpipe_runs")).to_pylist()
    assert (failed["status"], succeeded["status"]) == ("failed", "succeeded")
    assert failed["run_id"] == succeeded["run_id"] == record.run_id  # the resumed run is the same run
    assert staging(out) == []  # nothing is left once the run has committed


def stop(config, files: int) -> None:
    """Run ``config`` until ``files`` files are staged, where it fails."""
    hooks.install(fail_after_staging(files))
    try:
        with pytest.raises(RuntimeError, match="the run stops here"):
            run_pipeline(config)
    finally:
        hooks.install(None)


def test_a_run_with_another_config_or_a_rewritten_shard_does_not_reuse_the_progress(
    local_shards, demo_models, tmp_path, caplog
):
    shards = tmp_path / "shards"
    shutil.copytree(local_shards[0], shards)
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="pipelines")
    stop(config_of(shards, demo_models, out), 3)
    record = run_pipeline(config_of(shards, demo_models, out, filter={"min_clip_score": 0.1}))
    assert record.rows_resumed == 0 and "the config (hash " in caplog.text
    first, _ = read_run_records(str(out / "_vlpipe_runs")).to_pylist()
    assert first["status"] == "failed" and first["run_id"] != record.run_id
    assert f"not resuming run {first['run_id']}: the config" in caplog.text and staging(out) == []

    stop(config_of(shards, demo_models, out, run_date="2026-11-02"), 2)
    shard = sorted(shards.glob("*.parquet"))[1]
    pq.write_table(pq.read_table(shard).slice(0, 10), shard)  # rewritten: two rows fewer
    record = run_pipeline(config_of(shards, demo_models, out, run_date="2026-11-02"))
    assert record.rows_resumed == 0 and record.rows_in == 34
    assert f"the input shards (1: {shard}) changed since; its progress is removed" in caplog.text
    assert staging(out) == []


def test_fresh_discards_the_progress_and_runs_shows_a_resumable_run(local_shards, demo_models, tmp_path, capsys):
    out = tmp_path / "out"
    config = config_of(local_shards[0], demo_models, out)
    stop(config, 2)
    (run_id,) = staging(out)
    assert main(["runs", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"resumable: run {run_id} (2026-11-01, 3 shard(s), stopped): {2 * STAGED:,} rows done" in shown

    record = run_pipeline(config, fresh=True)
    assert record.rows_resumed == 0 and record.run_id != run_id and staging(out) == []


def test_the_progress_of_a_run_that_committed_is_removed_not_resumed(local_shards, demo_models, tmp_path):
    out, other = tmp_path / "out", tmp_path / "other"
    config = config_of(local_shards[0], demo_models, out)
    first = run_pipeline(config)
    stop(config_of(local_shards[0], demo_models, other), 2)
    (stopped,) = staging(other)
    # What a run killed between its commit and its clean-up leaves: staged rows under its own id.
    leftover = out / "_vlpipe_staging" / first.run_id
    shutil.copytree(other / "_vlpipe_staging" / stopped, leftover)
    key = RunKey.of(first.run_date, first.config_hash, first.input_shards)
    (leftover / "run.json").write_text(key.to_json(first.run_id))
    second = run_pipeline(config)
    assert second.run_id != first.run_id and second.rows_resumed == 0 and staging(out) == []
    assert len(table_rows(out)) == len(local_shards[3])  # the first run's files are all still there


def test_a_run_whose_commit_failed_resumes_with_every_row_staged(local_shards, demo_models, tmp_path):
    out = tmp_path / "out"
    config = config_of(local_shards[0], demo_models, out, report={"enabled": True})

    def commit_fails(point: str) -> None:
        if point == "commit":
            raise OSError("the object store is down")

    hooks.install(commit_fails)
    try:
        with pytest.raises(OSError, match="the object store is down"):
            run_pipeline(config)
    finally:
        hooks.install(None)
    assert list((out / "run_date=2026-11-01").glob("*.parquet"))  # written, never committed
    record = run_pipeline(config)
    assert record.rows_resumed == record.rows_in == len(local_shards[3]) and record.table_version == 0
    assert len(DeltaTable(str(out)).file_uris()) == len(list((out / "run_date=2026-11-01").glob("*.parquet")))
    report = (out / "_vlpipe_reports" / f"{record.run_id}.html").read_text()
    assert f"<th>resumed</th><td>{record.rows_in} rows staged by an earlier attempt</td>" in report
    assert '"status": "succeeded"' in report  # the resumed run's record, not the failed attempt's


def test_a_stopped_nightly_run_resumes_on_the_next_nightly(local_shards, demo_models, tmp_path):
    config = config_of(local_shards[0], demo_models, tmp_path / "out")
    hooks.install(fail_after_staging(2))
    try:
        with pytest.raises(RuntimeError, match="the run stops here"):
            run_nightly(config)
    finally:
        hooks.install(None)
    plan, record = run_nightly(config)  # the stopped night left no succeeded record: its shards are still new
    assert len(plan.shards) == 3 and record.rows_resumed == 2 * STAGED and record.rows_in == len(local_shards[3])


def test_staged_files_cut_short_or_written_twice_are_done_again(tmp_path):
    rows = tmp_path / "rows"
    rows.mkdir()

    def stage(name: str, places: list[int]) -> None:
        table = pa.table({col.SOURCE_SHARD: ["s3://b/a.parquet"] * len(places), col.SOURCE_ROW: places})
        pq.write_table(table, rows / name)

    stage("a.parquet", [0, 1, 2, 3])
    stage("b.parquet", [4, 5, 6, 7])
    stage("c.parquet", [6, 7, 8, 9])  # a write Ray retried after its worker died, cut differently
    (rows / "d.parquet").write_bytes((rows / "a.parquet").read_bytes()[:40])  # killed mid-write
    staged, done = read_staged(Location.resolve(str(rows), StorageOptions()))
    assert [os.path.basename(r["path"]) for r in staged] == ["a.parquet", "b.parquet"]
    assert done == {"s3://b/a.parquet": ((0, 8),)}
    assert sorted(p.name for p in rows.iterdir()) == ["a.parquet", "b.parquet"]


def test_a_source_without_done_rows_reads_the_others_with_their_places(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"key": [str(i) for i in range(10)]}), path, row_group_size=4)
    source = parquet_source([str(path)], Location.resolve(str(tmp_path), StorageOptions()).filesystem, with_path=True)
    resumed = source.without({str(path): ((0, 3), (5, 9))}, set())
    table = pa.concat_tables(resumed.all_tables())
    assert table.column("key").to_pylist() == ["3", "4", "9"]
    assert table.column(col.SOURCE_ROW).to_pylist() == [3, 4, 9]
    assert list(source.without({}, {str(path)}).all_tables()) == []
    assert _ranges(pa.array([7, 1, 2, 3, 5, 6, 9]).to_numpy()) == ((1, 4), (5, 8), (9, 10))


def test_a_stopped_run_on_s3_resumes_and_leaves_no_staging_object(s3, s3_input, tiny_clip_dir):
    s3.create_bucket("resume")
    sections = {
        "output": {"uri": "s3://resume/enriched", "rows_per_file": 10},
        "executor": "in_process",
        "staging_rows": STAGED,
        "clip": {"model": {"source": str(tiny_clip_dir)}, "resources": {"batch_size": 3}},
        "report": {"enabled": False},
    }
    stop(s3_config(s3, tiny_clip_dir, **sections), 3)
    fs = s3.filesystem()
    staged = [i.path for i in fs.get_file_info(FileSelector("resume/enriched/_vlpipe_staging", recursive=True))]
    assert any(p.endswith("/run.json") for p in staged) and sum(p.endswith(".parquet") for p in staged) == 3
    record = run_pipeline(s3_config(s3, tiny_clip_dir, **sections))
    assert record.status == "succeeded" and record.rows_resumed == 3 * STAGED and record.rows_in == 36
    table = DeltaTable("s3://resume/enriched", storage_options=s3.delta_storage_options()).to_pyarrow_table()
    assert table.num_rows == 36 and len(set(table.column(col.KEY).to_pylist())) == 36
    left = fs.get_file_info(FileSelector("resume/enriched/_vlpipe_staging", recursive=True, allow_not_found=True))
    assert [i.path for i in left if i.is_file] == []


def test_a_resumed_run_does_not_ask_a_served_model_again_for_the_rows_it_took_over(
    local_shards, demo_models, vlm_server, tmp_path
):
    from tests.reliability.s3_proxy import FaultProxy

    _, _, manifest, rows = local_shards
    asked = {k for k in rows if k not in manifest["broken_keys"]}  # a fixed question: every decoded image
    out = tmp_path / "out"
    with FaultProxy(vlm_server.base_url.removesuffix("/v1"), []) as proxy:
        served = {"base_url": proxy.endpoint_url + "/v1", "model": vlm_server.model, "batch_size": 4}
        config = config_of(local_shards[0], demo_models, out, ask={"endpoint": served, "question": "What is it?"})
        stop(config, 3)
        staged = {
            k for path in out.glob("_vlpipe_staging/*/rows/*.parquet") for k in pq.read_table(path)[col.KEY].to_pylist()
        }
        proxy.stats()
        before = proxy.requests["POST"]
        record = run_pipeline(config)
        proxy.stats()
    assert len(staged) == record.rows_resumed == 3 * STAGED
    assert proxy.requests["POST"] - before == len(asked - staged)  # only the rows not staged are asked
    answered = {k for k, row in table_rows(out).items() if row[col.ANSWER_USAGE] is not None}
    assert answered == asked and record.endpoints["ask"]["requests"] == len(asked)
