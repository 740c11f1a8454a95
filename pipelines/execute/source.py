"""The files a pass reads, listed by vlpipe itself, and how to read one of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators.input.prepare import SHARD_PATH

PARQUET_BATCH_ROWS = 1024  # rows per block read from a Parquet file: one row group is often the whole file


@dataclass(frozen=True)
class Source:
    """Files vlpipe has listed itself, and how to read one of them as bounded tables.

    Ray's own readers list the given files again in a task of their own: 2-3 s of a small
    run's wall time on two cores (ListFiles: 2.0-2.8 s wall, 0.1-0.2 s CPU), every run and
    every pass. ``with_path`` adds the file's path to each row (``SHARD_PATH``, as Ray's
    include_paths does). The S3 filesystem retries on its own.
    """

    paths: tuple[str, ...]
    read_file: Callable[[str], Iterator[pa.Table]]
    name: str
    with_path: bool = False

    def tables(self, path: str) -> Iterator[pa.Table]:
        for table in self.read_file(path):
            yield (
                table.append_column(SHARD_PATH, pa.array([path] * table.num_rows, pa.string()))
                if self.with_path
                else table
            )

    def all_tables(self) -> Iterator[pa.Table]:
        for path in self.paths:
            yield from self.tables(path)


def parquet_source(
    paths: list[str], filesystem: pafs.FileSystem, columns: list[str] | None = None, *, with_path: bool = False
) -> Source:
    """Parquet files vlpipe has listed itself, read in blocks of ``PARQUET_BATCH_ROWS`` rows."""
    return Source(tuple(paths), partial(parquet_blocks, filesystem, columns), "ReadParquet", with_path)


def parquet_blocks(filesystem: pafs.FileSystem, columns: list[str] | None, path: str) -> Iterator[pa.Table]:
    with filesystem.open_input_file(path) as source:
        for part in pq.ParquetFile(source).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            yield pa.Table.from_batches([part])
