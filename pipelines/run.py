"""One run, start to end: whatever ends it, exactly one run record says how.

``run_pipeline`` lists and checks the shards, builds and checks the plan, runs it
on Ray, commits the written files in one Delta transaction and appends the run
record. A failure anywhere (no usable shard, a model that cannot load, a
concurrent commit, a Ray error, SIGINT/SIGTERM) still appends a record, with the
status and the error, before the error goes on to the caller; the rows it staged stay,
and the next run of the same date, config and inputs resumes from them
(``pipelines.execute.progress``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata

from operators import schema as col
from operators.endpoint.usage import account
from operators.storage import Location
from pipelines import hooks, logs
from pipelines.config import PipelineConfig, check_models
from pipelines.errors import Interrupted, NoInputError, PlanError
from pipelines.execute.executor import Executor, execute
from pipelines.execute.local import LocalExecutor, gpu_shortfall, in_process_reason
from pipelines.execute.progress import Progress, RunKey, find_progress, staging_of
from pipelines.execute.source import Source, parquet_source
from pipelines.input.nightly import NightlyPlan, plan_nightly
from pipelines.input.shards import WEBDATASET, Shard, ShardCheck, check_shards, choose_format, list_shards
from pipelines.input.tars import check_tar_shards, tar_blocks
from pipelines.plan.build import Plan, build_plan, check_locations
from pipelines.plan.describe import describe
from pipelines.report.report import write_run_report
from pipelines.table.commit import commit_files, run_committed, table_version
from pipelines.table.datafile import remove_run_files
from pipelines.table.records import RunRecord, append_run_record, read_run_records
from pipelines.table.supersede import Supersede
from pipelines.table.write import WriteSummary

log = logging.getLogger(__name__)

_VERSIONED = ("vlpipe", "ray", "torch", "transformers", "deltalake", "pyarrow", "pillow")
# Record statuses; `vlpipe runs` shows them, the CLI's exit code agrees with them.
SUCCEEDED, PARTIAL, FAILED, INTERRUPTED = "succeeded", "partial", "failed", "interrupted"


@dataclass
class Run:
    """What a run knows so far: enough for its record, however it ends."""

    config: PipelineConfig
    config_hash: str
    run_id: str
    run_date: dt.date
    started: dt.datetime
    input: Location
    output: Location
    runs: Location
    shards: list[Shard] = field(default_factory=list)
    failed_shards: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, logged at the end
    progress: Progress | None = None  # its staging area, once the shards are known
    rows_resumed: int = 0

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)

    def record(self, status: str, **fields) -> RunRecord:
        return RunRecord(
            run_id=self.run_id,
            run_date=self.run_date,
            status=status,
            started_at=self.started,
            finished_at=_now(),
            config_hash=self.config_hash,
            config_json=json.dumps(self.config.public_dump(), sort_keys=True),
            output_uri=self.output.uri,
            input_shards=[_shard_row(s) for s in self.shards],
            failed_shards=self.failed_shards,
            rows_resumed=self.rows_resumed,
            **fields,
        )


def run_nightly(
    config: PipelineConfig, *, force: bool = False, fresh: bool = False
) -> tuple[NightlyPlan, RunRecord | None]:
    """Process only new or changed shards into the run date's partition (see ``pipelines.input.nightly``)."""
    check_models(config)
    run_date = config.run_date or _now().date()
    config = config.model_copy(update={"run_date": run_date})
    absolute = config.with_absolute_paths()
    _, shards = choose_format(list_shards(Location.resolve(absolute.input.uri, config.storage)), config.input.format)
    if not shards:  # else "nothing new" would hide a mistyped glob night after night
        raise NoInputError(_no_shards_message(config.input.uri))
    records = read_run_records(Location.resolve(absolute.output.run_records_uri, config.storage))
    plan = plan_nightly(shards, records, run_date, config.hash(), force)
    log.info("nightly %s: %s", run_date, plan.reason)
    if plan.nothing_to_do:
        return plan, None
    return plan, run_pipeline(config, shards=plan.shards, fresh=fresh)


def start_run(config: PipelineConfig, run_id: str | None = None) -> Run:
    """Resolve the run's places once and refuse what would fail later (before Ray or any shard)."""
    started = _now()
    config_hash = config.hash()  # of the config as written, so it does not depend on the working directory
    config = config.with_absolute_paths()
    check_models(config)
    storage = config.storage
    run = Run(
        config=config,
        config_hash=config_hash,
        run_id=run_id or f"{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}",
        run_date=config.run_date or started.date(),
        started=started,
        input=Location.resolve(config.input.uri, storage),
        output=Location.resolve(config.output.uri, storage),
        runs=Location.resolve(config.output.run_records_uri, storage),
    )
    check_locations(run.input, run.output, run.runs)
    return run


@logs.run_scope
def run_pipeline(
    config: PipelineConfig, *, run_id: str | None = None, shards: list[Shard] | None = None, fresh: bool = False
) -> RunRecord:
    """Run the configured pipeline once and commit its output; returns the run record.

    ``shards`` restricts the run to these input shards (nightly runs); by default
    every shard under ``input.uri`` is processed. A run that an earlier attempt of the same
    date, config and inputs left unfinished resumes it, unless ``fresh``.
    """
    run = start_run(config, run_id)
    logs.bind_run_id(run.run_id)  # every log line of this run names it, until run_pipeline returns
    try:
        record = _run(run, shards, fresh)
    except BaseException as err:
        interrupted = isinstance(err, (KeyboardInterrupt, Interrupted))
        _leave_progress(run)
        _append_record(run, run.record(INTERRUPTED if interrupted else FAILED, error=_error_text(err)))
        raise
    with run.phase("record_and_report"):
        _append_record(run, record)
        write_run_report(run.config, record)  # logs a warning and carries on if it cannot
    log.info(
        "timings: %s",
        ", ".join(f"{name} {seconds:.2f} s" for name, seconds in run.timings.items()),
        extra={"timings": dict(run.timings)},
    )
    log.info("committed version %d: %d rows in, %d kept", record.table_version, record.rows_in, record.rows_kept)
    return record


def explain(config: PipelineConfig) -> str:
    """What ``vlpipe run`` would do, without running it: reads the listing and footers, nothing else."""
    run = start_run(config, run_id="<run id>")
    input_format, shards = choose_format(list_shards(run.input), config.input.format)
    if not shards:
        raise NoInputError(_no_shards_message(config.input.uri))
    checked = check_input(run.input.filesystem, shards, run.config, input_format)
    plan = build_plan(
        run.config,
        run.output,
        run_id=run.run_id,
        run_date=run.run_date,
        shard_schema=checked.schema,
        shard_prefix=shards[0].uri.removesuffix(shards[0].path),
        shard_count=len(checked.good),
        input_format=input_format,
        input_rows=checked.rows,
    )
    unusable = f", {len(checked.failed)} unusable" if checked.failed else ""
    rows = f"{checked.rows:,} rows in " if checked.rows is not None else ""
    return (
        f"plan of a run into {run.output.uri} (run_date={run.run_date}; {rows}{len(shards)} shard(s)"
        f"{unusable})\n\n" + describe(plan, *_planned_executor(run.config, plan))
    )


def _planned_executor(config: PipelineConfig, plan: Plan) -> tuple[Executor, str | None]:
    """The executor a run would get, without starting it: a Ray not yet started is this machine's local one."""
    in_process = in_process_reason(config, plan.input_rows)
    if in_process:
        return LocalExecutor(), in_process
    from pipelines.execute.ray import RayExecutor, default_gpu_share

    return RayExecutor({"CPU": float(os.cpu_count() or 1)}, plan.input_rows, default_gpu_share(plan.passes)), None


def _run(run: Run, only: list[Shard] | None, fresh: bool) -> RunRecord:
    config = run.config
    with run.phase("list_and_check_shards"):
        read_version = table_version(run.output)
        input_format, listed = choose_format(list_shards(run.input), config.input.format)
        run.shards = listed if only is None else only
        if not run.shards:
            raise NoInputError(_no_shards_message(config.input.uri))
        checked = check_input(run.input.filesystem, run.shards, config, input_format)
    run.failed_shards = checked.failed
    log.info("%d shards from %s (%d unusable)", len(run.shards), config.input.uri, len(checked.failed))
    if not checked.good:
        raise NoInputError(_unreadable_message(run.shards, checked.failed))
    with run.phase("progress"):
        run.progress = _progress(run, checked, fresh)
    prefix = run.shards[0].uri.removesuffix(run.shards[0].path)
    with run.phase("plan"):
        plan = build_plan(
            config,
            run.output,
            run_id=run.run_id,
            run_date=run.run_date,
            shard_schema=checked.schema,
            shard_prefix=prefix,
            shard_count=len(checked.good),
            input_format=input_format,
            input_rows=checked.rows,
        )
    executor = _executor(run, plan)
    summary = WriteSummary()
    with run.phase("execute"):
        start = time.perf_counter()
        source = _source(plan, config, run.input, checked, run.progress)
        execution = execute(executor, list(plan.passes), source, run.progress)
        for row in execution.rows:
            # Until the first file is written: actors started, models loaded, the pipeline filled.
            run.timings.setdefault("execute_until_first_file", round(time.perf_counter() - start, 3))
            summary.add(row)
    for outcome in execution.decided:  # inside execute: the first pass was already running while it read
        run.timings[f"{outcome.name}_decision"] = outcome.seconds
    with run.phase("commit"):
        metadata = _commit_metadata([d.state for d in execution.decided])
        record = _commit(run, plan, summary, read_version, checked.good, metadata)
    run.progress.remove()
    return record


def _progress(run: Run, checked: ShardCheck, fresh: bool) -> Progress:
    """The run's staging area: an earlier attempt's, whose run id the run takes over, or a new one."""
    key = RunKey.of(run.run_date, run.config_hash, [_shard_row(s) for s in run.shards])
    found = None
    if run.config.resume:
        found = find_progress(run.output, key, partial(run_committed, run.output), fresh)
    if found is not None and not found.staged:
        found.remove()  # it stopped before staging a row: nothing to take over
        found = None
    if found is None:
        progress = Progress(staging_of(run.output, run.run_id), run.run_id)
    else:
        progress, run.run_id, run.rows_resumed = found, found.run_id, found.rows_done
        logs.bind_run_id(run.run_id)
        remove_run_files(run.output, run.run_date, run.run_id)  # its last pass's files: written again
        total = f" of {checked.rows:,}" if checked.rows else ""
        log.info("resuming run %s: %s%s rows already done", run.run_id, f"{found.rows_done:,}", total)
    if run.config.resume:
        progress.start(key)
    return progress


def _leave_progress(run: Run) -> None:
    """A run that stops keeps its staged rows for the next attempt (resumable runs); else they go."""
    if run.progress is None:
        return
    if run.config.resume:
        run.progress.stop()
        log.info(
            "the staged rows stay in %s: the next run of this config and input resumes there "
            "(vlpipe run --fresh starts over)",
            run.progress.staging.uri,
        )
    else:
        run.progress.remove()


def check_input(fs, shards: list[Shard], config: PipelineConfig, input_format: str) -> ShardCheck:
    """The shards a run can read (footers, or tar heads and ends), before Ray starts."""
    if input_format == WEBDATASET:
        return check_tar_shards(fs, shards, config.input.webdataset, tuple(s for s, _ in config.input.extra_pairs))
    return check_shards(fs, shards, config.input.mapping_for(input_format))


def _source(plan: Plan, config: PipelineConfig, input_: Location, checked: ShardCheck, progress: Progress) -> Source:
    """The input shards' rows, less those an earlier attempt of the run staged."""
    paths = [s.path for s in checked.good]
    if plan.input_format == WEBDATASET:
        source = Source(
            tuple(paths),
            partial(tar_blocks, input_.filesystem, config.input.webdataset, checked.schema),
            "ReadTar",
            with_path=True,
        )
    else:
        source = parquet_source(paths, input_.filesystem, list(plan.input_columns.read), with_path=True)
    if not progress.done:
        return source
    path_of = {s.uri: s.path for s in checked.good}
    done = {path_of[uri]: ranges for uri, ranges in progress.done.items() if uri in path_of}
    complete = {path_of[uri] for uri, n in checked.shard_rows.items() if progress.done.get(uri) == ((0, n),)}
    return source.without(done, complete)


def _commit_metadata(states: list) -> dict[str, str]:
    """What the whole-run stages want recorded with the commit (dedup: the centroids its rows were clustered with)."""
    metadata: dict[str, str] = {}
    for state in states:
        metadata.update(getattr(state, "commit_metadata", {}))
    return metadata


def _commit(
    run: Run,
    plan: Plan,
    summary: WriteSummary,
    read_version: int | None,
    processed: list[Shard],
    extra_metadata: dict[str, str],
) -> RunRecord:
    config, models, versions = run.config, run.config.models(), _versions()
    hooks.reach("commit")
    # Read now, not at the start: a run of another date that processed the same shards meanwhile is in them.
    supersede = Supersede.from_records(processed, read_run_records(run.runs), run.run_date)
    commit = commit_files(
        run.output,
        plan.output_schema,
        summary,
        run.run_date,
        config.output.mode,
        read_version=read_version,
        supersede=supersede,
        metadata={
            "vlpipe.run_id": run.run_id,
            "vlpipe.config_hash": run.config_hash,
            "vlpipe.models": json.dumps(models),
            "vlpipe.version": versions.get("vlpipe", "unknown"),
            **extra_metadata,
        },
    )
    outcomes = dict(summary.outcomes)
    record = run.record(
        PARTIAL if run.failed_shards else SUCCEEDED,
        table_version=commit.version,
        rows_in=summary.rows_in,
        rows_kept=outcomes.pop(col.KEPT, 0),
        rejected_by_reason=outcomes,
        rows_written=summary.rows_written,
        rows_superseded=commit.rows_superseded,
        models=models,
        versions=versions,
    )
    record.endpoints = _endpoints(config, summary, record.duration_s)
    return record


def _endpoints(config: PipelineConfig, summary: WriteSummary, seconds: float) -> dict[str, dict]:
    """Each served stage's requests, retries, tokens, requests per second over the run, and cost."""
    accounts = {}
    for section, counts in summary.usage.items():
        served = getattr(getattr(config, section), "endpoint", None)
        if served is None:
            continue
        accounts[section] = account(counts, served.model, seconds, served.prices)
    return accounts


def _executor(run: Run, plan: Plan) -> Executor:
    """In this process where the run is small and no cluster is given, else Ray; the plan is logged."""
    config = run.config
    in_process = in_process_reason(config, plan.input_rows)
    if in_process:
        if short := gpu_shortfall(list(plan.passes), in_process):
            raise PlanError(short)
        executor = LocalExecutor()
    else:
        with run.phase("ray_start"):
            from pipelines.execute.ray import start_ray

            executor = start_ray(
                config.ray_address,
                config.ray_dashboard,
                list(plan.passes),
                config.ray_resource_timeout_s,
                plan.input_rows,
            )
    log.info("plan:\n%s", describe(plan, executor, in_process))
    return executor


def _append_record(run: Run, record: RunRecord, attempts: int = 3) -> None:
    """Append the run record, surviving a lost answer: deltalake does not retry a conditional put."""
    for attempt in range(attempts):
        try:
            append_run_record(run.runs, run.config.storage, record)
            return
        except OSError as err:
            try:
                landed = read_run_records(run.runs).select(["run_id", "finished_at"]).to_pylist()
                if {"run_id": record.run_id, "finished_at": record.finished_at} in landed:
                    return  # it landed; only the answer was lost (a resumed run's id has earlier records)
            except OSError:
                pass
            if attempt == attempts - 1:
                if record.status in (SUCCEEDED, PARTIAL):
                    raise
                log.error("could not append the %s run record to %s: %s", record.status, run.runs.uri, err)
                return
            log.warning("appending the run record failed; trying again")


def _error_text(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    text = str(err).strip() or type(err).__name__
    return text if len(text) < 4000 else text[:2000] + " ... " + text[-1500:]


def _no_shards_message(uri: str) -> str:
    return (
        f"no Parquet shards found at input.uri {uri!r}: the prefix, directory or glob matches no "
        "*.parquet or *.tar file (names starting with '_' or '.' are skipped)"
    )


def _unreadable_message(shards: list[Shard], failed: list[dict]) -> str:
    listed = "; ".join(f"{f['uri']}: {f['error']}" for f in failed[:5])
    return f"none of the {len(shards)} input shard(s) can be read: {listed}" + (" ..." if len(failed) > 5 else "")


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
