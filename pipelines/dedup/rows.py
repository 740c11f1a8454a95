"""The rows each dedup method compares, and its decision over one group of them: plain Arrow, no engine.

The one-task and the shuffled decision run these same functions, on the whole run or a bucket at a time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators import schema as col
from operators.decisions.duplicates import (
    ROW_ID,
    SCORE,
    TONIGHT,
    assign_clusters,
    near_candidates,
    semantic_candidates,
)
from operators.image import hashes
from operators.storage import Location
from operators.tensors import embedding_rows
from pipelines.execute.staging import ROW_BITS

BAND, BAND_VALUE = "_band", "_band_value"  # internal columns of near dedup: a row per pHash band
CLUSTER = "_cluster"  # internal column of semantic dedup: the row's k-means cluster


def tonight_rows(batch: pa.Table, column: str, score: str) -> pa.Table:
    batch = batch.filter(pc.field(col.KEEP) & pc.is_valid(pc.field(column)))
    n = batch.num_rows
    return pa.table(
        {
            col.KEY: batch.column(col.KEY),
            column: batch.column(column),
            ROW_ID: batch.column(ROW_ID),
            col.RUN_DATE: pa.nulls(n, pa.date32()),
            SCORE: batch.column(score).cast(pa.float64()),
            TONIGHT: pa.array(np.ones(n, bool)),
        }
    )


def history_rows(batch: pa.Table, column: str, dates: dict[str, dt.date], superseded: list[str]) -> pa.Table:
    batch = batch.filter(
        pc.field(col.KEEP)
        & pc.is_valid(pc.field(column))
        & ~pc.field(col.SOURCE_SHARD).isin(pa.array(superseded, pa.string()))
    )
    n = batch.num_rows
    run_dates = pa.array([dates[p] for p in batch.column("path").to_pylist()], pa.date32())
    return pa.table(
        {
            col.KEY: batch.column(col.KEY),
            column: batch.column(column),
            ROW_ID: pa.array(np.full(n, -1, np.int64)),
            col.RUN_DATE: run_dates,
            SCORE: pa.nulls(n, pa.float64()),
            TONIGHT: pa.array(np.zeros(n, bool)),
        }
    )


def groups(table: pa.Table, key_columns: list[str]):
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


def band_rows(batch: pa.Table, max_distance: int) -> pa.Table:
    """One row per band of each hash: rows within max_distance bits share a band's value."""
    values = hashes.band_values(batch.column(col.IMAGE_PHASH).to_numpy(zero_copy_only=False), max_distance)
    bands = values.shape[1]
    repeated = batch.take(pa.array(np.repeat(np.arange(batch.num_rows), bands), pa.int64()))
    band = np.tile(np.arange(bands, dtype=np.int8), batch.num_rows)
    return repeated.append_column(BAND, pa.array(band, pa.int8())).append_column(
        BAND_VALUE, pa.array(values.reshape(-1).astype(np.int64), pa.int64())
    )


def decide_near(bucket: pa.Table, groups: list[np.ndarray], max_distance: int) -> pa.Table:
    return near_candidates(bucket, max_distance, groups)


def cluster_rows(batch: pa.Table, centroids: np.ndarray) -> pa.Table:
    vectors, usable = embeddings_of(batch)
    batch = batch.filter(pa.array(usable))
    return batch.append_column(CLUSTER, pa.array(assign_clusters(vectors[usable], centroids), pa.int32()))


def decide_semantic(bucket: pa.Table, groups: list[np.ndarray], eps: float) -> pa.Table:
    vectors, _ = embeddings_of(bucket)
    return semantic_candidates(bucket, vectors, eps, groups)


def embeddings_of(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    column = batch.column(col.IMAGE_EMBEDDING)
    lengths = pc.list_value_length(column).drop_null()
    if len(lengths) == 0:
        return np.zeros((batch.num_rows, 0), np.float32), np.zeros(batch.num_rows, bool)
    return embedding_rows(column, lengths[0].as_py(), "dedup")


def write_candidate_files(batch: pa.Table, decisions: Location) -> int:
    """Candidates into their staged file's folder (``mark_duplicates`` reads a file's folder); returns how many."""
    files = pc.shift_right(batch.column(ROW_ID), ROW_BITS)
    for file_id in pc.unique(files).to_pylist():
        part = batch.filter(pc.equal(files, file_id))
        folder = f"{decisions.path}/{file_id}"
        decisions.filesystem.create_dir(folder, recursive=True)
        pq.write_table(part, f"{folder}/{uuid.uuid4().hex}.parquet", filesystem=decisions.filesystem)
    return batch.num_rows


def lowest_hashed(batch: pa.Table, limit: int) -> pa.Table:
    """The batch's ``limit`` usable embeddings whose keys hash lowest, with those hashes."""
    vectors, usable = embeddings_of(batch)
    keys = batch.column(col.KEY).to_pylist()
    order = np.array(
        [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") >> 1 for k in keys], np.int64
    )
    kept = np.flatnonzero(usable)
    kept = kept[np.argsort(order[kept], kind="stable")][:limit]
    return pa.table(
        {
            "order": pa.array(order[kept], pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors[kept].reshape(-1)), max(vectors.shape[1], 1)),
        }
    )


def merge_samples(parts: list[pa.Table], limit: int) -> np.ndarray | None:
    tables = [t for t in parts if t.num_rows]
    if not tables:
        return None
    merged = pa.concat_tables(tables)
    merged = merged.take(pc.sort_indices(merged, [("order", "ascending")])[:limit])
    vectors = merged.column("vector").combine_chunks()
    return vectors.values.to_numpy().reshape(len(vectors), -1)
