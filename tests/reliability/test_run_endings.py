"""Every way a run ends leaves exactly one run record, and the exit code agrees with it."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from deltalake import DeltaTable, write_deltalake

from jobs.cli import main
from operators import schema as col
from pipelines import hooks
from pipelines.table.records import read_run_records
from tests.reliability.faults import HOOK

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, shards: Path, clip: Path, **sections) -> str:
    """A run of ``shards`` in this process unless ``executor`` says otherwise: these endings are not Ray's."""
    raw = {
        "executor": "in_process",
        "input": {"uri": str(shards)},
        "clip": {"model": {"source": str(clip)}},
        "output": {"uri": str(tmp_path / "out")},
        "run_date": "2026-11-01",
        "report": {"enabled": False},
    }
    raw.update(sections)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def records(tmp_path: Path) -> list[dict]:
    return read_run_records(str(tmp_path / "out" / "_vlpipe_runs")).to_pylist()


def test_a_run_with_a_bad_shard_is_partial_in_its_record_and_exits_3(local_shards, tiny_clip_dir, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(local_shards[0], shards)
    (shards / "99999.parquet").write_bytes(b"truncated upload")
    assert main(["-q", "run", write_config(tmp_path, shards, tiny_clip_dir)]) == 3
    (record,) = records(tmp_path)
    assert record["status"] == "partial" and record["failed_shards"][0]["uri"].endswith("99999.parquet")
    assert record["rows_in"] == 36 and record["table_version"] == 0


def test_no_usable_input_is_a_failed_record_and_exits_4(tiny_clip_dir, tmp_path, capsys):
    (tmp_path / "crawl").mkdir()
    (tmp_path / "crawl" / "a.parquet").write_bytes(b"<html>503</html>")
    assert main(["run", write_config(tmp_path, tmp_path / "crawl", tiny_clip_dir)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vlpipe: none of the 1 input shard(s) can be read") and "Traceback" not in "\n".join(err)
    (record,) = records(tmp_path)
    assert record["status"] == "failed" and "cannot read the Parquet footer" in record["error"]


def test_a_model_that_cannot_load_is_a_failed_record_and_exits_1(local_shards, tiny_clip_dir, tmp_path):
    broken = tmp_path / "broken-clip"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    assert main(["-q", "run", write_config(tmp_path, local_shards[0], broken)]) == 1
    (record,) = records(tmp_path)
    assert record["status"] == "failed" and "ClipScorer could not load its model: SafetensorError" in record["error"]
    assert not (tmp_path / "out" / "_delta_log").exists()


def test_another_run_committing_first_is_a_failed_record_and_exits_5(local_shards, tiny_clip_dir, tmp_path):
    out = tmp_path / "out"

    def other_run_commits(point: str) -> None:
        if point == "commit":  # between this run's start and its commit, another run takes the date
            other = pa.table({col.KEY: ["x"], col.RUN_DATE: pa.array([dt.date(2026, 11, 1)], pa.date32())})
            write_deltalake(str(out), other, mode="append", partition_by=[col.RUN_DATE])

    hooks.install(other_run_commits)
    try:
        assert main(["-q", "run", write_config(tmp_path, local_shards[0], tiny_clip_dir)]) == 5
    finally:
        hooks.install(None)
    (record,) = records(tmp_path)
    assert record["status"] == "failed" and "another run committed run_date=2026-11-01" in record["error"]


def test_an_error_inside_a_stage_is_a_failed_record_with_the_error_and_exits_1(
    local_shards, tiny_clip_dir, tmp_path, faults
):
    (faults / "raise-batch-filter").touch()  # every batch of the filter stage raises
    assert main(["-q", "run", write_config(tmp_path, local_shards[0], tiny_clip_dir)]) == 1
    (record,) = records(tmp_path)
    assert record["status"] == "failed" and "planted failure at batch:filter" in record["error"]


# vlpipe as a process, with what made its last stderr line a library's on another machine: torch's
# FakeTensor module imported (it logs cache stats at INFO from an atexit handler) and torch's
# loggers left to the application, as there; plus a library that warns at exit.
_PRELOADED = """
import atexit, logging, sys
import torch._subclasses.fake_tensor
torch_log = logging.getLogger("torch")
torch_log.propagate, torch_log.handlers[:] = True, []
torch_log.setLevel(logging.NOTSET)
atexit.register(lambda: logging.getLogger("a_library").warning("tearing down"))
from jobs.cli import entry
sys.argv[0] = "vlpipe"
entry()
"""
_VLPIPE_LINE = re.compile(r"^(vlpipe: |\S+ \S+ [A-Z]+ +(vlpipe|operators|pipelines|jobs)[\w.]*( run=\S+)?: )")


def start_vlpipe(tmp_path: Path, config: str, faults: Path | None = None, ray_address: str = "") -> subprocess.Popen:
    """``vlpipe run config`` as its own process, with torch's fake_tensor imported (and the Ray at ``ray_address``)."""
    env = {**os.environ, hooks.ENV: HOOK, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_address}
    if faults is not None:
        env["VLPIPE_FAULTS"] = str(faults)
    return subprocess.Popen(
        [sys.executable, "-c", _PRELOADED, "run", config],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_mid_run(process: subprocess.Popen, stop: signal.Signals) -> tuple[str, str]:
    """Signal ``process`` once its plan is logged (the run has started), then wait for its end."""
    seen = []
    deadline = time.monotonic() + 120
    for line in process.stderr:
        seen.append(line)
        if "plan:" in line or time.monotonic() > deadline:
            break
    time.sleep(1)
    process.send_signal(stop)
    out, rest = process.communicate(timeout=120)
    return out, "".join(seen) + rest


@pytest.mark.parametrize(
    ("ending", "executor"),
    [("success", "in_process"), ("failure", "in_process"), ("SIGTERM", "in_process"), ("success", "ray")],
)
def test_the_last_line_on_stderr_is_vlpipes_own_however_the_run_ends(
    local_shards, tiny_clip_dir, tmp_path, ending, executor, request
):
    config = write_config(tmp_path, local_shards[0], tiny_clip_dir, executor=executor)
    # On Ray the process exits through Python's atexit handlers (in process it skips them): the
    # session's Ray saves starting one for this run alone.
    ray_address = request.getfixturevalue("ray_cluster").get_runtime_context().gcs_address if executor == "ray" else ""
    armed = tmp_path / "faults"
    armed.mkdir()
    if ending == "failure":
        (armed / "raise-batch-filter").touch()
    if ending == "SIGTERM":
        (armed / "stall-batch-clip").touch()
        out, err = stop_mid_run(start_vlpipe(tmp_path, config, armed), signal.SIGTERM)
    else:
        out, err = start_vlpipe(tmp_path, config, armed, ray_address).communicate(timeout=240)
    last = err.strip().splitlines()[-1]
    assert _VLPIPE_LINE.match(last), err[-3000:]
    assert "torch" not in err, err[-3000:]  # no library speaks below WARNING without -v
    (record,) = records(tmp_path)
    assert record["status"] == {"success": "succeeded", "failure": "failed", "SIGTERM": "interrupted"}[ending]
    if ending == "success":
        assert "vlpipe run" in out and "(succeeded)" in out


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_and_records_it_interrupted(local_shards, tiny_clip_dir, tmp_path, stop):
    config = write_config(tmp_path, local_shards[0], tiny_clip_dir)
    armed = tmp_path / "faults"
    armed.mkdir()
    (armed / "stall-batch-clip").touch()  # the CLIP stage hangs, as a stuck model would
    process = start_vlpipe(tmp_path, config, armed)
    _, err = stop_mid_run(process, stop)
    assert process.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == f"vlpipe: interrupted ({stop.name})"
    (record,) = records(tmp_path)
    assert record["status"] == "interrupted" and record["error"] == f"interrupted ({stop.name})"


def test_a_gpu_the_local_cluster_lacks_fails_at_once_naming_the_key(
    ray_cluster, local_shards, tiny_clip_dir, tmp_path, capsys
):
    config = write_config(tmp_path, local_shards[0], tiny_clip_dir, ray_resource_timeout_s=1, executor="ray")
    started = time.monotonic()
    assert main(["run", config, "--set", "clip.resources.num_gpus=1"]) == 2  # it used to wait for ever
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert (
        "clip.resources asks for 1 GPU(s) (1 actor(s) x 1), but the Ray cluster has 0 "
        "(waited 1 s for the cluster to grow)"
    ) in err
    assert "waiting for the cluster: clip.resources asks for 1 GPU(s)" in err  # it said what it waited for
    (record,) = records(tmp_path)
    assert record["status"] == "failed" and "clip.resources asks for 1 GPU" in record["error"]


def test_a_row_that_makes_a_model_stage_raise_is_rejected_and_the_run_goes_on(
    local_shards, tiny_clip_dir, tmp_path, faults
):
    folder, _, manifest, rows = local_shards
    bad = next(k for k in sorted(rows) if k not in manifest["broken_keys"] + manifest["empty_caption_keys"])
    (faults / f"raise-row-clip-{bad}").touch()  # the CLIP stage raises on this row, as on a prompt too long
    assert main(["-q", "run", write_config(tmp_path, folder, tiny_clip_dir)]) == 0
    (record,) = records(tmp_path)
    assert record["status"] == "succeeded" and json.loads(record["rejected_by_reason"])[col.MODEL_ERROR] == 1
    table = {r[col.KEY]: r for r in DeltaTable(str(tmp_path / "out")).to_pyarrow_table().to_pylist()}
    assert len(table) == len(rows)
    assert table[bad][col.REJECT_REASON] == col.MODEL_ERROR and table[bad][col.CLIP_SCORE] is None
    assert table[bad][col.ERROR] == f"clip: RuntimeError: planted failure at row:clip:{bad}"
    scored = [r for k, r in table.items() if r[col.STATUS] == col.OK and (r[col.CAPTION] or "").strip()]
    assert scored and all(r[col.CLIP_SCORE] is not None for r in scored)


def test_a_model_stage_that_raises_on_every_row_fails_the_run(local_shards, tiny_clip_dir, tmp_path, faults):
    (faults / "raise-rows-clip").touch()
    assert main(["-q", "run", write_config(tmp_path, local_shards[0], tiny_clip_dir)]) == 1
    (record,) = records(tmp_path)
    assert record["status"] == "failed" and "planted failure at row:clip:" in record["error"]
