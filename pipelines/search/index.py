"""``vlpipe index``: a faiss index over the kept rows' embeddings of one version of the table.

Only the needed columns of the chosen partitions are read (key, caption, source_shard,
run_id, keep and the embedding; never an image byte), in two passes, as Ray Data actors
for a large table and in this process for a small one:

1. count and sample (approximate indexes only): each block reports how many rows it
   indexes and its rows whose key hashes lowest, so the driver holds the training
   sample and nothing else; the index is chosen from the count and trained on the sample;
2. encode: each actor deserialises the trained, empty index once and turns its blocks'
   vectors into codes; the driver appends the codes to the final index in arrival order
   and streams the rows' metadata to Parquet in the same order (faiss id = metadata row).

A table whose Delta log counts fewer rows than the exact-index threshold skips the first
pass. Nothing is visible at the index URI until its manifest is written, last
(``pipelines.search.files``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata as package_metadata
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from operators import schema as col
from operators.storage import Location, StorageOptions, is_remote, local_path
from operators.tensors import embedding_rows
from pipelines.config import default_run_records_uri
from pipelines.errors import ConfigError, NoInputError
from pipelines.search import vectors as vi
from pipelines.search.files import (
    EMBEDDING_COLUMNS,
    METADATA_SCHEMA,
    Embedding,
    IndexFiles,
    IndexManifest,
    ModelProbe,
    ModelRecord,
    RunSource,
    build_files,
    metadata_writer,
    publish,
    remove_files,
    write_faiss,
)

log = logging.getLogger(__name__)

LOCAL_MAX_ROWS = 200_000  # above this many rows in the chosen partitions, `auto` builds on Ray
BLOCK_ROWS = 50_000  # rows per batch when building in this process
TUNING_QUERIES = 128  # per kind of query (each tower)
MODEL_PROBES = 2
_CODE, _HASH, _VECTOR, _QUERY, _ROWS = "_code", "_hash", "_vector", "_query", "_rows"
_OTHER_TOWER = {"image": "text", "text": "image"}


class IndexRequest(BaseModel):
    """What to index and how; by default the index is chosen by size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embedding: Embedding = "image"
    run_dates: tuple[dt.date, ...] = ()  # empty: every partition
    version: int | None = Field(None, ge=0)  # None: the latest
    index_key: str | None = None  # a faiss index_factory key instead of the automatic choice
    max_index_gb: float = Field(vi.DEFAULT_MAX_INDEX_BYTES / 2**30, gt=0)  # uncompressed IVF up to this, PQ beyond
    executor: Literal["auto", "local", "ray"] = "auto"


class MixedModelsError(ConfigError):
    """The rows to index were embedded by different CLIP models, or by one nothing records."""


@dataclass(frozen=True)
class TableSlice:
    """The data files an index reads: the table at one version, in the chosen partitions."""

    table: Location
    version: int
    files: tuple[tuple[str, dt.date], ...]  # path inside the table's filesystem, partition date
    rows: int | None  # every row of these files, kept or not (the Delta log's counts); None if one is missing

    @classmethod
    def open(cls, table: Location, version: int | None, run_dates: tuple[dt.date, ...]) -> TableSlice:
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(table.uri, storage_options=table.delta_options):
            raise NoInputError(f"no Delta table at {table.uri}")
        try:
            delta = DeltaTable(table.uri, version=version, storage_options=table.delta_options)
        except Exception as err:  # deltalake's own error types for a version its log does not have
            raise ConfigError(f"--version {version}: table {table.uri} cannot be read at it ({err})") from None
        actions = pa.table(delta.get_add_actions(flatten=True))
        if actions.num_rows == 0:
            raise NoInputError(f"table {table.uri} has no data files at version {delta.version()}")
        root = table.path.rstrip("/")
        days = [
            dt.date.fromisoformat(d) for d in actions.column(f"partition.{col.RUN_DATE}").cast(pa.string()).to_pylist()
        ]
        wanted = set(run_dates) or set(days)
        missing = sorted(set(run_dates) - set(days))
        if missing:
            raise NoInputError(
                f"table {table.uri} (version {delta.version()}) has no partition "
                f"{', '.join(f'run_date={d}' for d in missing)}"
            )
        chosen = [i for i, day in enumerate(days) if day in wanted]
        counts = actions.column("num_records").to_pylist()
        rows = None if any(counts[i] is None for i in chosen) else sum(counts[i] for i in chosen)
        paths = actions.column("path").to_pylist()
        return cls(table, delta.version(), tuple((f"{root}/{paths[i]}", days[i]) for i in chosen), rows)


@dataclass(frozen=True)
class _Built:
    """What the build made, for its manifest."""

    index: object  # the faiss index
    dim: int
    trained: Trained
    tuning: object | None  # vi.tune's result, for an index with lists
    files: IndexFiles
    probes: list[ModelProbe]
    sources: dict[str, RunSource]
    model: ModelRecord
    started: float  # perf_counter at the start of the build


def _manifest(table: Location, chosen: TableSlice, request: IndexRequest, built: _Built) -> IndexManifest:
    tuning, choice = built.tuning, built.trained.choice
    return IndexManifest(
        table_uri=table.uri if is_remote(table.uri) else local_path(table.uri),
        table_version=chosen.version,
        run_dates=tuple(sorted(request.run_dates)) or None,
        embedding=request.embedding,
        model=built.model,
        dim=built.dim,
        count=built.index.ntotal,
        index_type=choice.key,
        index_reason=choice.reason,
        params=tuning.params if tuning else {},
        recall_at_10=tuning.recall if tuning else None,
        train_rows=built.trained.rows,
        files=built.files,
        model_probes=built.probes,
        runs=built.sources,
        built_at=dt.datetime.now(dt.timezone.utc),
        build_seconds=round(time.perf_counter() - built.started, 3),
        vlpipe_version=_version(),
    )


def build_index(
    table_uri: str,
    index_uri: str,
    request: IndexRequest = IndexRequest(),
    *,
    storage: StorageOptions = StorageOptions(),
    runs_uri: str | None = None,
) -> IndexManifest:
    """Index the kept rows' ``request.embedding`` of the table at ``table_uri``; returns the manifest written."""
    started = time.perf_counter()
    table, target = Location.resolve(table_uri, storage), Location.resolve(index_uri, storage)
    chosen = TableSlice.open(table, request.version, request.run_dates)
    column = EMBEDDING_COLUMNS[request.embedding]
    dim, probes = _first_rows(chosen, column)
    on_ray = _uses_ray(request.executor, chosen)
    trained = _train(request, chosen, column, dim, on_ray)
    log.info(
        "index %s: %s (%s), %s",
        target.uri,
        trained.choice.key,
        trained.choice.reason,
        "on Ray" if on_ray else "in this process",
    )
    files = build_files(f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}")
    try:
        index, run_ids = _encode(chosen, column, trained.template, target, files, on_ray)
        sources = run_sources(chosen, run_ids, runs_uri, storage)
        model = _one_model(run_ids, sources)
        tuning = vi.tune(index, trained.sample.queries(request.embedding)) if trained.choice.lists else None
        write_faiss(target, files.index, index)
        built = _Built(index, dim, trained, tuning, files, probes, sources, model, started)
        manifest = _manifest(table, chosen, request, built)
        publish(target, manifest)
    except BaseException:
        remove_files(target, files)
        raise
    log.info(
        "index %s: %d vectors of %s, table version %d, %.1f s",
        target.uri,
        manifest.count,
        column,
        manifest.table_version,
        manifest.build_seconds,
    )
    return manifest


def summary(manifest: IndexManifest, index_uri: str) -> str:
    """What ``vlpipe index`` prints."""
    lines = [
        f"index {index_uri}: {manifest.count} {manifest.embedding} embeddings ({manifest.dim} values) of "
        f"{manifest.table_uri} version {manifest.table_version}, model {manifest.model}",
        f"  {manifest.index_type}: {manifest.index_reason}",
    ]
    if manifest.params:
        recall = ", ".join(f"{kind} queries {r:.3f}" for kind, r in (manifest.recall_at_10 or {}).items())
        lines.append(
            f"  search with {', '.join(f'{k}={v}' for k, v in manifest.params.items())}: recall@10 {recall} "
            f"(against probing every list; trained on {manifest.train_rows} rows)"
        )
    lines.append(f"  built in {manifest.build_seconds:.1f}s")
    return "\n".join(lines)


@dataclass(frozen=True)
class Trained:
    """The index chosen, its trained empty form (what every part encodes with), and the sample behind it."""

    choice: vi.IndexChoice
    template: bytes
    sample: Sample | None
    rows: int  # training rows used


def _train(request: IndexRequest, chosen: TableSlice, column: str, dim: int, on_ray: bool) -> Trained:
    choice, sample = _choose_and_sample(request, chosen, column, dim, on_ray)
    training = sample.training(choice.train_rows) if sample is not None and choice.lists else None
    try:
        template = vi.train(choice.key, dim, training)
    except ValueError as err:
        raise ConfigError(f"index {choice.key}: {err}") from None
    return Trained(choice, template, sample, 0 if training is None else len(training))


def _choose_and_sample(
    request: IndexRequest, chosen: TableSlice, column: str, dim: int, on_ray: bool
) -> tuple[vi.IndexChoice, Sample | None]:
    """The index to build, and the training sample when it needs one (pass 1)."""
    max_bytes = int(request.max_index_gb * 2**30)
    if request.index_key is not None:
        try:
            vi.empty_index(request.index_key, dim)
        except ValueError as err:
            raise ConfigError(f"--index-key: {err}") from None
        forced = vi.IndexChoice(request.index_key, "--index-key")
        return forced, (_sample(chosen, column, dim, forced.train_rows, on_ray) if forced.lists else None)
    if chosen.rows is not None and chosen.rows < vi.FLAT_MAX_ROWS:
        return vi.IndexChoice(
            "Flat", f"{chosen.rows} rows in the partitions, kept or not, < {vi.FLAT_MAX_ROWS}: exact search"
        ), None
    # The log's count includes rejected rows: an upper bound, so the sample is large enough for any choice.
    limit = vi.choose_index(chosen.rows, dim, max_bytes).train_rows if chosen.rows else vi.MAX_TRAIN_ROWS
    sample = _sample(chosen, column, dim, limit, on_ray)
    return vi.choose_index(sample.rows, dim, max_bytes), sample


def _sample(chosen: TableSlice, column: str, dim: int, limit: int, on_ray: bool) -> Sample:
    other = EMBEDDING_COLUMNS[_OTHER_TOWER[_tower(column)]]
    sample = Sample(limit, dim)
    step = {"column": column, "other": other, "dim": dim, "limit": limit}
    for batch in _map_blocks(chosen, SampleRows, step, [col.KEY, col.KEEP, column, other], on_ray):
        sample.add(batch)
    log.info("index: %d rows to index, %d sampled", sample.rows, len(sample.training(limit)))
    return sample


def _encode(
    chosen: TableSlice, column: str, template: bytes, target: Location, files: IndexFiles, on_ray: bool
) -> tuple[object, set[str]]:
    """Pass 2: the final index filled with every block's codes, the metadata written in the same order."""
    assembler, run_ids = vi.Assembler(template), set()
    columns = [col.KEY, col.CAPTION, col.SOURCE_SHARD, col.RUN_ID, col.KEEP, column]
    with metadata_writer(target, files) as writer:
        for batch in _map_blocks(chosen, EncodeRows, {"column": column, "template": template}, columns, on_ray):
            if batch.num_rows == 0:
                continue
            codes = batch.column(_CODE).combine_chunks()
            width = codes.type.byte_width
            assembler.add(
                np.frombuffer(
                    codes.buffers()[1], np.uint8, count=len(codes) * width, offset=codes.offset * width
                ).reshape(len(codes), width)
            )
            rows = batch.drop_columns([_CODE])
            writer.write_table(rows)
            run_ids.update(pc.unique(rows.column(col.RUN_ID)).to_pylist())
    if assembler.index.ntotal == 0:
        raise NoInputError(f"no kept row with a {column} in {_describe(chosen)}")
    return assembler.index, run_ids


class SampleRows:
    """Pass 1, per block: how many rows it indexes, and its ``limit`` rows whose key hashes lowest.

    The lowest hashes of the whole table are among each block's lowest, so the driver's
    sample is the table's, the same on every build. Only the lowest ``TUNING_QUERIES``
    rows carry the other tower's embedding: the queries the search parameters are tuned on.
    """

    def __init__(self, column: str, other: str, dim: int, limit: int):
        self.column, self.other, self.dim, self.limit = column, other, dim, limit

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, vectors = indexable(batch, self.column, self.dim)
        hashes = _key_hashes(rows)
        order = np.argsort(hashes, kind="stable")[: self.limit]
        counted = np.zeros(len(order), np.int64)
        counted[:1] = rows.num_rows
        queries = rows.column(self.other).take(pa.array(order[:TUNING_QUERIES], pa.int64()))
        query_column = pa.concat_arrays(
            [queries.combine_chunks().cast(col.EMBEDDING_TYPE), pa.nulls(len(order) - len(queries), col.EMBEDDING_TYPE)]
        )
        return pa.table(
            {
                _HASH: pa.array(hashes[order], pa.int64()),
                _VECTOR: _fixed_lists(vectors[order], self.dim),
                _QUERY: query_column,
                _ROWS: pa.array(counted, pa.int64()),
            }
        )


class Sample:
    """The driver's side of pass 1: the rows counted, and the ``limit`` lowest-hash rows seen so far."""

    def __init__(self, limit: int, dim: int):
        self.limit, self.dim, self.rows = limit, dim, 0
        self._parts: list[pa.Table] = []
        self._held = 0

    def add(self, batch: pa.Table) -> None:
        self.rows += int(pc.sum(batch.column(_ROWS)).as_py() or 0)
        self._parts.append(batch.drop_columns([_ROWS]))
        self._held += batch.num_rows
        if self._held > 2 * self.limit:  # cut now and then, not per batch: a sort per block would dominate
            self._cut()

    def training(self, rows: int) -> np.ndarray:
        """The ``rows`` lowest-hash vectors."""
        lowest = self._lowest()
        return np.zeros((0, self.dim), np.float32) if lowest is None else _vectors(lowest.column(_VECTOR)[:rows])

    def queries(self, tower: str) -> dict[str, np.ndarray]:
        """Tuning queries per tower: sampled rows' own vectors, and the embeddings of their other tower."""
        lowest = self._lowest()
        if lowest is None:
            return {}
        lowest = lowest.slice(0, TUNING_QUERIES)
        other, usable = embedding_rows(lowest.column(_QUERY).drop_null(), self.dim, "index")
        return {tower: _vectors(lowest.column(_VECTOR)), _OTHER_TOWER[tower]: other[usable]}

    def _lowest(self) -> pa.Table | None:
        if not self._parts:
            return None
        self._cut()
        return self._parts[0]

    def _cut(self) -> None:
        merged = pa.concat_tables(self._parts)
        self._parts = [merged.take(pc.sort_indices(merged, [(_HASH, "ascending")])[: self.limit])]
        self._held = self._parts[0].num_rows


class EncodeRows:
    """Pass 2, per block: the rows' metadata and each vector's code under the trained index."""

    def __init__(self, column: str, template: bytes):
        self.column, self.encoder = column, vi.Encoder(template)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, vectors = indexable(batch, self.column, self.encoder.dim)
        codes = self.encoder(vectors)
        code_type = pa.binary(self.encoder.code_size)
        code_column = pa.FixedSizeBinaryArray.from_buffers(code_type, len(codes), [None, pa.py_buffer(codes.tobytes())])
        metadata = pa.table({name: rows.column(name) for name in METADATA_SCHEMA.names}).cast(METADATA_SCHEMA)
        return metadata.append_column(_CODE, code_column)


def indexable(batch: pa.Table, column: str, dim: int) -> tuple[pa.Table, np.ndarray]:
    """The batch's kept rows with a usable (present, finite) ``column``, and those embeddings."""
    kept = batch.filter(pc.field(col.KEEP) & pc.is_valid(pc.field(column)))
    vectors, usable = embedding_rows(kept.column(column), dim, "index")
    if usable.all():
        return kept, vectors
    return kept.filter(pa.array(usable)), vectors[usable]


def _map_blocks(chosen: TableSlice, step: type, kwargs: dict, columns: list[str], on_ray: bool) -> Iterator[pa.Table]:
    """``step(**kwargs)`` over the slice's rows (with their ``run_date``), here or as Ray Data actors."""
    if not on_ray:
        run = step(**kwargs)
        for path, day in chosen.files:
            for batch in _file_batches(chosen.table, path, columns, BLOCK_ROWS):
                yield run(batch.append_column(col.RUN_DATE, pa.array([day] * batch.num_rows, pa.date32())))
        return
    import ray
    import ray.data

    named = type(step.__name__, (_DatedBlocks,), {})  # named for Ray's progress bars and stats
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.read_parquet(
        [path for path, _ in chosen.files], filesystem=chosen.table.filesystem, columns=columns, include_paths=True
    )
    ds = ds.map_batches(
        named,
        fn_constructor_kwargs={"step": step, "kwargs": kwargs, "dates": dict(chosen.files)},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus),
    )
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


class _DatedBlocks:
    """A step as a Ray actor: the read names each row's file, the step wants the file's partition date."""

    def __init__(self, step: type, kwargs: dict, dates: dict[str, dt.date]):
        self.step, self.dates = step(**kwargs), dates

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = batch.column("path").combine_chunks().dictionary_encode()
        days = pa.array([self.dates[p] for p in paths.dictionary.to_pylist()], pa.date32()).take(paths.indices)
        return self.step(batch.drop_columns(["path"]).append_column(col.RUN_DATE, days))


def _file_batches(table: Location, path: str, columns: list[str], rows: int) -> Iterator[pa.Table]:
    with table.filesystem.open_input_file(path) as source:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=rows, columns=columns):
            yield pa.Table.from_batches([batch])


def _first_rows(chosen: TableSlice, column: str) -> tuple[int, list[ModelProbe]]:
    """The embeddings' width, and a few kept captions with their text embeddings (``ModelProbe``)."""
    dim, probes = None, []
    columns = [col.CAPTION, col.KEEP, *dict.fromkeys((column, col.TEXT_EMBEDDING))]
    for path, _ in chosen.files:
        for batch in _file_batches(chosen.table, path, columns, 4096):
            kept = batch.filter(pc.field(col.KEEP))
            lengths = pc.list_value_length(kept.column(column)).drop_null()
            if dim is None and len(lengths):
                dim = lengths[0].as_py()
            captions, embeddings = kept.column(col.CAPTION).to_pylist(), kept.column(col.TEXT_EMBEDDING).to_pylist()
            for caption, embedding in zip(captions, embeddings):
                usable = caption and caption.strip() and embedding and np.isfinite(embedding).all()
                if usable and len(probes) < MODEL_PROBES:
                    probes.append(ModelProbe(caption=caption, text_embedding=embedding))
            if dim is not None and len(probes) == MODEL_PROBES:
                return dim, probes
    if dim is None:
        raise NoInputError(f"no kept row with a {column} in {_describe(chosen)}")
    return dim, probes


def run_sources(
    chosen: TableSlice, run_ids: set[str], runs_uri: str | None, storage: StorageOptions
) -> dict[str, RunSource]:
    """Per indexed run: its CLIP model (its commit's ``vlpipe.models``, else its run record) and its input columns."""
    from pipelines.table.records import read_run_records

    commits = _commit_models(chosen)
    records = {
        r["run_id"]: r
        for r in read_run_records(runs_uri or default_run_records_uri(chosen.table.uri), storage).to_pylist()
        if r["run_id"] in run_ids
    }
    sources = {}
    for run_id in sorted(run_ids):
        record = records.get(run_id)
        model = commits.get(run_id) or (_clip_model(record["models_json"]) if record else None)
        sources[run_id] = RunSource(model=model, **_input_of(record))
    return sources


def _commit_models(chosen: TableSlice) -> dict[str, ModelRecord]:
    from deltalake import DeltaTable

    models = {}
    delta = DeltaTable(chosen.table.uri, version=chosen.version, storage_options=chosen.table.delta_options)
    for entry in delta.history():
        run_id, model = entry.get("vlpipe.run_id"), _clip_model(entry.get("vlpipe.models"))
        if run_id and model and entry.get("version", 0) <= chosen.version:
            models.setdefault(run_id, model)  # newest first: a re-run's own commit wins
    return models


def _clip_model(models_json: str | None) -> ModelRecord | None:
    clip = json.loads(models_json).get("clip") if models_json else None
    return ModelRecord(source=clip["source"], revision=clip.get("revision")) if clip else None


def _input_of(record: dict | None) -> dict:
    """How the run read and decoded its shards, from its recorded config; img2dataset's names without one."""
    from pipelines.report.data import stored_config

    if record is None:
        return {}
    try:
        config = stored_config(record)
    except ConfigError as err:
        log.warning(
            "index: run %s: its recorded config is unreadable (%s); thumbnails assume the default input columns",
            record["run_id"],
            err,
        )
        return {}
    return {
        "input_columns": config.input.columns,
        "decode": config.decode,
        "webdataset": config.input.webdataset,
        "fetch": config.input.fetch,
    }


def _one_model(run_ids: set[str], sources: dict[str, RunSource]) -> ModelRecord:
    """Vectors of two models do not compare: an index holds one model's."""
    unknown = sorted(r for r in run_ids if sources[r].model is None)
    if unknown:
        raise MixedModelsError(
            f"cannot tell which CLIP model embedded the rows of run(s) {', '.join(unknown)}: "
            "neither their commit (vlpipe.models) nor a run record names it"
        )
    models = {sources[r].model for r in run_ids}
    if len(models) > 1:
        by_model = {str(m): sorted(r for r in run_ids if sources[r].model == m) for m in models}
        raise MixedModelsError(
            "the rows were embedded by different CLIP models ("
            + "; ".join(f"{m}: run(s) {', '.join(runs)}" for m, runs in sorted(by_model.items()))
            + "); index the run dates of one model with --run-date"
        )
    return models.pop()


def _uses_ray(executor: str, chosen: TableSlice) -> bool:
    use = executor == "ray" or (executor == "auto" and (chosen.rows is None or chosen.rows > LOCAL_MAX_ROWS))
    if use:
        from pipelines.execute.ray import connect

        connect()
    return use


def _key_hashes(rows: pa.Table) -> np.ndarray:
    """A stable pseudo-random rank per row: a key can repeat across run dates, so both are hashed."""
    keys, days = rows.column(col.KEY).to_pylist(), rows.column(col.RUN_DATE).to_pylist()
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{k}\0{d}".encode(), digest_size=8).digest(), "big") >> 1
            for k, d in zip(keys, days)
        ],
        np.int64,
    )


def _fixed_lists(vectors: np.ndarray, dim: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)


def _vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, column.type.list_size), np.float32)
    return column.flatten().to_numpy().reshape(len(column), -1)


def _tower(column: str) -> str:
    return next(tower for tower, name in EMBEDDING_COLUMNS.items() if name == column)


def _describe(chosen: TableSlice) -> str:
    dates = sorted({day for _, day in chosen.files})
    return f"{chosen.table.uri} (version {chosen.version}, run_date {dates[0]}..{dates[-1]})"


def _version() -> str:
    try:
        return package_metadata.version("vlpipe")
    except package_metadata.PackageNotFoundError:
        return "unknown"
