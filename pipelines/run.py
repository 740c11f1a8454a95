"""Execute one run: list shards, build the plan, write, commit, record."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import uuid
from importlib import metadata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.filter import ScoreFilter, top_fraction_threshold
from pipelines.commit import WriteDataFiles, WriteSummary, commit_files, table_version
from pipelines.config import ConfigError, PipelineConfig, check_models
from pipelines.plan import WRITER_NUM_CPUS, build_scored_dataset, fault_point, map_batches_args
from pipelines import logs
from pipelines.nightly import NightlyPlan, plan_nightly
from pipelines.report import write_run_report
from pipelines.runs import RunRecord, append_run_record, read_run_records
from pipelines.shards import Shard, ShardError, check_shards, list_shards

log = logging.getLogger(__name__)

_VERSIONED = ("vlpipe", "ray", "torch", "transformers", "deltalake", "pyarrow", "pillow")


def run_nightly(config: PipelineConfig, *, force: bool = False) -> tuple[NightlyPlan, RunRecord | None]:
    """Process only new or changed shards into the run date's partition (see ``pipelines.nightly``)."""
    check_models(config)
    run_date = config.run_date or _now().date()
    config = config.model_copy(update={"run_date": run_date})
    _, shards = list_shards(config.with_absolute_paths().input.uri, config.storage)
    if not shards:  # else "nothing new" would hide a mistyped glob night after night
        raise ShardError(_no_shards_message(config.input.uri))
    records = read_run_records(config.with_absolute_paths().output.run_records_uri, config.storage)
    plan = plan_nightly(shards, records, run_date, config.hash(), force)
    log.info("nightly %s: %s", run_date, plan.reason)
    if plan.nothing_to_do:
        return plan, None
    return plan, run_pipeline(config, shards=plan.shards)


@logs.run_scope
def run_pipeline(config: PipelineConfig, *, run_id: str | None = None, shards: list[Shard] | None = None) -> RunRecord:
    """Run the configured pipeline once and commit its output; returns the run record.

    ``shards`` restricts the run to these input shards (nightly runs); by default
    every shard under ``input.uri`` is processed.
    """
    import ray

    started = _now()
    config_hash = config.hash()  # of the config as written, so it does not depend on the working directory
    config = config.with_absolute_paths()
    check_models(config)  # before Ray starts or a shard is read
    run_id = run_id or f"{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    logs.bind_run_id(run_id)  # every log line of this run names it, until run_pipeline returns
    run_date = config.run_date or started.date()
    read_version = table_version(config.output.uri, config.storage)
    filesystem, listed = list_shards(config.input.uri, config.storage)
    shards = listed if shards is None else shards
    if not shards:
        raise ShardError(_no_shards_message(config.input.uri))
    checked = check_shards(filesystem, shards, config.input)
    log.info("%d shards from %s (%d unusable)", len(shards), config.input.uri, len(checked.failed))
    if not checked.good:
        error = f"none of the {len(shards)} input shard(s) can be read: " + "; ".join(
            f"{f['uri']}: {f['error']}" for f in checked.failed[:5]) + (" ..." if len(checked.failed) > 5 else "")
        _append_record(config, RunRecord(
            run_id=run_id, run_date=run_date, status="failed", started_at=started, finished_at=_now(),
            config_hash=config_hash, config_json=json.dumps(config.public_dump(), sort_keys=True),
            output_uri=config.output.uri, input_shards=[_shard_row(s) for s in shards],
            failed_shards=checked.failed, error=error,
        ))
        raise ShardError(error)

    if not ray.is_initialized():
        # "local" rather than None: a stale /tmp/ray/ray_current_cluster from an earlier
        # `ray start` must not make a laptop run attach to a dead cluster.
        address = config.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    shard_prefix = shards[0].uri.removesuffix(shards[0].path)
    ds = build_scored_dataset(config, [s.path for s in checked.good], filesystem, shard_prefix)

    threshold = None
    if config.filter.keep_top_fraction is not None:
        # The cut-off depends on every score of the run, so scores are computed once and kept.
        ds = ds.materialize()
        column = config.filter.clip_score_column
        scores = [b.column(column) for b in ds.select_columns([column]).iter_batches(batch_format="pyarrow")]
        values = pc.fill_null(pa.chunked_array(scores, pa.float32()), np.nan).to_numpy() if scores else np.array([])
        threshold = top_fraction_threshold(values, config.filter.keep_top_fraction)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    ds = ds.map_batches(ScoreFilter(config.filter, threshold), **map_batches_args(config.filter.resources, actor=False, cluster_gpus=gpus))

    output = config.output
    extra = _extra_fields(config, checked.schema)
    schema = col.output_schema(extra, include_image_bytes=output.include_image_bytes)
    writer = WriteDataFiles(output.uri, config.storage, schema, run_id, run_date, output.kept_only)
    ds = ds.map_batches(
        writer, batch_size=output.rows_per_file, batch_format="pyarrow", zero_copy_batch=True, num_cpus=WRITER_NUM_CPUS
    )
    summary = WriteSummary()
    for row in ds.iter_rows():
        summary.add(row)
    # Per-stage wall and CPU time of the execution; the benchmark reads it from this log.
    log.debug("Ray Data stats:\n%s", ds.stats())

    models = config.models()
    versions = _versions()
    fault_point("commit")
    version = commit_files(
        output.uri, config.storage, schema, summary, run_date, output.mode, read_version=read_version,
        metadata={
            "vlpipe.run_id": run_id, "vlpipe.config_hash": config_hash,
            "vlpipe.models": json.dumps(models), "vlpipe.version": versions.get("vlpipe", "unknown"),
        },
    )
    outcomes = dict(summary.outcomes)
    record = RunRecord(
        run_id=run_id, run_date=run_date, status="succeeded", started_at=started, finished_at=_now(),
        config_hash=config_hash, config_json=json.dumps(config.public_dump(), sort_keys=True),
        output_uri=output.uri, table_version=version, input_shards=[_shard_row(s) for s in shards],
        failed_shards=checked.failed,
        rows_in=summary.rows_in, rows_kept=outcomes.pop(col.KEPT, 0), rejected_by_reason=outcomes,
        rows_written=summary.rows_written, models=models, versions=versions,
    )
    _append_record(config, record)
    write_run_report(config, record)  # logs a warning and carries on if it cannot
    log.info("committed version %d: %d rows in, %d kept", version, record.rows_in, record.rows_kept)
    return record


def _extra_fields(config: PipelineConfig, shard_schema: pa.Schema) -> list[pa.Field]:
    missing = [n for n in config.input.extra_columns if n not in shard_schema.names]
    if missing:
        raise ConfigError(f"input.extra_columns not found in the shards: {', '.join(missing)}")
    return [shard_schema.field(name) for name in config.input.extra_columns]


def _append_record(config: PipelineConfig, record: RunRecord, attempts: int = 3) -> None:
    """Append the run record, surviving a lost answer: deltalake does not retry a conditional put."""
    uri = config.output.run_records_uri
    for attempt in range(attempts):
        try:
            append_run_record(uri, config.storage, record)
            return
        except OSError:
            if record.run_id in read_run_records(uri, config.storage).column("run_id").to_pylist():
                return  # it landed; only the answer was lost
            if attempt == attempts - 1:
                raise
            log.warning("appending the run record failed; trying again")


def _no_shards_message(uri: str) -> str:
    return (f"no Parquet shards found at input.uri {uri!r}: the prefix, directory or glob matches no "
            "*.parquet file (names starting with '_' or '.' are skipped)")


def _shard_row(shard: Shard) -> dict:
    return {"uri": shard.uri, "size": shard.size, "mtime": shard.mtime}


def _versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
