"""The files a pass reads, listed by vlpipe itself, and how to read one of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators import schema as col
from operators.input.prepare import SHARD_PATH

PARQUET_BATCH_ROWS = 1024  # rows per block read from a Parquet file: one row group is often the whole file


@dataclass(frozen=True)
class Source:
    """Files vlpipe has listed itself, and how to read one of them as bounded tables.

    Ray's own readers list the given files again in a task of their own: 2-3 s of a small
    run's wall time on two cores (ListFiles: 2.0-2.8 s wall, 0.1-0.2 s CPU), every run and
    every pass. ``with_path`` adds the file's path to each row (``SHARD_PATH``, as Ray's
    include_paths does) and the row's place in the file (``SOURCE_ROW``). ``done`` names, per
    path, the ``[start, stop)`` row ranges a resumed run already has: they are not read again.
    The S3 filesystem retries on its own.
    """

    paths: tuple[str, ...]
    read_file: Callable[[str], Iterator[pa.Table]]
    name: str
    with_path: bool = False
    done: Mapping[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)

    def tables(self, path: str) -> Iterator[pa.Table]:
        offset, done = 0, self.done.get(path, ())
        for table in self.read_file(path):
            n = table.num_rows
            if self.with_path:
                table = table.append_column(SHARD_PATH, pa.array([path] * n, pa.string()))
                table = table.append_column(col.SOURCE_ROW, pa.array(np.arange(offset, offset + n, dtype=np.int64)))
            if done:
                table = table.filter(pa.array(_not_done(offset, n, done)))
            offset += n
            if table.num_rows:
                yield table

    def without(self, done: Mapping[str, tuple[tuple[int, int], ...]], complete: set[str]) -> Source:
        """This source less the rows a resumed run already has; ``complete`` files are not opened at all."""
        return replace(self, paths=tuple(p for p in self.paths if p not in complete), done=dict(done))

    def all_tables(self) -> Iterator[pa.Table]:
        for path in self.paths:
            yield from self.tables(path)


def _not_done(offset: int, n: int, done: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Which of the rows ``offset .. offset + n`` lie in none of the ``done`` ranges."""
    keep = np.ones(n, dtype=bool)
    for start, stop in done:
        if start < offset + n and stop > offset:
            keep[max(start, offset) - offset : min(stop, offset + n) - offset] = False
    return keep


def parquet_source(
    paths: list[str], filesystem: pafs.FileSystem, columns: list[str] | None = None, *, with_path: bool = False
) -> Source:
    """Parquet files vlpipe has listed itself, read in blocks of ``PARQUET_BATCH_ROWS`` rows."""
    return Source(tuple(paths), partial(parquet_blocks, filesystem, columns), "ReadParquet", with_path)


def parquet_blocks(filesystem: pafs.FileSystem, columns: list[str] | None, path: str) -> Iterator[pa.Table]:
    with filesystem.open_input_file(path) as source:
        for part in pq.ParquetFile(source).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            yield pa.Table.from_batches([part])
