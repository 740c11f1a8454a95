"""A resume takes over only a stopped run's progress (``pipelines.execute.owner``)."""

from __future__ import annotations

import subprocess
import time

from operators.storage import Location, StorageOptions
from pipelines.execute import owner
from pipelines.execute.owner import Heartbeat, Owner, still_running


def test_a_run_on_this_host_runs_while_its_process_lives(tmp_path):
    staging = Location.resolve(str(tmp_path), StorageOptions())
    me = Owner.this_process().to_dict()
    assert still_running({"state": "running", "owner": me}, staging)
    assert not still_running({"state": "stopped", "owner": me}, staging)  # it said so as it stopped
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not still_running({"state": "running", "owner": {**me, "pid": gone.pid}}, staging)  # SIGKILLed
    assert not still_running({"state": "running", "owner": {**me, "started": me["started"] + 1}}, staging)


def test_a_run_on_another_host_runs_while_its_heartbeat_beats(tmp_path, monkeypatch):
    monkeypatch.setattr(owner, "HEARTBEAT_S", 0.1)
    staging = Location.resolve(str(tmp_path), StorageOptions())
    header = {"state": "running", "owner": {"host": "another-host", "pid": 1, "started": 1}}
    beat = Heartbeat(staging)
    try:
        assert still_running(header, staging)
    finally:
        beat.stop()
    time.sleep(0.3)
    assert not still_running(header, staging)  # no clock compared: its beats stopped
