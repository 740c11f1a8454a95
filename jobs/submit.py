"""``vlpipe submit``: run a config as a Ray job on a cluster, through the Job Submission API.

The working directory (code and configs) ships with the job; the cluster's image
provides the dependencies. Ray's token authentication stays on: the client reads
the token the standard Ray way (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token`` with ``RAY_AUTH_MODE=token``) and sends it as a header; it
is never printed. Storage credentials are never put into the job's runtime_env,
where the dashboard would show them: the cluster's nodes get them from their own
environment (Kubernetes secrets, instance roles).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import TextIO

from pipelines.config import ConfigError, load_config
from pipelines.errors import UnreachableError
from pipelines.plan.build import check_stages

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Never uploaded: environments, caches and outputs of local runs.
EXCLUDES = [".venv", ".git", ".cache", "out", "**/__pycache__", ".pytest_cache", "*.egg-info"]


def job_client(address: str | None):
    """A Job Submission client; ``None`` uses ``RAY_ADDRESS`` like the ``ray job`` CLI."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, OSError, RuntimeError, ValueError) as err:  # Ray wraps refusals in ConnectionError
        where = address or os.environ.get("RAY_ADDRESS") or "(no address: set --address or RAY_ADDRESS)"
        cause = " ".join(str(err).split())
        raise UnreachableError(f"cannot reach the Ray cluster {where}: {cause[:300]}") from err


def entrypoint(config_path: str, *, nightly: bool, run_date: str | None, overrides: list[str], force: bool) -> str:
    """The command the job runs on the cluster, relative to the shipped working directory."""
    command = ["python", "-m", "jobs.cli", "nightly" if nightly else "run", config_path]
    for item in overrides:
        command += ["--set", item]
    if run_date:
        command += ["--date" if nightly else "--run-date", run_date]
    if force:
        command.append("--force")
    return shlex.join(command)


def submit(
    config_path: str,
    *,
    address: str | None,
    nightly: bool = False,
    run_date: str | None = None,
    overrides: list[str] = (),
    force: bool = False,
    working_dir: str = ".",
    wait: bool = True,
    out: TextIO = sys.stdout,
) -> int:
    """Validate locally, submit, stream the logs and return the exit code of the job's outcome."""
    config = load_config(config_path, list(overrides))  # fail here, not after the cluster has started work
    check_stages(config)
    if any(getattr(config.storage, name) for name in ("access_key_id", "secret_access_key", "session_token")):
        raise ConfigError(
            "storage credentials are set in the config; a submitted job would carry them in plain text. "
            "Give the cluster's nodes AWS_* environment variables from a secret (or an instance role) instead"
        )
    root = Path(working_dir).resolve()
    try:
        relative = Path(config_path).resolve().relative_to(root)
    except ValueError:
        raise ConfigError(
            f"{config_path} is outside the working directory {root}, so it would not ship with the job"
        ) from None
    client = job_client(address)
    job_id = f"vlpipe-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    client.submit_job(
        entrypoint=entrypoint(
            str(relative), nightly=nightly, run_date=run_date, overrides=list(overrides), force=force
        ),
        submission_id=job_id,
        runtime_env={"working_dir": str(root), "excludes": EXCLUDES},
        metadata={"vlpipe.config": str(relative), "vlpipe.config_hash": config.hash()},
    )
    print(f"submitted {job_id}", file=out, flush=True)
    if not wait:
        return 0
    return follow(client, job_id, out)


def follow(client, job_id: str, out: TextIO) -> int:
    """Stream a job's logs until it ends; 0 if it succeeded."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    while (status := client.get_job_status(job_id).value) not in TERMINAL:
        time.sleep(1)
    info = client.get_job_info(job_id)
    print(
        f"job {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""),
        file=out,
        flush=True,
    )
    return 0 if status == "SUCCEEDED" else 1


def status(job_id: str, address: str | None, out: TextIO = sys.stdout) -> int:
    info = job_client(address).get_job_info(job_id)
    print(f"{job_id} {info.status}" + (f": {info.message}" if info.message else ""), file=out)
    return 0


def stop(job_id: str, address: str | None, out: TextIO = sys.stdout) -> int:
    stopped = job_client(address).stop_job(job_id)
    print(f"{job_id} {'stopping' if stopped else 'was not running'}", file=out)
    return 0
