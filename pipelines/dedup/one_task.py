"""Dedup over a small run and its history in one task: the same groups and rules, without the shuffles."""

from __future__ import annotations

import datetime as dt
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import schema as col
from operators.decisions.duplicates import ROW_ID, DedupConfig, exact_candidates
from operators.storage import Location
from pipelines.dedup.history import CENTROIDS_KEY, fit_and_save
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
        return write_candidate_files(decide(found, list(groups(found, key_columns))), decisions)

    counts: dict[str, int] = {}
    if config.exact:
        counts["exact"] = decided(rows(col.IMAGE_SHA256), [col.IMAGE_SHA256], exact_candidates)
    if config.near:
        banded = band_rows(rows(col.IMAGE_PHASH), max_distance=config.near.max_distance)
        counts["near"] = decided(banded, [BAND, BAND_VALUE], partial(decide_near, max_distance=config.near.max_distance))
    if not config.semantic:
        return counts, None, {}
    embeddings = rows(col.IMAGE_EMBEDDING)
    if stored is not None:
        path, centroids = stored
    else:
        sample = merge_samples([lowest_hashed(embeddings, limit=config.semantic.sample_rows)], config.semantic.sample_rows)
        if sample is None:
            return counts, None, {}
        centroids, path = fit_and_save(table, sample, config.semantic, "fit")
    clustered = cluster_rows(embeddings, centroids=centroids)
    counts["semantic"] = decided(clustered, [CLUSTER], partial(decide_semantic, eps=config.semantic.eps))
    return counts, centroids, {CENTROIDS_KEY: path}
