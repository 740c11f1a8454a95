"""A vector index on storage: its manifest, its faiss file and its row metadata.

An index URI (a local folder or an object-store prefix) holds ``manifest.json`` and the
two files it names, ``index-<build>.faiss`` and ``metadata-<build>.parquet``; faiss id
``i`` is row ``i`` of the metadata. A build writes its files under new names, then the
manifest, so a reader finds the previous index or the new one, never a mix; the files
of the index the new manifest replaced are removed after it.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from operators import schema as col
from operators.image.decode import DecodeConfig
from operators.input.fetch import FetchConfig
from operators.input.webdataset import WebDatasetConfig
from operators.storage import Location
from pipelines.config import InputColumns
from pipelines.errors import ConfigError, NoInputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "vlpipe-index/1"
Embedding = Literal["image", "text"]
EMBEDDING_COLUMNS: dict[str, str] = {"image": col.IMAGE_EMBEDDING, "text": col.TEXT_EMBEDDING}
METADATA_SCHEMA = pa.schema(
    [
        pa.field(col.KEY, pa.string()),
        pa.field(col.CAPTION, pa.string()),
        pa.field(col.RUN_DATE, pa.date32()),
        pa.field(col.SOURCE_SHARD, pa.string()),
        pa.field(col.RUN_ID, pa.string()),
    ]
)


class NoIndexError(NoInputError):
    """There is no index at the URI (no manifest), or its files are gone."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRecord(_Frozen):
    """A CLIP model as the table's commits record it."""

    source: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.source + (f" @ {self.revision}" if self.revision else "")


class RunSource(_Frozen):
    """What search needs of a run whose rows are indexed: how it read and decoded its input shards."""

    model: ModelRecord | None = None
    input_columns: InputColumns = InputColumns()
    decode: DecodeConfig = DecodeConfig()
    webdataset: WebDatasetConfig = WebDatasetConfig()
    fetch: FetchConfig = FetchConfig()


class ModelProbe(_Frozen):
    """A kept caption and its text embedding from the table: the model a search loads must reproduce it."""

    caption: str
    text_embedding: list[float]


class IndexFiles(_Frozen):
    index: str
    metadata: str


class IndexManifest(_Frozen):
    """Everything known about one index: what it was built from, how, and where its files are."""

    format: Literal["vlpipe-index/1"] = FORMAT
    table_uri: str
    table_version: int
    run_dates: tuple[dt.date, ...] | None  # None: every partition
    embedding: Embedding
    model: ModelRecord
    dim: int
    count: int
    index_type: str  # a faiss index_factory key
    index_reason: str
    params: dict[str, int] = {}  # search parameters (nprobe, ...); empty for an exact index
    recall_at_10: dict[str, float] | None = None  # measured when the parameters were tuned, per kind of query
    train_rows: int = 0
    files: IndexFiles
    model_probes: tuple[ModelProbe, ...] = ()
    runs: dict[str, RunSource] = {}
    built_at: dt.datetime
    build_seconds: float
    vlpipe_version: str

    @property
    def column(self) -> str:
        return EMBEDDING_COLUMNS[self.embedding]


def build_files(build_id: str) -> IndexFiles:
    """The file names a build writes: its own, so they never overwrite the index readers use."""
    return IndexFiles(index=f"index-{build_id}.faiss", metadata=f"metadata-{build_id}.parquet")


def metadata_writer(where: Location, files: IndexFiles) -> pq.ParquetWriter:
    _make_dir(where)
    return pq.ParquetWriter(_path(where, files.metadata), METADATA_SCHEMA, filesystem=where.filesystem)


def write_faiss(where: Location, name: str, index) -> None:
    """Stream the index to storage without a second copy of it in memory."""
    import faiss

    with where.filesystem.open_output_stream(_path(where, name)) as out:
        writer = faiss.PyCallbackIOWriter(out.write)
        faiss.write_index(index, writer)
        del writer  # flushes faiss's buffer into the stream before it closes


def publish(where: Location, manifest: IndexManifest) -> None:
    """Make ``manifest`` (whose files are written) the index at ``where``, then drop the files it replaced."""
    previous = _previous(where)
    text = manifest.model_dump_json(indent=2) + "\n"
    if isinstance(where.filesystem, pafs.LocalFileSystem):
        staging = _path(where, f".{MANIFEST}.{manifest.files.index}.tmp")
        with where.filesystem.open_output_stream(staging) as out:
            out.write(text.encode())
        where.filesystem.move(staging, _path(where, MANIFEST))  # rename: atomic on one filesystem
    else:
        with where.filesystem.open_output_stream(_path(where, MANIFEST)) as out:  # one PUT: all or nothing
            out.write(text.encode())
    if previous is not None:
        remove_files(where, previous.files, keep=manifest.files)


def remove_files(where: Location, files: IndexFiles, keep: IndexFiles | None = None) -> None:
    """Best effort: a leftover file is harmless, the manifest never names it."""
    for name in (files.index, files.metadata):
        if keep is not None and name in (keep.index, keep.metadata):
            continue
        try:
            where.filesystem.delete_file(_path(where, name))
        except (OSError, FileNotFoundError):
            pass


def read_manifest(where: Location) -> IndexManifest:
    path = _path(where, MANIFEST)
    try:
        with where.filesystem.open_input_stream(path) as source:
            text = source.read()
    except FileNotFoundError:
        raise NoIndexError(f"no index at {where.uri}: {MANIFEST} not found") from None
    try:
        return IndexManifest.model_validate_json(text)
    except ValidationError as err:
        raise ConfigError(
            f"{where.uri}/{MANIFEST} is not a vlpipe index manifest this version reads: "
            f"{err.errors()[0]['loc']}: {err.errors()[0]['msg']}"
        ) from None


@dataclass
class StoredIndex:
    """An index read back: its manifest, the faiss index (search parameters applied) and the row metadata."""

    manifest: IndexManifest
    index: object
    metadata: pa.Table


def read_index(where: Location) -> StoredIndex:
    import faiss

    from pipelines.search.vectors import apply_params

    manifest = read_manifest(where)
    try:
        with where.filesystem.open_input_stream(_path(where, manifest.files.index)) as source:
            reader = faiss.PyCallbackIOReader(source.read)
            index = faiss.read_index(reader)
            del reader
        metadata = pq.read_table(_path(where, manifest.files.metadata), filesystem=where.filesystem)
    except FileNotFoundError as err:
        raise NoIndexError(f"index at {where.uri} is incomplete: {err}") from None
    if index.ntotal != manifest.count or metadata.num_rows != manifest.count:
        raise NoIndexError(
            f"index at {where.uri} is inconsistent: manifest says {manifest.count} vectors, "
            f"the index has {index.ntotal}, the metadata {metadata.num_rows} rows"
        )
    apply_params(index, manifest.params)
    return StoredIndex(manifest, index, metadata)


def _previous(where: Location) -> IndexManifest | None:
    try:
        return read_manifest(where)
    except (NoIndexError, ConfigError):
        return None


def _make_dir(where: Location) -> None:
    if isinstance(where.filesystem, pafs.LocalFileSystem):
        where.filesystem.create_dir(where.path, recursive=True)


def _path(where: Location, name: str) -> str:
    return f"{where.path.rstrip('/')}/{name}"
