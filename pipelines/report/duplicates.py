"""The report's duplicate pairs: a few of the run's duplicates beside the rows they duplicate.

``pipelines.report.data`` picks the duplicates while it scans the run's rows (without
embeddings); here they and the rows they point at (``duplicate_of``: a key and a run_date, in
the run's own partition or another one) are read again from the table at the version the run
committed, so an old report does not change when another date is re-run. That read takes the
columns the comparison needs (hashes, embeddings) and filters on run_date and key, so only the
files and row groups that can hold those keys are opened.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.image import hashes
from operators.storage import StorageOptions
from pipelines.table.read import delta_dataset

PAIRS_PER_METHOD = 4
_LOOKUP_COLUMNS = (
    col.KEY,
    col.RUN_DATE,
    col.RUN_ID,
    col.CAPTION,
    col.SOURCE_SHARD,
    col.STATUS,
    col.KEEP,
    col.REJECT_REASON,
    col.IMAGE_SHA256,
    col.IMAGE_PHASH,
    col.IMAGE_EMBEDDING,
)


@dataclass
class DuplicatePair:
    """One duplicate row and the row it duplicates (None: not in the table at the run's version)."""

    method: str
    row: dict
    of: dict | None
    of_key: str
    of_run_date: dt.date
    distance: float | None = None  # near: differing pHash bits; semantic: cosine; exact: None (same SHA-256)


@dataclass
class Duplicates:
    """What the report's Duplicates section shows: per method, the run record's count and how many
    duplicate a row of another run_date (None when the run's rows are not in the table)."""

    counts: dict[str, int]
    other_dates: dict[str, int] | None
    pairs: list[DuplicatePair]


def duplicate_pairs(run: dict, chosen: list[dict], storage: StorageOptions) -> list[DuplicatePair]:
    """The pairs of ``chosen`` (duplicate rows of ``run``, with ``duplicate_of``), each with its distance."""
    if not chosen:
        return []
    found = _lookup(run, chosen, storage)
    pairs = []
    for row in chosen:
        of = row[col.DUPLICATE_OF]
        mine = {**row, col.RUN_DATE: run["run_date"]}
        own = _own(found, mine, run["run_id"])
        target = _target(found, (of[col.KEY], of[col.RUN_DATE]), mine)
        pairs.append(
            DuplicatePair(
                method=row[col.REJECT_REASON],
                row={**mine, col.IMAGE_SHA256: (own or {}).get(col.IMAGE_SHA256)},
                of=None if target is None else _without_embedding(target),
                of_key=of[col.KEY],
                of_run_date=of[col.RUN_DATE],
                distance=_distance(row[col.REJECT_REASON], own, target),
            )
        )
    return pairs


def _lookup(run: dict, chosen: list[dict], storage: StorageOptions) -> dict[tuple, list[dict]]:
    """The table's rows (at the run's version) with a chosen row's or its duplicate's (key, run_date)."""
    wanted = {(r[col.KEY], run["run_date"]) for r in chosen} | {
        (r[col.DUPLICATE_OF][col.KEY], r[col.DUPLICATE_OF][col.RUN_DATE]) for r in chosen
    }
    dataset = delta_dataset(run["output_uri"], storage, version=run["table_version"])
    # The key can be pushed down, unlike run_id: it is the table's first column, so every Delta writer
    # (vlpipe's and optimize's, which index the first 32) gives it file statistics.
    where = pc.field(col.RUN_DATE).isin(pa.array(sorted({d for _, d in wanted}), pa.date32())) & pc.field(col.KEY).isin(
        pa.array(sorted({k for k, _ in wanted}), pa.string())
    )
    columns = [c for c in _LOOKUP_COLUMNS if c in dataset.schema.names]
    found: dict[tuple, list[dict]] = {}
    for row in dataset.to_table(columns=columns, filter=where).to_pylist():
        if (row[col.KEY], row[col.RUN_DATE]) in wanted:
            found.setdefault((row[col.KEY], row[col.RUN_DATE]), []).append(row)
    return found


def _own(found: dict[tuple, list[dict]], row: dict, run_id: str) -> dict | None:
    """The chosen row itself among the rows read back: the run's row of that key from the same shard."""
    return next(
        (
            r
            for r in found.get((row[col.KEY], row[col.RUN_DATE]), [])
            if r[col.RUN_ID] == run_id and r[col.SOURCE_SHARD] == row[col.SOURCE_SHARD]
        ),
        None,
    )


def _target(found: dict[tuple, list[dict]], key_date: tuple, row: dict) -> dict | None:
    """The row ``row`` duplicates; a kept one first, where a key repeats within the partition."""
    candidates = [
        r
        for r in found.get(key_date, [])
        if (r[col.KEY], r[col.RUN_DATE], r[col.SOURCE_SHARD])
        != (row[col.KEY], row[col.RUN_DATE], row[col.SOURCE_SHARD])
    ]
    return min(candidates, key=lambda r: (not r[col.KEEP], r[col.SOURCE_SHARD] or ""), default=None)


def _distance(method: str, own: dict | None, target: dict | None) -> float | None:
    """How close the pair is under its method's own measure, recomputed from the stored values."""
    if own is None or target is None:
        return None
    if method == col.DUPLICATE_NEAR:
        a, b = own.get(col.IMAGE_PHASH), target.get(col.IMAGE_PHASH)
        return None if a is None or b is None else float(hashes.hamming(a, b))
    if method == col.DUPLICATE_SEMANTIC:
        a, b = own.get(col.IMAGE_EMBEDDING), target.get(col.IMAGE_EMBEDDING)
        return None if a is None or b is None else cosine(a, b)
    return None


def _without_embedding(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != col.IMAGE_EMBEDDING}


def cosine(a, b) -> float | None:
    """Cosine of two embeddings; stored ones are unit length, but a report should not rely on it."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if a.shape == b.shape and norms > 0 else None
