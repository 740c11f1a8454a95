"""A run that stops before its commit resumes where it stopped (``pipelines.execute.progress``)."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deltalake import DeltaTable

from jobs.cli import main
from operators import schema as col
from pipelines import hooks
from pipelines.table.records import read_run_records
from tests.reliability.faults import HOOK

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BATCH = STAGED = 4  # rows per CLIP batch and per staged file: a 36-row run stages 9 files


def start_vlpipe(tmp_path: Path, config: str, faults: Path, ray_address: str) -> subprocess.Popen:
    """``vlpipe run config`` as its own process, with the fault hook (and the Ray at ``ray_address``)."""
    env = {
        **os.environ,
        hooks.ENV: HOOK,
        "VLPIPE_FAULTS": str(faults),
        "PYTHONPATH": str(ROOT),
        "RAY_ADDRESS": ray_address,
    }
    command = [sys.executable, "-m", "jobs.cli", "run", config]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def write_config(path: Path, shards: Path, clip: Path, out: Path, **sections) -> str:
    raw = {
        "executor": "in_process",
        "input": {"uri": str(shards)},
        "clip": {"model": {"source": str(clip)}, "resources": {"batch_size": BATCH}},
        "output": {"uri": str(out), "rows_per_file": 16},
        "staging_rows": STAGED,
        "run_date": "2026-11-01",
        "report": {"enabled": False},
    }
    raw.update(sections)
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def table_rows(out: Path) -> dict[str, dict]:
    """The committed rows by key, without the run id (each run has its own)."""
    rows = DeltaTable(str(out)).to_pyarrow_table().drop_columns([col.RUN_ID]).to_pylist()
    return {row[col.KEY]: row for row in rows}


def resumed(err: str) -> int:
    """The rows a run said it took over from the attempt before (0 where it said nothing)."""
    found = re.search(r"resuming run \S+: (\d+) of (\d+) rows already done", err)
    return int(found.group(1)) if found else 0


@pytest.mark.parametrize("executor", ["in_process", "ray"])
def test_a_run_killed_at_30_60_and_90_percent_resumes_to_an_uninterrupted_runs_table(
    executor, local_shards, tiny_clip_dir, tmp_path, request, faults
):
    folder, _, _, rows = local_shards
    assert main(["-q", "run", write_config(tmp_path / "ref.yaml", folder, tiny_clip_dir, tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    config = write_config(tmp_path / "config.yaml", folder, tiny_clip_dir, out, executor=executor)
    address = request.getfixturevalue("ray_cluster").get_runtime_context().gcs_address if executor == "ray" else ""
    # The session's fault folder: the shared Ray's workers got its path when the session started it.
    (faults / "seen-rows-clip").touch()
    (faults / "slow-batch-clip").write_text("0.1")  # a kill finds batches in flight, as on a real model
    done, kills = [], [int(fraction * len(rows)) for fraction in (0.3, 0.6, 0.9)]
    for at in kills:
        (faults / f"kill-at-staged-{at}").touch()
        process = start_vlpipe(tmp_path, config, faults, address)
        (faults / "driver-pid").write_text(str(process.pid))
        _, err = process.communicate(timeout=240)
        assert process.returncode == -signal.SIGKILL, err[-3000:]
        (faults / "stall-batch-clip").unlink()
        (faults / "stall-spill").unlink()
        done.append(resumed(err))
    process = start_vlpipe(tmp_path, config, faults, address)
    out_text, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    done.append(resumed(err))
    assert f"  resumed      {done[-1]:>8}  (staged by the attempt this run took over)" in out_text

    assert done[0] == 0 and all(resumed >= at for resumed, at in zip(done[1:], kills)), done
    (record,) = read_run_records(str(out / "_vlpipe_runs")).to_pylist()  # a killed run records nothing
    assert record["status"] == "succeeded" and record["rows_resumed"] == done[-1] and record["rows_in"] == len(rows)
    assert table_rows(out) == table_rows(tmp_path / "ref")
    assert not any((out / "_vlpipe_staging").iterdir())
    seen = collections.Counter((faults / "seen-rows-clip").read_text().split())
    assert set(seen) <= set(rows)
    again = sum(seen.values()) - len(seen)
    print(f"{executor}: rows resumed by each attempt {done}; rows run twice by CLIP: {again}")
    assert again <= 3 * (STAGED + 2 * BATCH)
