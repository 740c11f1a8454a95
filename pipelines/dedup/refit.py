"""``vlpipe dedup refit``: new centroids from a sample of the table's kept rows."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.decisions.duplicates import SemanticConfig
from operators.stage import Tasks
from operators.storage import Location
from pipelines.dedup.history import CENTROIDS_KEY, fit_and_save, history_files
from pipelines.dedup.shuffle import sample_embeddings


@dataclass(frozen=True)
class Refit:
    """What ``vlpipe dedup refit`` did."""

    path: str
    clusters: int
    sample_rows: int
    version: int

    def __str__(self) -> str:
        return (
            f"fitted {self.clusters} clusters on {self.sample_rows} kept rows -> {self.path} "
            f"(table version {self.version}); later runs cluster their rows with these"
        )


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
    centroids, path = fit_and_save(table, sample, config, "refit")
    delta = DeltaTable(table.uri, storage_options=table.delta_options)
    delta.create_write_transaction(
        [],
        mode="append",
        schema=delta.schema(),
        commit_properties=CommitProperties(custom_metadata={CENTROIDS_KEY: path, "vlpipe.operation": "dedup-refit"}),
    )
    return Refit(
        path, len(centroids), len(sample), DeltaTable(table.uri, storage_options=table.delta_options).version()
    )
