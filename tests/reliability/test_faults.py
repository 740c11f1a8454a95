"""Injected faults: killed workers, a model that cannot load, flaky object storage, a driver killed before commit.

Each run's table is compared with a clean run of the same input: the same keys
(no row lost, none duplicated) and the same scores and outcomes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from deltalake import DeltaTable

from jobs.demo import write_sample_shards
from operators import schema as col
from pipelines.config import validate_config
from pipelines.run import run_pipeline
from tests.reliability.faults import HOOK
from tests.reliability.s3_proxy import Fault, FaultProxy

pytestmark = pytest.mark.slow

OUTCOME = (col.CLIP_SCORE, col.KEEP, col.REJECT_REASON, col.STATUS)


def config_for(input_uri, output_uri, tiny_clip_dir, **sections):
    raw = {
        "input": {"uri": str(input_uri)},
        "filter": {"min_clip_score": 0.0},
        "output": {"uri": str(output_uri)},
        "run_date": "2026-11-01",
        # Small batches, so a killed worker dies in the middle of the run, with batches done before it.
        "decode": {"resources": {"batch_size": 4}},
        "clip": {"model": {"source": str(tiny_clip_dir)}, "resources": {"batch_size": 8}},
    }
    return validate_config({**raw, **sections})


def outcomes(table_uri, storage_options=None) -> dict[str, tuple]:
    """key -> (score, keep, reason, status); asserts that no key appears twice."""
    rows = DeltaTable(str(table_uri), storage_options=storage_options).to_pyarrow_table(columns=[col.KEY, *OUTCOME])
    keys = rows.column(col.KEY).to_pylist()
    assert len(keys) == len(set(keys)), "duplicate keys"
    return {r[col.KEY]: tuple(r[c] for c in OUTCOME) for r in rows.to_pylist()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault-shards")
    paths = write_sample_shards(folder, num_shards=3, rows_per_shard=8, broken_per_shard=1, seed=5)
    return folder, paths


@pytest.fixture(scope="module")
def clean(ray_cluster, shards, tiny_clip_dir, tmp_path_factory):
    """A run that nothing went wrong in: the reference table."""
    out = tmp_path_factory.mktemp("clean") / "t"
    record = run_pipeline(config_for(shards[0], out, tiny_clip_dir, executor="in_process"))  # the same rows as on Ray
    table = outcomes(out)
    assert len(table) == record.rows_in == 24
    return out, table


@pytest.mark.timeout(120)  # Ray fails the run on the first actor that cannot start: no restart loop
def test_a_model_that_cannot_load_fails_the_run_with_its_error(ray_cluster, shards, tiny_clip_dir, tmp_path):
    broken = tmp_path / "broken-clip"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # truncated download
    with pytest.raises(Exception) as failure:
        run_pipeline(config_for(shards[0], tmp_path / "t", broken, executor="ray"))
    last_line = str(failure.value).strip().splitlines()[-1]
    assert "ClipScorer could not load its model: SafetensorError: Error while deserializing header" in last_line
    assert not (tmp_path / "t" / "_delta_log").exists()


def test_flaky_object_storage_and_killed_workers_cost_retries_not_rows(clean, shards, s3, tiny_clip_dir, faults):
    # One run takes every fault (runs are the expensive part of this suite): killed workers ...
    (faults / "batch-clip").touch()  # the CLIP actor dies in the middle of a batch
    (faults / "batch-decode").touch()  # and so does one read/decode task
    (faults / "batch-write").touch()  # and a writer actor (3 files: actors), before it writes its file
    s3.upload(shards[1], "flaky/crawl")
    storage_faults = [
        Fault("GET", "reset", count=3, start=2, every=5),
        Fault("GET", "slowdown", count=3, start=4, every=5),
        Fault("GET", "slow", count=2, delay=0.5, start=6, every=7),
        Fault("WRITE", "slowdown", count=3, start=1, every=3),
        Fault("WRITE", "reset", count=2, start=2, every=3),
        # The commit lands but its answer is lost: the run must notice, not commit twice or give up.
        Fault("PUT", "reset_after", count=1, path_contains="/enriched/_delta_log/"),
        Fault("PUT", "reset_after", count=1, path_contains="/_vlpipe_runs/_delta_log/"),  # same for the run record
    ]
    with FaultProxy(s3.endpoint_url, storage_faults) as proxy:
        storage = {
            "endpoint_url": proxy.endpoint_url,
            "region": s3.region,
            "access_key_id": s3.access_key_id,
            "secret_access_key": s3.secret_access_key,
        }
        record = run_pipeline(
            config_for(
                "s3://flaky/crawl/",
                "s3://flaky/enriched",
                tiny_clip_dir,
                storage=storage,
                output={"uri": "s3://flaky/enriched", "rows_per_file": 4},
                executor="ray",  # killed workers are retried by Ray
            )
        )
    # ... and flaky object storage, on reads and on writes: every fault was injected.
    assert dict(proxy.fired) == {f.name: f.count for f in storage_faults}
    assert all((faults / f"batch-{stage}.fired").exists() for stage in ("clip", "decode", "write"))
    assert record.table_version == 0 and not record.failed_shards
    assert outcomes("s3://flaky/enriched", s3.delta_storage_options()) == clean[1]


def test_driver_killed_before_commit_leaves_the_table_as_it_was(clean, shards, tiny_clip_dir, tmp_path):
    out = tmp_path / "t"
    shutil.copytree(clean[0], out)  # yesterday's table, one commit
    before = DeltaTable(str(out)).version()
    armed = tmp_path / "faults"
    armed.mkdir()
    (armed / "commit").touch()
    script = textwrap.dedent(f"""
        from pipelines.config import validate_config
        from pipelines.run import run_pipeline
        run_pipeline(validate_config({{"input": {{"uri": {str(shards[0])!r}}},
            "clip": {{"model": {{"source": {str(tiny_clip_dir)!r}}}}}, "filter": {{"min_clip_score": 0.5}},
            "output": {{"uri": {str(out)!r}}}, "run_date": "2026-11-01", "executor": "in_process"}}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "VLPIPE_FAULTS": str(armed), "VLPIPE_HOOK": HOOK},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 1 and (armed / "commit.fired").exists(), done.stderr[-3000:]
    written = {p for p in out.rglob("*.parquet") if "_vlpipe_runs" not in str(p)}
    table = DeltaTable(str(out))
    visible = {Path(uri.removeprefix("file://")) for uri in table.file_uris()}
    assert written - visible, "the killed run had written data files"
    assert table.version() == before and outcomes(out) == clean[1]  # readers see the previous version

    record = run_pipeline(config_for(shards[0], out, tiny_clip_dir, executor="in_process"))
    assert record.table_version == before + 1
    assert outcomes(out) == clean[1]  # converged: the killed run's files never became visible
