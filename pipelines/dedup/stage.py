"""Deduplication over the whole run and the table's earlier rows, on Ray Data.

The dedup stage is an aggregate (``pipelines.execute.staging``): the first pass stages
the run's rows; ``combine`` then reads back only the columns dedup needs, from
the staged rows and from the table's other partitions (projection: never an
image byte), groups them with a distributed shuffle (by SHA-256, by pHash band,
by k-means cluster; ``operators.decisions.duplicates`` decides each group), and writes one
small decisions file per staged file. The second pass marks each row from its
file's decisions. The driver holds the k-means centroids and a few counts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import uuid
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators.image import hashes
from operators import schema as col
from operators.decisions.duplicates import (DedupConfig, SemanticConfig, ROW_ID, SCORE, TONIGHT, assign_clusters, exact_candidates, fit_centroids,
                             near_candidates, pick_decisions, semantic_candidates, CANDIDATE_SCHEMA, DUP_DATE,
                             DUP_KEY, METHOD)
from operators.stage import Stage, Tasks
from operators.storage import Location
from operators.tensors import embedding_rows
from pipelines import hooks
from pipelines.execute.staging import ROW_BITS, SPILL_ROWS

log = logging.getLogger(__name__)

CENTROIDS_DIR = "_vlpipe_dedup"  # beside the data, hidden from Delta readers like every "_" folder
CENTROIDS_KEY = "vlpipe.dedup.centroids"  # commit metadata: the centroids file the commit's rows were clustered with
_BAND, _BAND_VALUE = "_band", "_band_value"
_CLUSTER = "_cluster"
_BUCKET = "_bucket"


def dedup_stage(config: DedupConfig, table: Location, run_date: dt.date, default_keep_by: str) -> Stage:
    """The dedup contract: it reads what its methods compare and adds the cluster and the duplicate's id."""
    config = config.model_copy(update={"keep_by": config.keep_by or default_keep_by})
    reads = [col.KEY, col.SOURCE_SHARD, col.KEEP, col.REJECT_REASON, config.keep_by]
    methods = []
    if config.exact:
        reads.append(col.IMAGE_SHA256)
        methods.append("exact: same SHA-256 of the image bytes")
    if config.near:
        reads.append(col.IMAGE_PHASH)
        methods.append(f"near: pHash within {config.near.max_distance} bits "
                       f"({config.near.max_distance + 1} bands)")
    if config.semantic:
        reads.append(col.IMAGE_EMBEDDING)
        methods.append(f"semantic: cosine >= {1 - config.semantic.eps:g} within a k-means cluster")
    against = "this run and every earlier run_date in the table" if config.history else "this run only"
    return Stage(
        name="dedup", kind="aggregate", reads=tuple(reads), adds=(col.SEMANTIC_CLUSTER, col.DUPLICATE_OF),
        build=partial(Dedup, config, table, run_date),
        details=(*methods, f"against {against}; ties to the higher {config.keep_by}, then the key",
                 "distributed shuffles; no image bytes read from the table"),
    )


@dataclass
class DedupState:
    """What the second pass needs: where the decisions are, and the centroids."""

    decisions: Location
    centroids: np.ndarray | None
    counts: dict[str, int] = field(default_factory=dict)
    commit_metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        found = ", ".join(f"{method} {n}" for method, n in self.counts.items())
        found = f"candidate pairs: {found}" if found else "no method ran"
        clusters = f"; {len(self.centroids)} clusters" if self.centroids is not None else ""
        return found + clusters


class Dedup:
    """The aggregate: partial (tonight's shards), combine (the shuffles), apply (mark the rows)."""

    def __init__(self, config: DedupConfig, table: Location, run_date: dt.date):
        """``table`` is the output: its other partitions are the history."""
        self.config, self.table, self.run_date = config, table, run_date

    def partial(self, batch: pa.Table) -> pa.Table:
        return pa.table({"shard": pc.unique(batch.column(col.SOURCE_SHARD).drop_null())})

    def combine(self, partials: list[pa.Table], staged) -> DedupState:
        shards = {s for p in partials for s in p.column("shard").to_pylist()}
        decisions = staged.location.child("decisions")
        decisions.filesystem.create_dir(decisions.path, recursive=True)
        actions = add_actions(self.table) if self.config.history else None  # the log, read once for all methods
        history_rows = int(pc.sum(actions.column("num_records")).as_py() or 0) if actions is not None else 0
        bound = len(staged.paths) * SPILL_ROWS + history_rows
        if bound <= ONE_TASK_ROWS:
            counts, centroids, metadata = self._in_one_task(staged, shards, actions, decisions)
            hooks.reach("dedup:decided")
            return DedupState(decisions, centroids, counts, metadata)
        log.info("dedup: %d rows with the history, more than one task decides: Ray Data shuffles them", bound)
        partitions = _partitions(bound)
        tasks = staged.tasks
        with tasks.shuffling():
            def rows(column: str):
                """Tonight's and the earlier rows that have ``column``: each method shuffles only its own."""
                found = _tonight(column, self.config.keep_by, staged)
                history = history_files(self.table, self.run_date, column, actions=actions) if actions else []
                return found.union(_history(column, history, shards, self.table, tasks)) if history else found

            # One method after the other: run at once, the three Ray Data jobs contended for the two
            # cores and took twice as long (night 2 of the dedup test: 21-22 s vs 10-13 s).
            counts = {}
            if self.config.exact:
                counts["exact"] = write_candidates(_exact(rows(col.IMAGE_SHA256), partitions), decisions)
            if self.config.near:
                counts["near"] = write_candidates(
                    _near(rows(col.IMAGE_PHASH), self.config.near.max_distance, partitions), decisions)
            centroids, metadata = self._centroids(lambda: rows(col.IMAGE_EMBEDDING))
            if centroids is not None:
                counts["semantic"] = write_candidates(
                    _semantic(rows(col.IMAGE_EMBEDDING), centroids, self.config.semantic.eps, partitions), decisions)
        hooks.reach("dedup:decided")
        return DedupState(decisions, centroids, counts, metadata)

    def apply(self, batch: pa.Table, state: DedupState) -> pa.Table:
        return mark_duplicates(batch, state, self.run_date)

    def _in_one_task(self, staged, shards: set[str], actions: pa.Table | None, decisions: Location):
        """A small decision in one Ray task: the same groups and rules, without the shuffle jobs' start-up."""
        columns = [c for c, on in ((col.IMAGE_SHA256, self.config.exact), (col.IMAGE_PHASH, self.config.near),
                                   (col.IMAGE_EMBEDDING, self.config.semantic)) if on]
        history = {c: history_files(self.table, self.run_date, c, actions=actions) if actions else [] for c in columns}
        stored = load_centroids(self.table) if self.config.semantic else None
        args = (self.config, self.table, staged.paths, staged.location, history, shards, decisions, stored)
        return staged.tasks.run_task(decide_in_one_task, *args)

    def _centroids(self, embeddings) -> tuple[np.ndarray | None, dict[str, str]]:
        """The table's centroids; the first semantic run fits them on a sample of its and earlier rows."""
        semantic = self.config.semantic
        if semantic is None:
            return None, {}
        stored = load_centroids(self.table)
        if stored is not None:
            path, centroids = stored
            log.info("semantic dedup: %d clusters from %s", len(centroids), path)
            return centroids, {CENTROIDS_KEY: path}
        sample = sample_embeddings(embeddings(), semantic.sample_rows)
        if sample is None:
            return None, {}
        clusters = semantic.clusters or max(1, -(-len(sample) // semantic.rows_per_cluster))
        centroids = fit_centroids(sample, clusters, semantic.iterations, semantic.seed)
        path = save_centroids(self.table, centroids, f"fit-{uuid.uuid4().hex[:12]}")
        log.info("semantic dedup: fitted %d clusters on %d rows -> %s", len(centroids), len(sample), path)
        return centroids, {CENTROIDS_KEY: path}


ONE_TASK_ROWS = 200_000  # up to this many rows (tonight's staged and the history's), one task decides


def decide_in_one_task(config: DedupConfig, table: Location, staged_paths: list[str], staging: Location,
                       history: dict[str, list[tuple[str, dt.date]]], shards: set[str], decisions: Location,
                       stored: tuple[str, np.ndarray] | None) -> tuple[dict[str, int], np.ndarray | None, dict]:
    """Every method over the whole (small) run in this process: read, group and decide, write the candidates.

    The same functions the shuffled path runs per bucket, with the whole run as one bucket; a
    small run's decision was mostly the start-up of its Ray Data jobs (~10 s of the demo's run).
    """
    if not staged_paths:  # no row made it through the first pass: nothing to decide
        return {}, stored[1] if stored else None, {CENTROIDS_KEY: stored[0]} if stored else {}

    def rows(column: str) -> pa.Table:
        parts = [tonight_rows(pq.read_table(path, filesystem=staging.filesystem,
                                            columns=[col.KEY, column, ROW_ID, col.KEEP, config.keep_by]),
                              column=column, score=config.keep_by) for path in staged_paths]
        dates = dict(history.get(column, []))
        superseded = sorted(shards)
        for path in dates:
            part = pq.read_table(path, filesystem=table.filesystem, columns=[col.KEY, column, col.KEEP, col.SOURCE_SHARD])
            part = part.append_column("path", pa.array([path] * part.num_rows, pa.string()))
            parts.append(history_rows(part, column=column, dates=dates, superseded=superseded))
        return pa.concat_tables(parts)

    def decided(found: pa.Table, key_columns: list[str], decide) -> int:
        return write_candidate_files(decide(found, list(_groups(found, key_columns))), decisions)

    counts: dict[str, int] = {}
    if config.exact:
        counts["exact"] = decided(rows(col.IMAGE_SHA256), [col.IMAGE_SHA256], exact_candidates)
    if config.near:
        banded = band_rows(rows(col.IMAGE_PHASH), max_distance=config.near.max_distance)
        counts["near"] = decided(banded, [_BAND, _BAND_VALUE], partial(decide_near, max_distance=config.near.max_distance))
    if not config.semantic:
        return counts, None, {}
    embeddings = rows(col.IMAGE_EMBEDDING)
    if stored is not None:
        path, centroids = stored
    else:
        sample = merge_samples([lowest_hashed(embeddings, limit=config.semantic.sample_rows)], config.semantic.sample_rows)
        if sample is None:
            return counts, None, {}
        semantic = config.semantic
        clusters = semantic.clusters or max(1, -(-len(sample) // semantic.rows_per_cluster))
        centroids = fit_centroids(sample, clusters, semantic.iterations, semantic.seed)
        path = save_centroids(table, centroids, f"fit-{uuid.uuid4().hex[:12]}")
    clustered = cluster_rows(embeddings, centroids=centroids)
    counts["semantic"] = decided(clustered, [_CLUSTER], partial(decide_semantic, eps=config.semantic.eps))
    return counts, centroids, {CENTROIDS_KEY: path}


def _tonight(column: str, score: str, staged):
    """The run's rows that passed every per-row filter, from the staged files: the key, ``column``, the score."""
    signature = partial(tonight_rows, column=column, score=score)
    signature.__name__ = signature.__qualname__ = "Tonight"
    ds = staged.tasks.read_parquet(staged.paths, staged.location.filesystem, [col.KEY, column, ROW_ID, col.KEEP, score])
    return ds.map_batches(signature, batch_format="pyarrow", batch_size=None)


def tonight_rows(batch: pa.Table, column: str, score: str) -> pa.Table:
    batch = batch.filter(pc.field(col.KEEP) & pc.is_valid(pc.field(column)))
    n = batch.num_rows
    return pa.table({col.KEY: batch.column(col.KEY), column: batch.column(column), ROW_ID: batch.column(ROW_ID),
                     col.RUN_DATE: pa.nulls(n, pa.date32()), SCORE: batch.column(score).cast(pa.float64()),
                     TONIGHT: pa.array(np.ones(n, bool))})


def _history(column: str, files: list[tuple[str, dt.date]], tonight_shards: set[str], table: Location, tasks: Tasks):
    """Kept rows of the table's other partitions that have ``column``, except tonight's shards' (superseded)."""
    signature = partial(history_rows, column=column, dates=dict(files), superseded=sorted(tonight_shards))
    signature.__name__ = signature.__qualname__ = "History"
    ds = tasks.read_parquet([path for path, _ in files], table.filesystem,
                            [col.KEY, column, col.KEEP, col.SOURCE_SHARD], include_paths=True)
    return ds.map_batches(signature, batch_format="pyarrow", batch_size=None)


def history_rows(batch: pa.Table, column: str, dates: dict[str, dt.date], superseded: list[str]) -> pa.Table:
    batch = batch.filter(pc.field(col.KEEP) & pc.is_valid(pc.field(column))
                         & ~pc.field(col.SOURCE_SHARD).isin(pa.array(superseded, pa.string())))
    n = batch.num_rows
    run_dates = pa.array([dates[p] for p in batch.column("path").to_pylist()], pa.date32())
    return pa.table({col.KEY: batch.column(col.KEY), column: batch.column(column),
                     ROW_ID: pa.array(np.full(n, -1, np.int64)), col.RUN_DATE: run_dates,
                     SCORE: pa.nulls(n, pa.float64()), TONIGHT: pa.array(np.zeros(n, bool))})


def _shuffled(rows, key_columns: list[str], partitions: int, decide):
    """``decide(bucket, groups)`` on the groups of rows sharing ``key_columns``, a shuffle bucket at a time.

    The shuffle is by a hash of the key into ``partitions`` buckets, not by the key itself: a
    task per distinct key (Ray's ``map_groups`` calls its function once per group) cost 10.6 s
    for 10k random pHashes' 50k band rows, nearly all groups of one row.
    """
    def with_bucket(batch: pa.Table) -> pa.Table:
        keys = [_hashable(batch.column(name)) for name in key_columns]
        mixed = np.zeros(batch.num_rows, np.uint64)
        for key in keys:
            mixed = mixed * np.uint64(0x9E3779B97F4A7C15) + key  # wraps: a hash, not a number
        return batch.append_column(_BUCKET, pa.array((mixed % np.uint64(partitions)).astype(np.int32)))

    def each_group(bucket: pa.Table) -> pa.Table:
        bucket = bucket.drop_columns([_BUCKET])
        return decide(bucket, list(_groups(bucket, key_columns)))

    bucketed = rows.map_batches(with_bucket, batch_format="pyarrow", batch_size=None)
    return bucketed.groupby(_BUCKET, num_partitions=partitions).map_groups(each_group, batch_format="pyarrow")


def _hashable(column: pa.ChunkedArray) -> np.ndarray:
    """A key column as uint64 values equal exactly where the keys are equal (strings: by their hash)."""
    if pa.types.is_string(column.type):
        return np.array([int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "big")
                         for v in column.to_pylist()], np.uint64)
    return column.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)


def _groups(table: pa.Table, key_columns: list[str]):
    """Row indices of each group of two or more rows with one of tonight's: the only ones with a decision."""
    keys = [np.array(table.column(name).to_pylist()) for name in key_columns]
    order = np.lexsort(keys[::-1])
    changed = np.zeros(len(order), bool)
    for key in keys:
        changed[1:] |= key[order][1:] != key[order][:-1]
    starts = np.flatnonzero(np.r_[True, changed[1:]])
    ends = np.r_[starts[1:], len(order)]
    tonight = table.column(TONIGHT).to_numpy(zero_copy_only=False)
    for start, end in zip(starts, ends):
        if end - start > 1 and tonight[order[start:end]].any():
            yield order[start:end]


def _exact(rows, partitions: int):
    return _shuffled(rows, [col.IMAGE_SHA256], partitions, exact_candidates)  # (bucket, groups) -> candidates


def _near(rows, max_distance: int, partitions: int):
    banded = rows.map_batches(partial(band_rows, max_distance=max_distance), batch_format="pyarrow", batch_size=None)
    return _shuffled(banded, [_BAND, _BAND_VALUE], partitions, partial(decide_near, max_distance=max_distance))


def band_rows(batch: pa.Table, max_distance: int) -> pa.Table:
    """One row per band of each hash: rows within max_distance bits share a band's value."""
    values = hashes.band_values(batch.column(col.IMAGE_PHASH).to_numpy(zero_copy_only=False), max_distance)
    bands = values.shape[1]
    repeated = batch.take(pa.array(np.repeat(np.arange(batch.num_rows), bands), pa.int64()))
    band = np.tile(np.arange(bands, dtype=np.int8), batch.num_rows)
    return (repeated.append_column(_BAND, pa.array(band, pa.int8()))
            .append_column(_BAND_VALUE, pa.array(values.reshape(-1).astype(np.int64), pa.int64())))


def decide_near(bucket: pa.Table, groups: list[np.ndarray], max_distance: int) -> pa.Table:
    return near_candidates(bucket, max_distance, groups)


def _semantic(rows, centroids: np.ndarray, eps: float, partitions: int):
    clustered = rows.map_batches(partial(cluster_rows, centroids=centroids), batch_format="pyarrow", batch_size=None)
    return _shuffled(clustered, [_CLUSTER], partitions, partial(decide_semantic, eps=eps))


def cluster_rows(batch: pa.Table, centroids: np.ndarray) -> pa.Table:
    vectors, usable = _embeddings(batch)
    batch = batch.filter(pa.array(usable))
    return batch.append_column(_CLUSTER, pa.array(assign_clusters(vectors[usable], centroids), pa.int32()))


def decide_semantic(bucket: pa.Table, groups: list[np.ndarray], eps: float) -> pa.Table:
    vectors, _ = _embeddings(bucket)
    return semantic_candidates(bucket, vectors, eps, groups)


def _embeddings(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    column = batch.column(col.IMAGE_EMBEDDING)
    lengths = pc.list_value_length(column).drop_null()
    if len(lengths) == 0:
        return np.zeros((batch.num_rows, 0), np.float32), np.zeros(batch.num_rows, bool)
    return embedding_rows(column, lengths[0].as_py(), "dedup")


def write_candidates(found, decisions: Location) -> int:
    """Write one method's candidates below ``decisions``, a folder per staged file; returns how many.

    Each method is its own Ray execution: a union of the three shuffles ran 5x slower than the
    three apart (22-28 s vs 2-5 s each, 400 rows, 2 cores). Which candidate wins
    for a row is decided where the row is marked (``mark_duplicates``), so no further shuffle.
    """
    def write(batch: pa.Table) -> pa.Table:
        return pa.table({"rows": [write_candidate_files(batch, decisions)]})

    write.__name__ = write.__qualname__ = "WriteCandidates"
    return sum(row["rows"] for row in found.map_batches(write, batch_format="pyarrow", batch_size=None).iter_rows())


def write_candidate_files(batch: pa.Table, decisions: Location) -> int:
    """Candidates into their staged file's folder (``mark_duplicates`` reads a file's folder); returns how many."""
    files = pc.shift_right(batch.column(ROW_ID), ROW_BITS)
    for file_id in pc.unique(files).to_pylist():
        part = batch.filter(pc.equal(files, file_id))
        folder = f"{decisions.path}/{file_id}"
        decisions.filesystem.create_dir(folder, recursive=True)
        pq.write_table(part, f"{folder}/{uuid.uuid4().hex}.parquet", filesystem=decisions.filesystem)
    return batch.num_rows


ROWS_PER_BUCKET = 100_000  # rows (of one method's few columns) that one shuffle bucket's task holds


def _partitions(rows: int) -> int:
    """Shuffle buckets: as many as bounded memory per bucket needs, no more (a small run's decision
    is mostly task start-up; the three methods already run at once)."""
    return max(1, -(-rows // ROWS_PER_BUCKET))


def add_actions(table: Location) -> pa.Table | None:
    """The table's current data files (Delta add actions, flattened), or None before its first commit."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(table.uri, storage_options=table.delta_options):
        return None
    return pa.table(DeltaTable(table.uri, storage_options=table.delta_options).get_add_actions(flatten=True))


def history_files(table: Location, run_date: dt.date, column: str | None = None, *,
                  actions: pa.Table | None = None) -> list[tuple[str, dt.date]]:
    """The table's data files outside ``run_date``'s partition (a re-run never sees its own first try).

    With ``column``, only files whose statistics show a value in it: files written before a
    method was on lack its hash column (a read of it would fail) or hold only nulls there.
    ``actions`` are the table's ``add_actions`` when the caller has them already.
    """
    actions = add_actions(table) if actions is None else actions
    if actions is None:
        return []
    root = table.path.rstrip("/")
    dates = actions.column(f"partition.{col.RUN_DATE}").cast(pa.string()).to_pylist()
    usable = [True] * actions.num_rows
    if column is not None:
        nulls_name = f"null_count.{column}"
        nulls = actions.column(nulls_name).to_pylist() if nulls_name in actions.column_names else [None] * len(dates)
        # The embedding was always written; a hash column only by runs that had it on (and then with stats).
        always_there = column == col.IMAGE_EMBEDDING
        usable = [(n is None and always_there) or (n is not None and n < rows)
                  for n, rows in zip(nulls, actions.column("num_records").to_pylist())]
    return [(f"{root}/{path}", dt.date.fromisoformat(day))
            for path, day, ok in zip(actions.column("path").to_pylist(), dates, usable)
            if ok and day != run_date.isoformat()]


def sample_embeddings(rows, limit: int) -> np.ndarray | None:
    """Up to ``limit`` usable embeddings, the same ones on every try: those whose key hashes lowest."""
    hashed = partial(lowest_hashed, limit=limit)
    return merge_samples(_gather(rows.map_batches(hashed, batch_format="pyarrow", batch_size=None)), limit)


def lowest_hashed(batch: pa.Table, limit: int) -> pa.Table:
    """The batch's ``limit`` usable embeddings whose keys hash lowest, with those hashes."""
    vectors, usable = _embeddings(batch)
    keys = batch.column(col.KEY).to_pylist()
    order = np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") >> 1
                      for k in keys], np.int64)
    kept = np.flatnonzero(usable)
    kept = kept[np.argsort(order[kept], kind="stable")][:limit]
    return pa.table({"order": pa.array(order[kept], pa.int64()),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors[kept].reshape(-1)),
                                                                 max(vectors.shape[1], 1))})


def merge_samples(parts: list[pa.Table], limit: int) -> np.ndarray | None:
    tables = [t for t in parts if t.num_rows]
    if not tables:
        return None
    merged = pa.concat_tables(tables)
    merged = merged.take(pc.sort_indices(merged, [("order", "ascending")])[:limit])
    vectors = merged.column("vector").combine_chunks()
    return vectors.values.to_numpy().reshape(len(vectors), -1)


def _gather(ds) -> list[pa.Table]:
    return list(ds.iter_batches(batch_format="pyarrow", batch_size=None))


def save_centroids(table: Location, centroids: np.ndarray, name: str) -> str:
    """Write a centroids file below the table; it counts once a commit names it (``CENTROIDS_KEY``)."""
    relative = f"{CENTROIDS_DIR}/centroids-{name}.npy"
    buffer = io.BytesIO()
    np.save(buffer, centroids.astype(np.float32), allow_pickle=False)
    table.filesystem.create_dir(f"{table.path.rstrip('/')}/{CENTROIDS_DIR}", recursive=True)
    with table.filesystem.open_output_stream(f"{table.path.rstrip('/')}/{relative}") as out:
        out.write(buffer.getvalue())
    return relative


def load_centroids(table: Location) -> tuple[str, np.ndarray] | None:
    """The centroids named by the table's newest commit that names any, or None."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(table.uri, storage_options=table.delta_options):
        return None
    for entry in DeltaTable(table.uri, storage_options=table.delta_options).history():
        relative = entry.get(CENTROIDS_KEY)
        if relative:
            with table.filesystem.open_input_file(f"{table.path.rstrip('/')}/{relative}") as source:
                return relative, np.load(io.BytesIO(source.read()), allow_pickle=False)
    return None


def mark_duplicates(batch: pa.Table, state: DedupState, run_date: dt.date) -> pa.Table:
    """Second pass: the staged rows with their decisions, their cluster and ``duplicate_of``."""
    decisions = _decisions_for(batch.column(ROW_ID), state.decisions)
    n = batch.num_rows
    reasons = np.array(batch.column(col.REJECT_REASON).to_pylist(), dtype=object)
    keep = batch.column(col.KEEP).to_numpy(zero_copy_only=False).copy()
    dup_keys, dup_dates = [None] * n, [None] * n
    if decisions.num_rows:
        position = {row_id: i for i, row_id in enumerate(batch.column(ROW_ID).to_pylist())}
        for row_id, method, key, day in zip(decisions.column(ROW_ID).to_pylist(), decisions.column(METHOD).to_pylist(),
                                            decisions.column(DUP_KEY).to_pylist(), decisions.column(DUP_DATE).to_pylist()):
            i = position.get(row_id)
            if i is None or not keep[i]:
                continue
            keep[i], reasons[i] = False, method
            dup_keys[i], dup_dates[i] = key, day or run_date
    duplicate_of = pa.StructArray.from_arrays(
        [pa.array(dup_keys, pa.string()), pa.array(dup_dates, pa.date32())], fields=list(col.DUPLICATE_OF_TYPE),
        mask=pa.array([k is None for k in dup_keys]))
    out = batch.drop_columns([c for c in (col.KEEP, col.REJECT_REASON, col.SEMANTIC_CLUSTER, col.DUPLICATE_OF)
                              if c in batch.column_names])
    out = out.append_column(col.SEMANTIC_CLUSTER, _clusters(batch, state.centroids))
    out = out.append_column(col.DUPLICATE_OF, duplicate_of)
    return out.append_column(col.KEEP, pa.array(keep, pa.bool_())).append_column(
        col.REJECT_REASON, pa.array(reasons.tolist(), pa.string()))


def _clusters(batch: pa.Table, centroids: np.ndarray | None) -> pa.Array:
    if centroids is None or col.IMAGE_EMBEDDING not in batch.column_names:
        return pa.nulls(batch.num_rows, pa.int32())
    vectors, usable = _embeddings(batch)
    clusters = np.zeros(batch.num_rows, np.int32)
    if usable.any():
        clusters[usable] = assign_clusters(vectors[usable], centroids)
    return pa.array(clusters, pa.int32(), mask=~usable)


def _decisions_for(row_ids: pa.ChunkedArray, decisions: Location) -> pa.Table:
    """The winning candidate of each of these rows that has any (from its staged file's folder)."""

    tables = []
    for file_id in np.unique(pc.shift_right(row_ids, ROW_BITS).to_numpy()):
        found = decisions.filesystem.get_file_info(pafs.FileSelector(f"{decisions.path}/{file_id}", allow_not_found=True))
        tables += [pq.read_table(f.path, filesystem=decisions.filesystem) for f in found if f.path.endswith(".parquet")]
    return pick_decisions(pa.concat_tables(tables)) if tables else CANDIDATE_SCHEMA.empty_table()


@dataclass(frozen=True)
class Refit:
    """What ``vlpipe dedup refit`` did."""

    path: str
    clusters: int
    sample_rows: int
    version: int

    def __str__(self) -> str:
        return (f"fitted {self.clusters} clusters on {self.sample_rows} kept rows -> {self.path} "
                f"(table version {self.version}); later runs cluster their rows with these")


def refit(table: Location, config: SemanticConfig, tasks: Tasks) -> Refit:
    """Fit new centroids on a sample of the table's kept rows and commit them (an empty commit that names them).

    Rows already written keep the ``semantic_cluster`` they got; runs after this one group every
    row, old and new, by the new centroids (earlier rows are re-assigned as they are read).
    """
    from deltalake import CommitProperties, DeltaTable

    if not DeltaTable.is_deltatable(table.uri, storage_options=table.delta_options):
        raise FileNotFoundError(f"no Delta table at {table.uri}")
    files = [path for path, _ in history_files(table, dt.date.min, col.IMAGE_EMBEDDING)]
    if not files:
        raise ValueError(f"{table.uri} has no data files with an image_embedding to fit centroids on")

    def kept(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.field(col.KEEP) & pc.is_valid(pc.field(col.IMAGE_EMBEDDING)))

    rows = tasks.read_parquet(files, table.filesystem, [col.KEY, col.IMAGE_EMBEDDING, col.KEEP])
    sample = sample_embeddings(rows.map_batches(kept, batch_format="pyarrow", batch_size=None), config.sample_rows)
    if sample is None:
        raise ValueError(f"{table.uri} has no kept rows with an image_embedding to fit centroids on")
    clusters = config.clusters or max(1, -(-len(sample) // config.rows_per_cluster))
    centroids = fit_centroids(sample, clusters, config.iterations, config.seed)
    path = save_centroids(table, centroids, f"refit-{uuid.uuid4().hex[:12]}")
    delta = DeltaTable(table.uri, storage_options=table.delta_options)
    delta.create_write_transaction([], mode="append", schema=delta.schema(), commit_properties=CommitProperties(
        custom_metadata={CENTROIDS_KEY: path, "vlpipe.operation": "dedup-refit"}))
    return Refit(path, len(centroids), len(sample), DeltaTable(table.uri, storage_options=table.delta_options).version())
