"""``vlpipe export``: one version of the table as training-ready shards.

The driver reads only the small columns of the chosen partitions (key, source_shard,
run_id, status, keep), orders the rows to export by (run_date, source_shard, key),
cuts them into shards of ``samples_per_shard`` and starts one Ray task per shard
(``pipelines.export.shards``); the tasks read the rows' columns and images and write
the files, the driver holds row references and counts, never an image. Then it removes
what an earlier export into the same URI left and writes ``_manifest.json`` last
(``pipelines.export.files``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from importlib import metadata as package_metadata
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from operators import schema as col
from operators.storage import Location, StorageOptions, is_remote, local_path
from pipelines import hooks
from pipelines.config import default_run_records_uri
from pipelines.errors import ConfigError, NoInputError, VlpipeError
from pipelines.export.files import (
    ExportedShard,
    ExportManifest,
    clear_manifest,
    embedding_files,
    publish,
    remove_stale,
    shard_name,
    stats,
)
from pipelines.export.samples import occurrences, sample_name, scalar_fields
from pipelines.export.shards import FILE, NAME, ROW, ExportContext, ShardJob, write_shard
from pipelines.input.images import ImageSource
from pipelines.search.index import TableSlice
from pipelines.table.read import delta_dataset

log = logging.getLogger(__name__)

ORDER = [
    (col.RUN_DATE, "ascending"),
    (col.SOURCE_SHARD, "ascending"),
    (col.KEY, "ascending"),
    (FILE, "ascending"),
    (ROW, "ascending"),
]
_INDEX_COLUMNS = [col.KEY, col.SOURCE_SHARD, col.RUN_ID, col.STATUS, col.KEEP]


class ExportRequest(BaseModel):
    """What to export and how; by default the kept rows of every partition at the latest version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["webdataset", "parquet"] = "webdataset"
    run_dates: tuple[dt.date, ...] = ()  # empty: every partition
    version: int | None = Field(None, ge=0)  # None: the latest
    all_rows: bool = False  # rejected rows too
    samples_per_shard: int = Field(10_000, ge=1)
    embeddings: bool = False  # also img_emb/, text_emb/, metadata/ (clip-retrieval's layout)


def export(
    table_uri: str,
    to_uri: str,
    request: ExportRequest = ExportRequest(),
    *,
    storage: StorageOptions = StorageOptions(),
    runs_uri: str | None = None,
    progress: bool = False,
) -> ExportManifest:
    """Export the table at ``table_uri`` to ``to_uri`` as ``request`` says; returns the manifest written."""
    started, clock = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    storage = storage.resolved()  # once, here: the tasks then need no environment of their own
    table, target = Location.resolve(table_uri, storage), Location.resolve(to_uri, storage)
    if table.contains(target):
        raise ConfigError(f"--to {to_uri}: inside the table {table_uri}; export somewhere else")
    chosen = TableSlice.open(table, request.version, request.run_dates)
    rows = _rows_to_export(chosen, table, request.all_rows)
    context = _context(chosen, target, request, storage, runs_uri, rows)
    jobs = [
        ShardJob(n, rows.slice(start, stop - start))
        for n, (start, stop) in enumerate(split(rows.num_rows, request.samples_per_shard))
    ]
    log.info(
        "export %s: %d %s of %s version %d in %d %s shard(s)",
        target.uri,
        rows.num_rows,
        "rows" if request.all_rows else "kept rows",
        table.uri,
        chosen.version,
        len(jobs),
        request.format,
    )
    clear_manifest(target)
    shards = run_jobs(context, jobs, progress)
    hooks.reach("export:written")
    removed = remove_stale(target, {name for shard in shards for name in shard.files})
    if removed:
        log.info("export %s: removed %d file(s) of an earlier export", target.uri, len(removed))
    manifest = _manifest(table, chosen, request, rows, shards, clock)
    publish(target, manifest, stats(manifest, started))
    log.info("export %s: %d samples, %d shard(s), %.1f s", target.uri, manifest.samples, len(shards), manifest.seconds)
    return manifest


def _rows_to_export(chosen: TableSlice, table: Location, all_rows: bool) -> pa.Table:
    rows = plan_rows(chosen, all_rows)
    if rows.num_rows == 0:
        raise NoInputError(
            f"no {'row' if all_rows else 'kept row'} to export in {table.uri} (version "
            f"{chosen.version}){'' if all_rows else '; --all-rows exports rejected rows too'}"
        )
    return rows


def _manifest(
    table: Location,
    chosen: TableSlice,
    request: ExportRequest,
    rows: pa.Table,
    shards: list[ExportedShard],
    clock: float,
) -> ExportManifest:
    return ExportManifest(
        export_format=request.format,
        table_uri=table.uri if is_remote(table.uri) else local_path(table.uri),
        table_version=chosen.version,
        run_dates=tuple(sorted(pc.unique(rows.column(col.RUN_DATE)).to_pylist())),
        options=request.model_dump(mode="json"),
        samples=rows.num_rows,
        bytes=sum(s.bytes for s in shards),
        shards=tuple(shards),
        created_at=dt.datetime.now(dt.timezone.utc),
        seconds=round(time.perf_counter() - clock, 3),
        vlpipe_version=_version(),
    )


def plan_rows(chosen: TableSlice, all_rows: bool) -> pa.Table:
    """A reference to every row to export (its data file and row number), in export order, with its sample name."""
    parts = []
    for index, (path, day) in enumerate(chosen.files):
        with chosen.table.filesystem.open_input_file(path) as source:
            part = pq.ParquetFile(source).read(columns=_INDEX_COLUMNS)
        n = part.num_rows
        part = (
            part.append_column(FILE, pa.array(np.full(n, index, np.int32)))
            .append_column(ROW, pa.array(np.arange(n, dtype=np.int64)))
            .append_column(col.RUN_DATE, pa.array([day] * n, pa.date32()))
        )
        parts.append(part if all_rows else part.filter(pc.field(col.KEEP)))
    rows = pa.concat_tables(parts).drop_columns([col.KEEP]).sort_by(ORDER)
    keys = rows.column(col.KEY)
    return rows.append_column(
        NAME, pa.array([sample_name(k, o) for k, o in zip(keys.to_pylist(), occurrences(keys))], pa.string())
    )


def split(total: int, per_shard: int) -> list[tuple[int, int]]:
    """(start, stop) of each shard: full shards of ``per_shard`` rows, the last one with the rest."""
    return [(start, min(start + per_shard, total)) for start in range(0, total, per_shard)]


def run_jobs(context: ExportContext, jobs: list[ShardJob], progress: bool) -> list[ExportedShard]:
    """One Ray task per shard; the first that fails cancels the rest and ends the export with its error."""
    import ray
    from ray.exceptions import RayTaskError
    from tqdm import tqdm

    from pipelines.execute.ray import connect

    connect()
    task = ray.remote(num_cpus=1)(write_shard)
    shared = ray.put(context)
    pending = [task.remote(shared, job) for job in jobs]
    done: dict[int, ExportedShard] = {}
    with tqdm(total=len(jobs), unit="shard", desc="export", disable=not progress) as bar:
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                shard = ray.get(ready[0])
                done[shard.number] = shard
                bar.set_postfix(samples=sum(s.samples for s in done.values()), refresh=False)
                bar.update(1)
        except BaseException as err:
            for ref in pending:
                ray.cancel(ref)
            if isinstance(err, RayTaskError) and isinstance(err.cause, VlpipeError):
                raise err.cause from None  # the task's own message, not Ray's traceback around it
            raise
    return [done[n] for n in sorted(done)]


def _context(
    chosen: TableSlice,
    target: Location,
    request: ExportRequest,
    storage: StorageOptions,
    runs_uri: str | None,
    rows: pa.Table,
) -> ExportContext:
    schema = delta_dataset(chosen.table, version=chosen.version).schema
    embeddings = [schema.field(c) for c in (col.IMAGE_EMBEDDING, col.TEXT_EMBEDDING)] if request.embeddings else []
    run_ids = set(pc.unique(rows.column(col.RUN_ID)).to_pylist())
    return ExportContext(
        table=chosen.table,
        files=tuple(path for path, _ in chosen.files),
        schema=pa.schema(scalar_fields(schema)),
        embedding_schema=pa.schema(embeddings),
        bytes_in_table=col.IMAGE_BYTES in schema.names,
        image_sources=image_sources(run_ids, runs_uri or default_run_records_uri(chosen.table.uri), storage),
        storage=storage,
        target=target,
        fmt=request.format,
    )


def image_sources(run_ids: set[str], runs_uri: str, storage: StorageOptions) -> dict[str, ImageSource]:
    """Per run, how its source shards hold the key and the image, from its recorded config."""
    from pipelines.report.data import stored_config
    from pipelines.table.records import read_run_records

    found = {}
    for record in read_run_records(runs_uri, storage).to_pylist():
        if record["run_id"] in run_ids:
            try:
                found[record["run_id"]] = ImageSource.of(stored_config(record))
            except ConfigError as err:
                log.warning("export: run %s: its recorded config is unreadable (%s)", record["run_id"], err)
    for run_id in sorted(run_ids - set(found)):
        log.warning(
            "export: run %s has no readable run record in %s: its source shards are read with "
            "img2dataset's column names (key, jpg)",
            run_id,
            runs_uri,
        )
    return found


def _version() -> str:
    try:
        return package_metadata.version("vlpipe")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def summary(manifest: ExportManifest, to_uri: str) -> str:
    """What ``vlpipe export`` prints."""
    shards = manifest.shards
    last = shard_name(shards[-1].number)
    what = "rows" if manifest.options["all_rows"] else "kept rows"
    lines = [
        f"export {to_uri}: {manifest.samples} {what} in {len(shards)} {manifest.export_format} shard(s), "
        f"{manifest.bytes / 2**20:.1f} MiB, of {manifest.table_uri} version {manifest.table_version} "
        f"(run_date {', '.join(d.isoformat() for d in manifest.run_dates)})"
    ]
    if manifest.export_format == "webdataset":
        lines.append(f"  read: webdataset.WebDataset('{to_uri.rstrip('/')}/{{{shard_name(0)}..{last}}}.tar')")
    else:
        lines.append(
            f"  read: the Parquet files {to_uri.rstrip('/')}/{{{shard_name(0)}..{last}}}.parquet, images in "
            f"column {col.EXPORT_IMAGE!r}"
        )
    if manifest.options["embeddings"]:
        rows = sum(s.embedding_rows or 0 for s in shards)
        folders = ", ".join(name.split("/")[0] + "/" for name in embedding_files(0))
        lines.append(f"  embeddings: {rows} rows in {folders}")
    lines.append(f"  written in {manifest.seconds:.1f}s")
    return "\n".join(lines)
