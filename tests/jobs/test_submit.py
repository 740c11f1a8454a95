"""``vlpipe submit`` against a real two-node Ray cluster with token authentication on."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from deltalake import DeltaTable

from jobs.submit import entrypoint
from pipelines.config import ConfigError

VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def node_ports() -> list[str]:
    agent, agent_grpc, metrics, runtime_env, manager, objects = free_ports(6)
    return [
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={manager}",
        f"--object-manager-port={objects}",
    ]


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """A head (ray start --head, token auth, loopback) and one joined worker node, 1 CPU each."""
    token = secrets.token_hex(32)
    # Not the test session's own settings either (its fault-injection hook lives in tests/, which a job lacks).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "VLPIPE_"))}
    env.update(
        PATH=f"{VENV_BIN}:{env['PATH']}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        # The nodes' own environment carries the storage credentials, as a Kubernetes secret would.
        AWS_ACCESS_KEY_ID=s3.access_key_id,
        AWS_SECRET_ACCESS_KEY=s3.secret_access_key,
    )
    gcs, dashboard = free_ports(2)
    ray = str(VENV_BIN / "ray")
    logs = tmp_path_factory.mktemp("ray-nodes")
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=1",
            "--include-dashboard=true",
            # Its own temp dir keeps /tmp/ray/ray_current_cluster from pointing later runs at this cluster.
            f"--temp-dir={tempfile.mkdtemp(prefix='rayh')}",
            *node_ports(),
        ],
        env=env,
        stdout=open(logs / "head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    nodes = [head]
    try:
        wait_for(lambda: _http_ok(address), "the head's dashboard", logs / "head.log")
        nodes.append(
            subprocess.Popen(
                [
                    ray,
                    "start",
                    "--block",
                    f"--address=127.0.0.1:{gcs}",
                    "--node-ip-address=127.0.0.1",
                    "--num-cpus=1",
                    # Its own temp dir: two nodes on one host must not clean up each other's job packages.
                    f"--temp-dir={tempfile.mkdtemp(prefix='rayw')}",
                    *node_ports(),
                ],
                env=env,
                stdout=open(logs / "worker.log", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        wait_for(lambda: len(alive_nodes(address, env)) == 2, "the worker node to join", logs / "worker.log")
        yield address, env
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5  # one grace period for both nodes, not one each
        for node in nodes:
            try:
                node.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()


def _http_ok(address: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # it answers (401 without a token): it is up
    except OSError:
        return False


def wait_for(check, what: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def state_query(address: str, env: dict, code: str):
    """Ask the cluster's state API from a separate process that authenticates like a user shell."""
    out = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        state_query.last_error = out.stderr[-2000:]
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def alive_nodes(address: str, env: dict):
    code = (
        "import sys, json; from ray.util.state import list_nodes; "
        "print(json.dumps([n.node_id for n in list_nodes(address=sys.argv[1]) if n.state == 'ALIVE']))"
    )
    return state_query(address, env, code) or []


def vlpipe(*args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "vlpipe"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=400
    )


def write_config(folder: Path, s3, tiny_clip_dir, **sections) -> Path:
    raw = {
        "input": {"uri": "s3://raw/crawl/"},
        "storage": {"endpoint_url": s3.endpoint_url, "region": s3.region},
        "clip": {"model": {"source": str(tiny_clip_dir)}, "resources": {"num_cpus": 0.5}},
        "decode": {"resources": {"num_cpus": 0.5}},
        "output": {"uri": "s3://submitted/t"},
        "run_date": "2026-11-10",
        **sections,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_submit_runs_on_both_nodes_and_commits_to_s3(cluster, s3, s3_input, local_shards, tiny_clip_dir, tmp_path):
    address, env = cluster
    s3.create_bucket("submitted")
    write_config(tmp_path, s3, tiny_clip_dir)
    done = vlpipe("submit", "config.yaml", "--address", address, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.split("submitted ", 1)[1].split()[0]
    assert f"job {job_id} SUCCEEDED" in done.stdout and "rows in" in done.stdout  # the job's own summary, streamed
    assert env["RAY_AUTH_TOKEN"] not in done.stdout + done.stderr
    assert s3.secret_access_key not in done.stdout + done.stderr

    code = (
        "import sys, json; from ray.job_submission import JobSubmissionClient; from ray.util.state import list_tasks; "
        f"job = JobSubmissionClient(sys.argv[1]).get_job_info({job_id!r}).job_id; "
        "tasks = list_tasks(address=sys.argv[1], filters=[('job_id', '=', job)], limit=10000, detail=True); "
        "print(json.dumps(sorted({t.node_id for t in tasks if t.node_id})))"
    )
    nodes = state_query(address, env, code)
    assert nodes is not None, state_query.last_error
    assert len(nodes) == 2  # Ray Data spread the work over both nodes

    storage = {**s3.delta_storage_options()}
    table = DeltaTable("s3://submitted/t", storage_options=storage).to_pyarrow_table()
    assert sorted(table.column("key").to_pylist()) == sorted(local_shards[3])
    status = vlpipe("status", job_id, "--address", address, env=env, cwd=tmp_path)
    assert f"{job_id} SUCCEEDED" in status.stdout


@pytest.mark.slow
def test_a_failing_job_makes_submit_exit_non_zero_with_its_error(cluster, s3, tiny_clip_dir, tmp_path):
    address, env = cluster
    config = write_config(tmp_path, s3, tiny_clip_dir, clip={"model": {"source": "/nonexistent/clip-model"}})
    done = vlpipe("submit", config.name, "--address", address, env=env, cwd=tmp_path)
    assert done.returncode == 1
    assert "FAILED" in done.stdout and "model directory not found: /nonexistent/clip-model" in done.stdout


def test_credentials_in_the_config_are_refused_before_submitting(tmp_path):
    from jobs.submit import submit

    (tmp_path / "c.yaml").write_text(
        "input: {uri: s3://b/x}\nclip: {model: {source: m}}\noutput: {uri: s3://b/o}\n"
        "storage: {secret_access_key: planted-secret}\n"
    )
    with pytest.raises(ConfigError, match="plain text") as err:
        submit(str(tmp_path / "c.yaml"), address="http://127.0.0.1:1", working_dir=str(tmp_path))
    assert "planted-secret" not in str(err.value)


def test_a_plan_whose_columns_do_not_fit_is_refused_before_submitting(tmp_path):
    from jobs.submit import submit

    (tmp_path / "c.yaml").write_text(  # the models live on the cluster: only the columns are checked here
        "input: {uri: s3://b/x}\nclip: {model: {source: org/clip}}\noutput: {uri: s3://b/o}\n"
        "filter: {min_itm_score: 0.5}\n"
    )
    with pytest.raises(ConfigError, match="stage 'filter' reads column.* itm_score.*needs an itm: section"):
        submit(str(tmp_path / "c.yaml"), address="http://127.0.0.1:1", working_dir=str(tmp_path))


def test_the_job_entrypoint_reruns_the_same_command_on_the_cluster():
    assert entrypoint(
        "configs/x.yaml", nightly=True, run_date="2026-11-01", overrides=["filter.min_clip_score=0.2"], force=False
    ) == ("python -m jobs.cli nightly configs/x.yaml --set filter.min_clip_score=0.2 --date 2026-11-01")
