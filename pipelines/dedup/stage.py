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
import logging
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators import schema as col
from operators.decisions.duplicates import (
    CANDIDATE_SCHEMA,
    DUP_DATE,
    DUP_KEY,
    METHOD,
    ROW_ID,
    DedupConfig,
    assign_clusters,
    pick_decisions,
)
from operators.stage import Stage, Staged
from operators.storage import Location
from pipelines import hooks
from pipelines.dedup.history import add_actions, history_files, load_centroids
from pipelines.dedup.one_task import OneTask, decide_in_one_task
from pipelines.dedup.rows import embeddings_of
from pipelines.dedup.shuffle import ShuffledRun
from pipelines.execute.staging import ROW_BITS

log = logging.getLogger(__name__)


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
        methods.append(f"near: pHash within {config.near.max_distance} bits ({config.near.max_distance + 1} bands)")
    if config.semantic:
        reads.append(col.IMAGE_EMBEDDING)
        methods.append(f"semantic: cosine >= {1 - config.semantic.eps:g} within a k-means cluster")
    against = "this run and every earlier run_date in the table" if config.history else "this run only"
    return Stage(
        name="dedup",
        kind="aggregate",
        reads=tuple(reads),
        adds=(col.SEMANTIC_CLUSTER, col.DUPLICATE_OF),
        build=partial(Dedup, config, table, run_date),
        details=(
            *methods,
            f"against {against}; ties to the higher {config.keep_by}, then the key",
            "distributed shuffles; no image bytes read from the table",
        ),
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

    def combine(self, partials: list[pa.Table], staged: Staged) -> DedupState:
        shards = {s for p in partials for s in p.column("shard").to_pylist()}
        decisions = staged.location.child("decisions")
        decisions.filesystem.create_dir(decisions.path, recursive=True)
        actions = add_actions(self.table) if self.config.history else None  # the log, read once for all methods
        history_rows = int(pc.sum(actions.column("num_records")).as_py() or 0) if actions is not None else 0
        bound = staged.rows + history_rows
        if bound <= ONE_TASK_ROWS:
            counts, centroids, metadata = self._in_one_task(staged, shards, actions, decisions)
        else:
            log.info("dedup: %d rows with the history, more than one task decides: Ray Data shuffles them", bound)
            run = ShuffledRun(self.config, self.table, self.run_date, staged, shards, actions, decisions)
            counts, centroids, metadata = run.decide(bound)
        hooks.reach("dedup:decided")
        return DedupState(decisions, centroids, counts, metadata)

    def apply(self, batch: pa.Table, state: DedupState) -> pa.Table:
        return mark_duplicates(batch, state, self.run_date)

    def _in_one_task(self, staged, shards: set[str], actions: pa.Table | None, decisions: Location):
        """A small decision in one Ray task: the same groups and rules, without the shuffle jobs' start-up."""
        columns = [
            c
            for c, on in (
                (col.IMAGE_SHA256, self.config.exact),
                (col.IMAGE_PHASH, self.config.near),
                (col.IMAGE_EMBEDDING, self.config.semantic),
            )
            if on
        ]
        history = {c: history_files(self.table, self.run_date, c, actions=actions) if actions else [] for c in columns}
        stored = load_centroids(self.table) if self.config.semantic else None
        task = OneTask(self.config, self.table, staged.paths, staged.location, history, shards, decisions, stored)
        return staged.tasks.run_task(decide_in_one_task, task)


ONE_TASK_ROWS = 200_000  # up to this many rows (tonight's staged and the history's), one task decides


def mark_duplicates(batch: pa.Table, state: DedupState, run_date: dt.date) -> pa.Table:
    """Second pass: the staged rows with their decisions, their cluster and ``duplicate_of``."""
    decisions = _decisions_for(batch.column(ROW_ID), state.decisions)
    n = batch.num_rows
    reasons = np.array(batch.column(col.REJECT_REASON).to_pylist(), dtype=object)
    keep = batch.column(col.KEEP).to_numpy(zero_copy_only=False).copy()
    dup_keys, dup_dates = [None] * n, [None] * n
    if decisions.num_rows:
        position = {row_id: i for i, row_id in enumerate(batch.column(ROW_ID).to_pylist())}
        for row_id, method, key, day in zip(
            decisions.column(ROW_ID).to_pylist(),
            decisions.column(METHOD).to_pylist(),
            decisions.column(DUP_KEY).to_pylist(),
            decisions.column(DUP_DATE).to_pylist(),
        ):
            i = position.get(row_id)
            if i is None or not keep[i]:
                continue
            keep[i], reasons[i] = False, method
            dup_keys[i], dup_dates[i] = key, day or run_date
    duplicate_of = pa.StructArray.from_arrays(
        [pa.array(dup_keys, pa.string()), pa.array(dup_dates, pa.date32())],
        fields=list(col.DUPLICATE_OF_TYPE),
        mask=pa.array([k is None for k in dup_keys]),
    )
    out = batch.drop_columns(
        [c for c in (col.KEEP, col.REJECT_REASON, col.SEMANTIC_CLUSTER, col.DUPLICATE_OF) if c in batch.column_names]
    )
    out = out.append_column(col.SEMANTIC_CLUSTER, _clusters(batch, state.centroids))
    out = out.append_column(col.DUPLICATE_OF, duplicate_of)
    return out.append_column(col.KEEP, pa.array(keep, pa.bool_())).append_column(
        col.REJECT_REASON, pa.array(reasons.tolist(), pa.string())
    )


def _clusters(batch: pa.Table, centroids: np.ndarray | None) -> pa.Array:
    if centroids is None or col.IMAGE_EMBEDDING not in batch.column_names:
        return pa.nulls(batch.num_rows, pa.int32())
    vectors, usable = embeddings_of(batch)
    clusters = np.zeros(batch.num_rows, np.int32)
    if usable.any():
        clusters[usable] = assign_clusters(vectors[usable], centroids)
    return pa.array(clusters, pa.int32(), mask=~usable)


def _decisions_for(row_ids: pa.ChunkedArray, decisions: Location) -> pa.Table:
    """The winning candidate of each of these rows that has any (from its staged file's folder)."""

    tables = []
    for file_id in np.unique(pc.shift_right(row_ids, ROW_BITS).to_numpy()):
        found = decisions.filesystem.get_file_info(
            pafs.FileSelector(f"{decisions.path}/{file_id}", allow_not_found=True)
        )
        tables += [pq.read_table(f.path, filesystem=decisions.filesystem) for f in found if f.path.endswith(".parquet")]
    return pick_decisions(pa.concat_tables(tables)) if tables else CANDIDATE_SCHEMA.empty_table()
