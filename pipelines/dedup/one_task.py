"""Dedup over a small run and its history in one task: the same groups and rules, without the shuffles."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
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


@dataclass(frozen=True)
class OneTask:
    """Every method over the whole (small) run in one task: read, group and decide, write the candidates.

    The same functions the shuffled path runs per bucket, with the whole run as one bucket; a
    small run's decision was mostly the start-up of its Ray Data jobs (~10 s of the demo's run).
    """

    config: DedupConfig
    table: Location
    staged_paths: list[str]
    staging: Location
    history: dict[str, list[tuple[str, dt.date]]]  # per compared column, the table's files that have it
    shards: set[str]  # tonight's shards: their earlier rows are superseded, never duplicates
    decisions: Location
    stored: tuple[str, np.ndarray] | None  # the table's centroids, where it has any

    def decide(self) -> tuple[dict[str, int], np.ndarray | None, dict]:
        """The candidates written below ``decisions``; the counts, centroids and commit metadata."""
        config, stored = self.config, self.stored
        if not self.staged_paths:  # no row made it through the first pass: nothing to decide
            return {}, stored[1] if stored else None, {CENTROIDS_KEY: stored[0]} if stored else {}
        counts: dict[str, int] = {}
        if config.exact:
            counts["exact"] = self.decided(self.rows(col.IMAGE_SHA256), [col.IMAGE_SHA256], exact_candidates)
        if config.near:
            distance = config.near.max_distance
            banded = band_rows(self.rows(col.IMAGE_PHASH), max_distance=distance)
            counts["near"] = self.decided(banded, [BAND, BAND_VALUE], partial(decide_near, max_distance=distance))
        if not config.semantic:
            return counts, None, {}
        return self.semantic(counts)

    def semantic(self, counts: dict[str, int]) -> tuple[dict[str, int], np.ndarray | None, dict]:
        semantic = self.config.semantic
        embeddings = self.rows(col.IMAGE_EMBEDDING)
        if self.stored is not None:
            path, centroids = self.stored
        else:
            sample = merge_samples([lowest_hashed(embeddings, limit=semantic.sample_rows)], semantic.sample_rows)
            if sample is None:
                return counts, None, {}
            centroids, path = fit_and_save(self.table, sample, semantic, "fit")
        clustered = cluster_rows(embeddings, centroids=centroids)
        counts["semantic"] = self.decided(clustered, [CLUSTER], partial(decide_semantic, eps=semantic.eps))
        return counts, centroids, {CENTROIDS_KEY: path}

    def rows(self, column: str) -> pa.Table:
        """Tonight's rows and the history's that have ``column``, as the method compares them."""
        score = self.config.keep_by
        columns = [col.KEY, column, ROW_ID, col.KEEP, score]
        fs = self.staging.filesystem
        parts = [
            tonight_rows(pq.read_table(path, filesystem=fs, columns=columns), column=column, score=score)
            for path in self.staged_paths
        ]
        dates = dict(self.history.get(column, []))
        for path in dates:
            part = pq.read_table(
                path, filesystem=self.table.filesystem, columns=[col.KEY, column, col.KEEP, col.SOURCE_SHARD]
            )
            part = part.append_column("path", pa.array([path] * part.num_rows, pa.string()))
            parts.append(history_rows(part, column=column, dates=dates, superseded=sorted(self.shards)))
        return pa.concat_tables(parts)

    def decided(self, found: pa.Table, key_columns: list[str], decide) -> int:
        return write_candidate_files(decide(found, list(groups(found, key_columns))), self.decisions)


def decide_in_one_task(task: OneTask) -> tuple[dict[str, int], np.ndarray | None, dict]:
    """``task.decide()`` as a plain function, for the executor's ``run_task``."""
    return task.decide()
