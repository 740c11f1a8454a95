"""One export shard, written by one task: its rows read back from the table, their images, its files.

The driver hands a task the shard's row references (data file and row number, in export
order); the task reads those rows' columns from the table's data files (only the row
groups that hold them), and their original image bytes run by run of rows from one
source shard: from the table's ``image_bytes`` where it has them, else from the source
shard (``pipelines.input.images``). A task holds one shard's rows and one run's images.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import schema as col
from operators.storage import Location, StorageOptions
from operators.tensors import embedding_rows
from pipelines.export.files import ExportedShard, Format, embedding_files, open_output, shard_files, write_bytes
from pipelines.export.samples import caption_text, image_ext, json_row
from pipelines.input.images import ImageSource, MissingSourceError, source_images

FILE, ROW, NAME = "_file", "_row", "_name"  # a row's data file (index into the context's), row in it, sample name
IMAGE_COLUMN = col.EXPORT_IMAGE
_BATCH_ROWS = 4096
_IMAGE_ROW_GROUP = 1000  # Parquet shards: row groups a reader can take one at a time, images and all


@dataclass(frozen=True)
class ExportContext:
    """What every shard task of one export shares."""

    table: Location
    files: tuple[str, ...]  # the chosen data files, paths inside the table's filesystem
    schema: pa.Schema  # the scalar columns every sample carries (``export_samples.scalar_fields``)
    embedding_schema: pa.Schema  # the embedding columns, when the export writes them
    bytes_in_table: bool
    image_sources: dict[str, ImageSource]  # per run id: how its source shards keep key and image
    storage: StorageOptions  # resolved on the driver, for the source shards
    target: Location
    fmt: Format


@dataclass(frozen=True)
class ShardJob:
    number: int
    rows: pa.Table  # key, source_shard, run_id, run_date, status, FILE, ROW, NAME: the shard's rows in order


def write_shard(context: ExportContext, job: ShardJob) -> ExportedShard:
    """Write shard ``job.number`` whole; a row whose image cannot be found fails it."""
    fields = pa.schema([f for f in (*context.schema, *context.embedding_schema) if f.name != col.RUN_DATE])
    rows = table_rows(context, job.rows, fields).append_column(col.RUN_DATE, job.rows.column(col.RUN_DATE))
    scalars = rows.select(context.schema.names).cast(context.schema)
    writer = (TarShard if context.fmt == "webdataset" else ParquetShard)(context, job.number)
    images, sources = 0, defaultdict(int)
    for start, stop in source_runs(job.rows.column(col.SOURCE_SHARD)):
        part = job.rows.slice(start, stop - start)
        data, where = run_images(context, part)
        writer.add(scalars.slice(start, stop - start), part.column(NAME).to_pylist(), data)
        images += sum(d is not None for d in data)
        for place, count in where.items():
            sources[place] += count
    writer.close()
    names = list(shard_files(job.number, context.fmt))
    embedded = None
    if len(context.embedding_schema):
        embedded = write_embeddings(context.target, job.number, rows, scalars)
        names += list(embedding_files(job.number)) if embedded else []
    sizes = _sizes(context.target, names)
    return ExportedShard(
        number=job.number,
        samples=job.rows.num_rows,
        images=images,
        embedding_rows=embedded,
        image_bytes_from=dict(sources),
        files=sizes,
    )


def source_runs(shards: pa.ChunkedArray | pa.Array) -> list[tuple[int, int]]:
    """(start, stop) of each run of consecutive rows from one source shard."""
    values = shards.to_pylist()
    edges = [0] + [i for i in range(1, len(values)) if values[i] != values[i - 1]] + [len(values)]
    return list(zip(edges[:-1], edges[1:]))


def run_images(context: ExportContext, part: pa.Table) -> tuple[list[bytes | None], dict[str, int]]:
    """The image bytes of rows of one source shard, and how many came from the table and from the source."""
    if context.bytes_in_table:
        images = table_rows(context, part, pa.schema([pa.field(col.IMAGE_BYTES, pa.binary())]))
        data = [d or None for d in images.column(col.IMAGE_BYTES).to_pylist()]  # b"": no image, as decode says
    else:
        data = [None] * part.num_rows
    from_table = sum(d is not None for d in data)
    # A missing image is missing in the source too: nothing to look for.
    statuses = part.column(col.STATUS).to_pylist()
    needed = [i for i, d in enumerate(data) if d is None and statuses[i] not in col.NO_IMAGE_STATUSES]
    if not needed:
        return data, _nonzero({"table": from_table})
    shard, keys = part.column(col.SOURCE_SHARD)[0].as_py(), part.column(col.KEY).to_pylist()
    if shard is None:
        raise MissingSourceError(
            f"{len(needed)} row(s) (e.g. key {keys[needed[0]]!r}) have no source_shard and no "
            "image_bytes in the table: their images cannot be exported"
        )
    by_source: dict[ImageSource, list[int]] = defaultdict(list)
    runs = part.column(col.RUN_ID).to_pylist()
    for i in needed:
        by_source[context.image_sources.get(runs[i], ImageSource())].append(i)
    location = Location.resolve(shard, context.storage)
    for source, rows in by_source.items():
        found = source_images(location, source, {keys[i] for i in rows}, context.storage)
        for i in rows:
            data[i] = found[keys[i]] or None
    return data, _nonzero({"table": from_table, "source": sum(data[i] is not None for i in needed)})


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {place: n for place, n in counts.items() if n}


def table_rows(context: ExportContext, refs: pa.Table, fields: pa.Schema) -> pa.Table:
    """The ``fields`` of the rows ``refs`` names (FILE, ROW), in ``refs``'s order."""
    files, rows = refs.column(FILE).to_numpy(), refs.column(ROW).to_numpy()
    parts, positions = [], []
    for file in np.unique(files):
        at = np.flatnonzero(files == file)
        parts.append(take_rows(context.table, context.files[file], rows[at], fields))
        positions.append(at)
    if not parts:
        return fields.empty_table()
    return pa.concat_tables(parts).take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))


def take_rows(table: Location, path: str, rows: np.ndarray, fields: pa.Schema) -> pa.Table:
    """Rows ``rows`` (numbers in the file) of one data file, in that order; a column it lacks (older runs) is null."""
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    parts = []
    with table.filesystem.open_input_file(path) as source:
        parquet = pq.ParquetFile(source)
        present = [f.name for f in fields if f.name in parquet.schema_arrow.names]
        bounds = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
        for group in np.unique(np.searchsorted(bounds, wanted, side="right") - 1):
            start = int(bounds[group])
            for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, row_groups=[int(group)], columns=present):
                low, high = np.searchsorted(wanted, [start, start + batch.num_rows])
                if high > low:
                    parts.append(pa.Table.from_batches([batch]).take(pa.array(wanted[low:high] - start)))
                start += batch.num_rows
    found = pa.concat_tables(parts) if parts else pa.table({name: [] for name in present})
    if found.num_rows != len(rows):
        raise MissingSourceError(
            f"table data file {path} has {found.num_rows} of the {len(rows)} rows the export "
            "planned: the table changed under the export"
        )
    found = pa.table(
        {f.name: found.column(f.name) if f.name in present else pa.nulls(found.num_rows, f.type) for f in fields}
    ).cast(fields)
    return found.take(pa.array(np.argsort(order, kind="stable")))


class TarShard:
    """``NNNNN.tar`` (per sample: the image, ``.txt``, ``.json``) and ``NNNNN.parquet``, its rows in tar order."""

    def __init__(self, context: ExportContext, number: int):
        tar_name, parquet_name = shard_files(number, "webdataset")
        self.stream = open_output(context.target, tar_name)
        self.tar = tarfile.open(fileobj=self.stream, mode="w|", format=tarfile.PAX_FORMAT)
        self.sink = open_output(context.target, parquet_name)
        self.metadata = pq.ParquetWriter(self.sink, context.schema, compression="zstd")

    def add(self, rows: pa.Table, names: list[str], images: list[bytes | None]) -> None:
        for row, name, image in zip(rows.to_pylist(), names, images):
            if image is not None:
                self._member(f"{name}.{image_ext(image)}", image)
            self._member(f"{name}.txt", caption_text(row).encode())
            self._member(f"{name}.json", json.dumps(json_row(row), ensure_ascii=False).encode())
        self.metadata.write_table(rows)

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # no clock in the bytes: same rows, same tar
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()
        self.stream.close()
        self.metadata.close()
        self.sink.close()


class ParquetShard:
    """``NNNNN.parquet``: the scalar columns and the original image bytes (``jpg``, img2dataset's name)."""

    def __init__(self, context: ExportContext, number: int):
        self.schema = context.schema.append(pa.field(IMAGE_COLUMN, pa.binary()))
        self.sink = open_output(context.target, shard_files(number, "parquet")[0])
        self.writer = pq.ParquetWriter(self.sink, self.schema, compression="zstd")

    def add(self, rows: pa.Table, names: list[str], images: list[bytes | None]) -> None:
        self.writer.write_table(
            rows.append_column(IMAGE_COLUMN, pa.array(images, pa.binary())), row_group_size=_IMAGE_ROW_GROUP
        )

    def close(self) -> None:
        self.writer.close()
        self.sink.close()


def write_embeddings(target: Location, number: int, rows: pa.Table, scalars: pa.Table) -> int:
    """clip-retrieval's three files for the rows with both embeddings (finite); returns how many rows they hold.

    A row without one of them (a failed image, an empty caption: only with --all-rows) is in
    the shard but in neither .npy, so the .npy rows and the metadata rows stay one to one.
    """
    arrays = []
    for name in (col.IMAGE_EMBEDDING, col.TEXT_EMBEDDING):
        column = rows.column(name)
        widths = column.combine_chunks().value_lengths().drop_null()
        arrays.append(embedding_rows(column, widths[0].as_py() if len(widths) else 0, "export"))
    usable = arrays[0][1] & arrays[1][1]
    if not usable.any():
        return 0
    for name, (vectors, _) in zip(embedding_files(number)[:2], arrays):
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(vectors[usable], np.float32))
        write_bytes(target, name, buffer.getvalue())
    with open_output(target, embedding_files(number)[2]) as sink:
        pq.write_table(scalars.filter(pa.array(usable)), sink, compression="zstd")
    return int(usable.sum())


def _sizes(target: Location, names: list[str]) -> dict[str, int]:
    infos = target.filesystem.get_file_info([f"{target.path.rstrip('/')}/{name}" for name in names])
    return {name: info.size for name, info in zip(names, infos)}
