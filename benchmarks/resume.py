"""A run that stops and resumes, against one that does not (``make bench BENCH_ARGS="--resume ROWS ..."``).

Whole ``vlpipe run`` processes on a local Ray of their own, as a user runs them, taking turns:

- ``off`` (``resume: false``: no staging before the write) against ``on`` (the default): what
  keeping progress costs;
- a run SIGKILLed, with the local Ray it started, once half its rows are staged (the node is
  lost), then the run again: both parts' time against one uninterrupted run;
- a run sent SIGTERM at half its rows (what KubeRay and spot nodes send, about 30 s before
  they kill): seconds until it has exited, then its resume.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from benchmarks.data import write_shards
from pipelines.table.records import read_run_records

STAGING_ROWS = 1024


def resume(work: pathlib.Path, clip_dir: pathlib.Path, rows: int, repeats: int = 1) -> dict:
    paths = write_shards(work / f"resume-{rows}", rows)
    folder = paths[0].parent
    result: dict = {"rows": rows, "shards": len(paths), "staging_rows": STAGING_ROWS}
    turns: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(repeats):
        for mode in turns:
            turns[mode].append(_finished(_config(work, folder, clip_dir, mode, resume=mode == "on")))
    result |= {f"{mode}_s": [round(s, 1) for s in seconds] for mode, seconds in turns.items()}
    off, on = statistics.median(turns["off"]), statistics.median(turns["on"])
    result["progress_cost"] = round(on / off - 1, 4)
    # Two whole runs differ by more than the staging costs (the noise of a 2-core machine): the
    # staging writes themselves, timed alone on the same rows, against the run they belong to.
    result["staging_writes_s"] = staging_writes(work / "resume-out" / "on")
    result["staging_writes_share"] = round(result["staging_writes_s"] / on, 4)
    killed = _config(work, folder, clip_dir, "killed")
    result["killed"] = _stopped(killed, rows, signal.SIGKILL) | _resumed(killed, rows)
    result["killed_and_resumed_over_uninterrupted"] = round(
        (result["killed"]["stopped_s"] + result["killed"]["resumed_s"]) / on, 3
    )
    termed = _config(work, folder, clip_dir, "sigterm")
    result["sigterm"] = _stopped(termed, rows, signal.SIGTERM) | _resumed(termed, rows)
    return result


def staging_writes(table: pathlib.Path) -> float:
    """Seconds to stage a committed table's rows as a run stages them: ``STAGING_ROWS`` a file."""
    from deltalake import DeltaTable

    from operators import schema as col
    from operators.storage import Location, StorageOptions
    from pipelines.execute.staging import write_staged

    rows = DeltaTable(str(table)).to_pyarrow_table()
    rows = rows.append_column(col.SOURCE_ROW, pa.array(range(rows.num_rows), pa.int64()))
    target = table.parent / "staging-writes"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    staging = Location.resolve(str(target), StorageOptions())
    start = time.perf_counter()
    for offset in range(0, rows.num_rows, STAGING_ROWS):
        write_staged(rows.slice(offset, STAGING_ROWS), staging)
    seconds = time.perf_counter() - start
    shutil.rmtree(target)
    return round(seconds, 2)


def _config(work: pathlib.Path, folder: pathlib.Path, clip_dir: pathlib.Path, name: str, resume: bool = True):
    out = work / "resume-out" / name
    shutil.rmtree(out, ignore_errors=True)
    raw = {
        "input": {"uri": str(folder)},
        "clip": {"model": {"source": str(clip_dir)}},
        "output": {"uri": str(out), "rows_per_file": 20_000},
        "executor": "ray",
        "resume": resume,
        "staging_rows": STAGING_ROWS,
        "run_date": "2026-12-01",
        "report": {"enabled": False},
    }
    path = work / "resume-out" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path, out


def _start(config) -> subprocess.Popen:
    # A session of its own: killing its group is losing the node (the driver and the Ray it started).
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "-q", "run", str(config[0])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finished(config) -> float:
    start = time.perf_counter()
    process = _start(config)
    _, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"vlpipe run exited {process.returncode}:\n{err[-3000:]}")
    return time.perf_counter() - start


def _stopped(config, rows: int, stop: signal.Signals) -> dict:
    """Run until half the rows are staged, then ``stop`` it: seconds to there, and until it exited."""
    start = time.perf_counter()
    process = _start(config)
    while _staged(config[1]) < rows // 2:
        if process.poll() is not None:
            raise RuntimeError(f"the run ended before half its rows were staged:\n{process.stderr.read()[-3000:]}")
        time.sleep(0.2)
    stopped = time.perf_counter()
    if stop == signal.SIGKILL:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.send_signal(stop)
    process.communicate()
    exited = time.perf_counter()
    subprocess.run([str(pathlib.Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
    return {
        "staged_at_stop": _staged(config[1]),
        "stopped_s": round(exited - start, 1),
        "exit_after_signal_s": round(exited - stopped, 2),
        "exit_code": process.returncode,
    }


def _resumed(config, rows: int) -> dict:
    seconds = _finished(config)
    (record,) = [r for r in read_run_records(str(config[1] / "_vlpipe_runs")).to_pylist() if r["status"] == "succeeded"]
    if record["rows_in"] != rows:
        raise RuntimeError(f"the resumed run has {record['rows_in']} rows, not {rows}")
    return {"resumed_s": round(seconds, 1), "rows_resumed": record["rows_resumed"]}


def _staged(out: pathlib.Path) -> int:
    total = 0
    for path in out.glob("_vlpipe_staging/*/rows/*.parquet"):
        try:
            total += pq.ParquetFile(path).metadata.num_rows
        except (OSError, ValueError):
            continue  # being written
    return total


def format_resume(result: dict | None) -> list[str]:
    if not result:
        return []
    killed, term = result["killed"], result["sigterm"]
    return [
        "",
        f"resume ({result['rows']:,} rows, tiny CLIP on Ray, {result['staging_rows']} rows per staged file):",
        f"  uninterrupted: progress off {result['off_s']} s, on {result['on_s']} s: "
        f"{result['progress_cost']:+.1%} (medians); the staging writes alone: {result['staging_writes_s']} s, "
        f"{result['staging_writes_share']:.1%} of the run",
        f"  SIGKILL at {killed['staged_at_stop']:,} staged rows after {killed['stopped_s']} s, resumed "
        f"({killed['rows_resumed']:,} rows taken over) in {killed['resumed_s']} s: "
        f"x{result['killed_and_resumed_over_uninterrupted']:.3f} an uninterrupted run",
        f"  SIGTERM at {term['staged_at_stop']:,} staged rows: exited {term['exit_after_signal_s']} s later "
        f"(exit {term['exit_code']}); resumed ({term['rows_resumed']:,} rows taken over) in {term['resumed_s']} s",
    ]


if __name__ == "__main__":
    print(json.dumps(resume(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])), indent=2))
