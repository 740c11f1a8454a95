"""Nightly incremental vlpipe run, scheduled by Airflow and executed as a Ray job.

Each day Airflow submits ``vlpipe nightly /etc/vlpipe/config.yaml --date {{ ds }}`` to the long-running
Ray cluster of ``deploy/kuberay/raycluster.yaml`` through the Ray Job Submission API, waits for the
job, copies its logs into the task log, and fails the DAG run unless the Ray job SUCCEEDED.

Operator: ``RaySubmitJobOperator`` from ``apache-airflow-providers-google`` (checked against
22.8.0, module ``airflow.providers.google.cloud.operators.ray``). Despite the package name it talks
to any Ray dashboard address through ``ray.job_submission.JobSubmissionClient``; only addresses
on ``*.aiplatform-training.googleusercontent.com`` are treated as Vertex AI. (Astronomer's
``astro-provider-ray`` ``SubmitRayJob`` is discontinued, and there is no
``apache-airflow-providers-ray`` package.)

Setup on the Airflow side:

* ``pip install "apache-airflow-providers-google>=22.8" "ray[default]==2.60.0"`` (match the
  cluster's Ray version).
* The provider's hook looks up an Airflow connection when it is created, even though a plain
  ``http://...:8265`` address needs no Google credentials. Define an empty one, e.g.
  ``AIRFLOW_CONN_VLPIPE_RAY='{"conn_type": "google_cloud_platform"}'``.
* Ray token authentication: give the Airflow workers ``RAY_AUTH_MODE=token`` and
  ``RAY_AUTH_TOKEN`` (from the ``vlpipe-ray-token`` Secret, key ``auth_token``), or
  ``RAY_AUTH_TOKEN_PATH`` pointing at the mounted key. Ray's client sends the token only when
  ``RAY_AUTH_MODE=token`` is set. Never put the token or S3 keys in ``runtime_env``.
* ``{{ ds }}`` is the run's logical date: with Airflow 3's default cron timetable that is the day
  the run starts; with Airflow 2 it is the start of the data interval (the day before).

The operator itself does not fail when the Ray job ends FAILED or STOPPED (it only waits for a
terminal state), hence the ``fail_unless_succeeded`` task after it.
"""

from __future__ import annotations

import datetime as dt

from airflow import DAG
from airflow.providers.google.cloud.hooks.ray import RayJobHook
from airflow.providers.google.cloud.operators.ray import RaySubmitJobOperator

try:  # Airflow 3
    from airflow.sdk import task
except ImportError:  # Airflow 2.x
    from airflow.decorators import task

# Dashboard of deploy/kuberay/raycluster.yaml (KubeRay's head Service, port 8265), seen from Airflow.
RAY_ADDRESS = "http://vlpipe-ray-head-svc.vlpipe.svc.cluster.local:8265"
# An empty google_cloud_platform connection; see the module docstring.
CONN_ID = "vlpipe_ray"
# Runs on the Ray head pod, where the ConfigMap is mounted.
ENTRYPOINT = "vlpipe nightly /etc/vlpipe/config.yaml --date {{ ds }}"


@task
def fail_unless_succeeded(job_id: str) -> None:
    """Fail the task unless the Ray job reached SUCCEEDED."""
    status = RayJobHook(gcp_conn_id=CONN_ID).get_job_status(job_id=job_id, cluster_address=RAY_ADDRESS)
    status = getattr(status, "value", status)
    if status != "SUCCEEDED":
        raise RuntimeError(f"Ray job {job_id} ended {status}; see the Ray dashboard at {RAY_ADDRESS}")


with DAG(
    dag_id="vlpipe_nightly",
    description="Incremental vlpipe run: new/changed shards into the day's Delta partition",
    schedule="30 2 * * *",  # daily, 02:30 UTC
    start_date=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,  # never two nightly runs on the cluster at once
    default_args={"owner": "data-platform", "retries": 0},
    tags=["vlpipe", "ray"],
    doc_md=__doc__,
):
    submit = RaySubmitJobOperator(
        task_id="submit_nightly",
        cluster_address=RAY_ADDRESS,
        entrypoint=ENTRYPOINT,
        # Unique per attempt (Ray rejects a reused submission id) and readable in the dashboard.
        submission_id="vlpipe-nightly-{{ ds_nodash }}-try{{ ti.try_number }}",
        metadata={"pipeline": "vlpipe", "schedule": "nightly"},
        wait_for_job_done=True,
        get_job_logs=True,
        submit_job_timeout=6 * 60 * 60,  # the operator's default is only 30 minutes
        gcp_conn_id=CONN_ID,
        execution_timeout=dt.timedelta(hours=7),
    )
    fail_unless_succeeded(submit.output)
