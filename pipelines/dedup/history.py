"""The table's earlier rows that dedup compares against, and the k-means centroids it keeps beside them."""

from __future__ import annotations

import datetime as dt
import io
import uuid

import numpy as np
import pyarrow as pa

from operators import schema as col
from operators.decisions.duplicates import SemanticConfig, fit_centroids
from operators.storage import Location

CENTROIDS_DIR = "_vlpipe_dedup"  # beside the data, hidden from Delta readers like every "_" folder


CENTROIDS_KEY = "vlpipe.dedup.centroids"  # commit metadata: the centroids file the commit's rows were clustered with


def add_actions(table: Location) -> pa.Table | None:
    """The table's current data files (Delta add actions, flattened), or None before its first commit."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(table.uri, storage_options=table.delta_options):
        return None
    return pa.table(DeltaTable(table.uri, storage_options=table.delta_options).get_add_actions(flatten=True))


def history_files(
    table: Location, run_date: dt.date, column: str | None = None, *, actions: pa.Table | None = None
) -> list[tuple[str, dt.date]]:
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
        usable = [
            (n is None and always_there) or (n is not None and n < rows)
            for n, rows in zip(nulls, actions.column("num_records").to_pylist())
        ]
    return [
        (f"{root}/{path}", dt.date.fromisoformat(day))
        for path, day, ok in zip(actions.column("path").to_pylist(), dates, usable)
        if ok and day != run_date.isoformat()
    ]


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


def fit_and_save(table: Location, sample: np.ndarray, semantic: SemanticConfig, prefix: str) -> tuple[np.ndarray, str]:
    """k-means centroids fitted on ``sample``, written below the table; they count once a commit names them."""
    clusters = semantic.clusters or max(1, -(-len(sample) // semantic.rows_per_cluster))
    centroids = fit_centroids(sample, clusters, semantic.iterations, semantic.seed)
    return centroids, save_centroids(table, centroids, f"{prefix}-{uuid.uuid4().hex[:12]}")
