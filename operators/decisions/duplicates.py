"""Deduplication decisions within one group of rows, without Ray.

``pipelines.dedup.stage`` groups the run's rows with the table's earlier rows (by
SHA-256, by pHash band, by k-means cluster) and hands each group to the
functions here. Every group is decided the same way: its rows are put in
order, best first, and each of tonight's rows that has a better row within the
method's threshold is a duplicate of the closest such row. A row published by
an earlier run is better than any of tonight's, so yesterday's output never
changes; among tonight's rows the higher ``keep_by`` score wins, ties by key.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from operators import schema as col

# Columns of the rows a group is decided on (tonight's from staging, earlier ones from the table).
ROW_ID = col.ROW_ID  # tonight's rows: where the staged row is; earlier rows: -1
SCORE = "_score"  # tonight's keep_by score (null ranks last)
TONIGHT = "_tonight"

# Columns of a candidate: one of tonight's rows, the better row it duplicates, and how close they are.
METHOD = "method"
DISTANCE = "distance"  # Hamming bits (exact: 0), or 1 - cosine
DUP_KEY, DUP_DATE, DUP_TONIGHT, DUP_SCORE = "dup_key", "dup_date", "dup_tonight", "dup_score"
CANDIDATE_SCHEMA = pa.schema(
    [
        (ROW_ID, pa.int64()),
        (METHOD, pa.string()),
        (DISTANCE, pa.float64()),
        (DUP_KEY, pa.string()),
        (DUP_DATE, pa.date32()),
        (DUP_TONIGHT, pa.bool_()),
        (DUP_SCORE, pa.float64()),
    ]
)
KEEP_BY_COLUMNS = (col.CLIP_SCORE, col.CLIP_SCORE_BEST, col.ITM_SCORE, col.AESTHETIC_SCORE)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NearConfig(_Strict):
    """pHash near-duplicates: rows within ``max_distance`` bits of a better row."""

    # The hash is split in max_distance + 1 bands; more bands of fewer bits make larger groups.
    max_distance: int = Field(4, ge=0, le=15)


class SemanticConfig(_Strict):
    """SemDeDup on ``image_embedding``: rows at cosine >= 1 - ``eps`` to a better row in their cluster."""

    eps: float = Field(0.02, gt=0.0, lt=1.0)
    # None: one cluster per ``rows_per_cluster`` rows of the first fit's sample.
    clusters: int | None = Field(None, ge=1)
    rows_per_cluster: int = Field(1000, ge=1)
    sample_rows: int = Field(100_000, ge=1)
    iterations: int = Field(20, ge=1)
    seed: int = 0


class DedupConfig(_Strict):
    """``dedup:``: three methods, each on or off, within the run and against the table's earlier rows."""

    exact: bool = False
    near: NearConfig | None = None
    semantic: SemanticConfig | None = None
    # None: the CLIP score the filter judges by (clip_score_best with filter.caption: best).
    keep_by: Literal[KEEP_BY_COLUMNS] | None = None
    history: bool = True  # False: only within the run

    @property
    def enabled(self) -> bool:
        return self.exact or self.near is not None or self.semantic is not None


def best_first(group: pa.Table) -> np.ndarray:
    """Row indices of a group, best first: earlier runs' rows (oldest first), then tonight's by score, then key."""
    tonight = group.column(TONIGHT).to_numpy(zero_copy_only=False).astype(np.int8)
    dates = pc.fill_null(group.column(col.RUN_DATE).cast(pa.int32()), 0).to_numpy(zero_copy_only=False)
    scores = pc.fill_null(group.column(SCORE), -np.inf).to_numpy(zero_copy_only=False)
    keys = np.array(group.column(col.KEY).to_pylist(), dtype=str)
    row_ids = group.column(ROW_ID).to_numpy(zero_copy_only=False)
    # np.lexsort sorts by its last key first.
    return np.lexsort((row_ids, keys, -scores, dates, tonight))


Groups = list[np.ndarray] | None
"""Row indices of each group of a table that share the method's key; None: the whole table is one group.

A shuffle bucket holds many groups (most of them tiny): they are decided together, ranked once."""


def exact_candidates(table: pa.Table, groups: Groups = None) -> pa.Table:
    """Rows sharing one SHA-256: every one of tonight's rows but the best is a duplicate of the best."""
    rank, tonight = _ranks(table), _tonight(table)
    rows, dups = [], []
    for group in _all(table, groups):
        members = group[np.argsort(rank[group], kind="stable")]
        losers = members[1:][tonight[members[1:]]]
        rows.append(losers)
        dups.append(np.full(len(losers), members[0]))
    rows, dups = _joined(rows), _joined(dups)
    return _candidates(table, rows, dups, np.zeros(len(rows)), col.DUPLICATE_EXACT)


def near_candidates(table: pa.Table, max_distance: int, groups: Groups = None) -> pa.Table:
    """Rows sharing one pHash band: each of tonight's rows against every better row of its group."""
    # Unsigned: numpy counts the bits of a signed value's absolute value.
    hashes = table.column(col.IMAGE_PHASH).to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)

    def distances(rows: np.ndarray, better: np.ndarray) -> np.ndarray:
        return np.bitwise_count(hashes[rows, None] ^ hashes[None, better]).astype(np.float64)

    return _closest_better(table, groups, distances, float(max_distance), col.DUPLICATE_NEAR)


def semantic_candidates(table: pa.Table, embeddings: np.ndarray, eps: float, groups: Groups = None) -> pa.Table:
    """Rows of one cluster (``embeddings`` row-aligned with ``table``): cosine against every better row."""

    def distances(rows: np.ndarray, better: np.ndarray) -> np.ndarray:
        return 1.0 - (embeddings[rows] @ embeddings[better].T).astype(np.float64)

    return _closest_better(table, groups, distances, eps, col.DUPLICATE_SEMANTIC)


_MATRIX_CELLS = 1 << 22  # distances computed at once (32 MB): bounds memory in a large group


def _closest_better(table: pa.Table, groups: Groups, distances, threshold: float, method: str) -> pa.Table:
    """For each of tonight's rows, the closest better row of its group within ``threshold`` (ties: the better one)."""
    rank, tonight = _ranks(table), _tonight(table)
    found_rows, found_dups, found_dist = [], [], []
    for group in _all(table, groups):
        members = group[np.argsort(rank[group], kind="stable")]
        positions = np.flatnonzero(tonight[members])
        positions = positions[positions > 0]
        chunk = max(1, _MATRIX_CELLS // len(members))
        for start in range(0, len(positions), chunk):
            at = positions[start : start + chunk]
            matrix = distances(members[at], members[: at[-1]])
            matrix[np.arange(matrix.shape[1])[None, :] >= at[:, None]] = np.inf  # only rows ranked before
            closest = np.argmin(matrix, axis=1)  # the first minimum: the better of equally close rows
            best = matrix[np.arange(len(at)), closest]
            hit = best <= threshold + 1e-9
            found_rows.append(members[at[hit]])
            found_dups.append(members[closest[hit]])
            found_dist.append(best[hit])
    return _candidates(table, _joined(found_rows), _joined(found_dups), _joined(found_dist, np.float64), method)


def _ranks(table: pa.Table) -> np.ndarray:
    rank = np.empty(table.num_rows, np.int64)
    rank[best_first(table)] = np.arange(table.num_rows)
    return rank


def _tonight(table: pa.Table) -> np.ndarray:
    return table.column(TONIGHT).to_numpy(zero_copy_only=False).astype(bool)


def _all(table: pa.Table, groups: Groups) -> list[np.ndarray]:
    return [np.arange(table.num_rows)] if groups is None else groups


def _joined(parts: list[np.ndarray], dtype=np.int64) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _candidates(table: pa.Table, rows: np.ndarray, dups: np.ndarray, distance: np.ndarray, method: str) -> pa.Table:
    dup = table.take(pa.array(dups, pa.int64()))
    return pa.table(
        {
            ROW_ID: table.column(ROW_ID).take(pa.array(rows, pa.int64())),
            METHOD: pa.array([method] * len(rows), pa.string()),
            DISTANCE: pa.array(distance, pa.float64()),
            DUP_KEY: dup.column(col.KEY),
            DUP_DATE: dup.column(col.RUN_DATE),
            DUP_TONIGHT: dup.column(TONIGHT),
            DUP_SCORE: dup.column(SCORE).cast(pa.float64()),
        },
        schema=CANDIDATE_SCHEMA,
    )


def pick_decisions(candidates: pa.Table) -> pa.Table:
    """One decision per row from all its candidates: exact before near before semantic, then the closest,
    then the better duplicate (an earlier run's row, then the higher score, then the key)."""
    if candidates.num_rows == 0:
        return candidates
    precedence = {m: i for i, m in enumerate(col.DUPLICATE_REASONS)}
    method = np.array([precedence[m] for m in candidates.column(METHOD).to_pylist()])
    dup_tonight = candidates.column(DUP_TONIGHT).to_numpy(zero_copy_only=False).astype(np.int8)
    dup_dates = pc.fill_null(candidates.column(DUP_DATE).cast(pa.int32()), 0).to_numpy(zero_copy_only=False)
    dup_scores = pc.fill_null(candidates.column(DUP_SCORE), -np.inf).to_numpy(zero_copy_only=False)
    dup_keys = np.array(candidates.column(DUP_KEY).to_pylist(), dtype=str)
    distance = candidates.column(DISTANCE).to_numpy(zero_copy_only=False)
    row_ids = candidates.column(ROW_ID).to_numpy(zero_copy_only=False)
    order = np.lexsort((dup_keys, -dup_scores, dup_dates, dup_tonight, distance, method, row_ids))
    ordered_ids = row_ids[order]
    first = np.ones(len(order), bool)
    first[1:] = ordered_ids[1:] != ordered_ids[:-1]
    return candidates.take(pa.array(order[first], pa.int64()))


def fit_centroids(embeddings: np.ndarray, clusters: int, iterations: int, seed: int) -> np.ndarray:
    """Spherical k-means (faiss) on L2-normalised embeddings: ``clusters`` unit-length centroids, float32."""
    import logging

    # faiss's loader logs at INFO every instruction set it tries and this CPU lacks.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    sample = np.ascontiguousarray(embeddings, dtype=np.float32)
    clusters = max(1, min(clusters, len(sample)))
    kmeans = faiss.Kmeans(
        sample.shape[1],
        clusters,
        niter=iterations,
        spherical=True,
        seed=seed,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, len(sample) // clusters + 1),
    )
    kmeans.train(sample)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def assign_clusters(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest centroid (highest cosine) of each row, int32."""
    out = np.empty(len(embeddings), np.int32)
    for start in range(0, len(embeddings), 4096):
        out[start : start + 4096] = np.argmax(embeddings[start : start + 4096] @ centroids.T, axis=1)
    return out
