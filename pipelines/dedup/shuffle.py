"""Dedup over more rows than one task holds: Ray Data shuffles from the executor (``operators.stage.Tasks``).

Each method reads back only its own columns (never an image byte), shuffles them by a hash of
its key into buckets of bounded size, decides each bucket with ``pipelines.dedup.rows``, and
writes the candidates beside the staged files they belong to.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa

from operators import schema as col
from operators.decisions.duplicates import ROW_ID, DedupConfig, exact_candidates
from operators.stage import Staged, Tasks
from operators.storage import Location
from pipelines.dedup.history import (
    CENTROIDS_KEY,
    fit_and_save,
    history_files,
    load_centroids,
)
from pipelines.dedup.rows import (
    BAND,
    BAND_VALUE,
    CLUSTER,
    band_rows,
    cluster_rows,
    decide_near,
    decide_semantic,
    groups,
    history_rows,
    lowest_hashed,
    merge_samples,
    tonight_rows,
    write_candidate_files,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShuffledRun:
    """One run's decision by shuffles: tonight's staged rows against the table's earlier ones."""

    config: DedupConfig
    table: Location
    run_date: dt.date
    staged: Staged
    shards: set[str]  # tonight's shards: their earlier rows are superseded, never duplicates
    actions: pa.Table | None  # the table's add actions (its data files), None without history
    decisions: Location

    def decide(self, bound: int) -> tuple[dict[str, int], np.ndarray | None, dict[str, str]]:
        """Each method's candidates written below ``decisions``; the counts, centroids and commit metadata."""
        partitions = _partitions(bound)
        config = self.config
        with self.staged.tasks.shuffling():
            # One method after the other: run at once, the three Ray Data jobs contended for the two
            # cores and took twice as long (night 2 of the dedup test: 21-22 s vs 10-13 s).
            counts = {}
            if config.exact:
                counts["exact"] = write_candidates(_exact(self.rows(col.IMAGE_SHA256), partitions), self.decisions)
            if config.near:
                near = _near(self.rows(col.IMAGE_PHASH), config.near.max_distance, partitions)
                counts["near"] = write_candidates(near, self.decisions)
            centroids, metadata = self.centroids()
            if centroids is not None:
                semantic = _semantic(self.rows(col.IMAGE_EMBEDDING), centroids, config.semantic.eps, partitions)
                counts["semantic"] = write_candidates(semantic, self.decisions)
        return counts, centroids, metadata

    def rows(self, column: str):
        """Tonight's and the earlier rows that have ``column``: each method shuffles only its own."""
        tasks = self.staged.tasks
        found = _tonight(column, self.config.keep_by, self.staged)
        history = history_files(self.table, self.run_date, column, actions=self.actions) if self.actions else []
        return found.union(_history(column, history, self.shards, self.table, tasks)) if history else found

    def centroids(self) -> tuple[np.ndarray | None, dict[str, str]]:
        """The table's centroids; the first semantic run fits them on a sample of its and earlier rows."""
        semantic = self.config.semantic
        if semantic is None:
            return None, {}
        stored = load_centroids(self.table)
        if stored is not None:
            path, centroids = stored
            log.info("semantic dedup: %d clusters from %s", len(centroids), path)
            return centroids, {CENTROIDS_KEY: path}
        sample = sample_embeddings(self.rows(col.IMAGE_EMBEDDING), semantic.sample_rows)
        if sample is None:
            return None, {}
        centroids, path = fit_and_save(self.table, sample, semantic, "fit")
        log.info("semantic dedup: fitted %d clusters on %d rows -> %s", len(centroids), len(sample), path)
        return centroids, {CENTROIDS_KEY: path}


_BUCKET = "_bucket"


def _tonight(column: str, score: str, staged):
    """The run's rows that passed every per-row filter, from the staged files: the key, ``column``, the score."""
    signature = partial(tonight_rows, column=column, score=score)
    signature.__name__ = signature.__qualname__ = "Tonight"
    ds = staged.tasks.read_parquet(staged.paths, staged.location.filesystem, [col.KEY, column, ROW_ID, col.KEEP, score])
    return ds.map_batches(signature, batch_format="pyarrow", batch_size=None)


def _history(column: str, files: list[tuple[str, dt.date]], tonight_shards: set[str], table: Location, tasks: Tasks):
    """Kept rows of the table's other partitions that have ``column``, except tonight's shards' (superseded)."""
    signature = partial(history_rows, column=column, dates=dict(files), superseded=sorted(tonight_shards))
    signature.__name__ = signature.__qualname__ = "History"
    ds = tasks.read_parquet(
        [path for path, _ in files], table.filesystem, [col.KEY, column, col.KEEP, col.SOURCE_SHARD], include_paths=True
    )
    return ds.map_batches(signature, batch_format="pyarrow", batch_size=None)


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
        return decide(bucket, list(groups(bucket, key_columns)))

    bucketed = rows.map_batches(with_bucket, batch_format="pyarrow", batch_size=None)
    return bucketed.groupby(_BUCKET, num_partitions=partitions).map_groups(each_group, batch_format="pyarrow")


def _hashable(column: pa.ChunkedArray) -> np.ndarray:
    """A key column as uint64 values equal exactly where the keys are equal (strings: by their hash)."""
    if pa.types.is_string(column.type):
        return np.array(
            [int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "big") for v in column.to_pylist()],
            np.uint64,
        )
    return column.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)


def _exact(rows, partitions: int):
    return _shuffled(rows, [col.IMAGE_SHA256], partitions, exact_candidates)  # (bucket, groups) -> candidates


def _near(rows, max_distance: int, partitions: int):
    banded = rows.map_batches(partial(band_rows, max_distance=max_distance), batch_format="pyarrow", batch_size=None)
    return _shuffled(banded, [BAND, BAND_VALUE], partitions, partial(decide_near, max_distance=max_distance))


def _semantic(rows, centroids: np.ndarray, eps: float, partitions: int):
    clustered = rows.map_batches(partial(cluster_rows, centroids=centroids), batch_format="pyarrow", batch_size=None)
    return _shuffled(clustered, [CLUSTER], partitions, partial(decide_semantic, eps=eps))


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


ROWS_PER_BUCKET = 100_000  # rows (of one method's few columns) that one shuffle bucket's task holds


def _partitions(rows: int) -> int:
    """Shuffle buckets: as many as bounded memory per bucket needs, no more (a small run's decision
    is mostly task start-up; the three methods already run at once)."""
    return max(1, -(-rows // ROWS_PER_BUCKET))


def sample_embeddings(rows, limit: int) -> np.ndarray | None:
    """Up to ``limit`` usable embeddings, the same ones on every try: those whose key hashes lowest."""
    hashed = partial(lowest_hashed, limit=limit)
    return merge_samples(_gather(rows.map_batches(hashed, batch_format="pyarrow", batch_size=None)), limit)


def _gather(ds) -> list[pa.Table]:
    return list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
