"""The first step after reading: the configured input columns under vlpipe's names."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.decode import decode_captions
from operators.stage import Stage

SHARD_PATH = "path"  # the column Ray's reader adds with include_paths


@dataclass(frozen=True)
class ColumnMapping:
    """Which input columns hold the key, the caption and the image, and which pass through."""

    key: str
    caption: str
    image: str
    extra: tuple[str, ...] = ()

    @property
    def read(self) -> tuple[str, ...]:
        """The only columns read from the shards (projection pushdown)."""
        return tuple(dict.fromkeys([self.key, self.caption, self.image, *self.extra]))


def prepare_stage(columns: ColumnMapping, shard_prefix: str) -> Stage:
    """The prepare stage's contract; it runs fused into the decode tasks."""
    return Stage(
        name="prepare", kind="fused", build=partial(PrepareInput, columns, shard_prefix),
        reads=(*columns.read, SHARD_PATH), adds=(col.KEY, col.CAPTION, col.SOURCE_SHARD, col.IMAGE, *columns.extra),
        details=(f"key <- {columns.key}, caption <- {columns.caption}, image <- {columns.image}",),
    )


class PrepareInput:
    """Rename the configured input columns to vlpipe's names and normalise their types."""

    def __init__(self, columns: ColumnMapping, shard_prefix: str):
        self.columns = columns
        self.shard_prefix = shard_prefix

    def __call__(self, batch: pa.Table) -> pa.Table:
        key = batch.column(self.columns.key)
        out = {
            col.KEY: key if pa.types.is_string(key.type) else key.cast(pa.string()),
            col.CAPTION: decode_captions(batch.column(self.columns.caption)),
            col.SOURCE_SHARD: pc.binary_join_element_wise(self.shard_prefix, batch.column(SHARD_PATH), ""),
        }
        for name in self.columns.extra:
            out[name] = batch.column(name)
        out[col.IMAGE] = batch.column(self.columns.image)
        return pa.table(out)
