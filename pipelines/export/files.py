"""What an export leaves at its URI: the shards' file names, ``_stats.json`` and ``_manifest.json``.

An export is complete or invisible: ``_manifest.json`` is removed first and written last,
after every shard and after the files of an earlier export that this one did not
overwrite are gone. A reader that finds the manifest finds exactly the files it lists.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Literal

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict

from operators.storage import Location

MANIFEST = "_manifest.json"
STATS = "_stats.json"
FORMAT = "vlpipe-export/1"
ORDER = "run_date, source_shard, key"
Format = Literal["webdataset", "parquet"]
EMBEDDING_DIRS = ("img_emb", "text_emb", "metadata")
# Only names an export writes are ever removed from its URI: other files there are the user's.
_OURS = {
    "": re.compile(r"\d{5,}\.(tar|parquet)"),
    "img_emb": re.compile(r"img_emb_\d{5,}\.npy"),
    "text_emb": re.compile(r"text_emb_\d{5,}\.npy"),
    "metadata": re.compile(r"metadata_\d{5,}\.parquet"),
}


def shard_name(number: int) -> str:
    """img2dataset's shard names: 00000, 00001, ..."""
    return f"{number:05d}"


def shard_files(number: int, fmt: Format) -> tuple[str, ...]:
    """The data files of shard ``number``, relative to the export URI."""
    name = shard_name(number)
    return (f"{name}.tar", f"{name}.parquet") if fmt == "webdataset" else (f"{name}.parquet",)


def embedding_files(number: int) -> tuple[str, str, str]:
    """clip-retrieval's layout, numbered as the shards: what autofaiss and embedding-reader read."""
    name = shard_name(number)
    return f"img_emb/img_emb_{name}.npy", f"text_emb/text_emb_{name}.npy", f"metadata/metadata_{name}.parquet"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExportedShard(_Frozen):
    """One shard as written: its samples, the rows with an image and with embeddings, its files' sizes."""

    number: int
    samples: int
    images: int  # samples with an image file (or a non-null image column)
    embedding_rows: int | None  # rows in its .npy files; None without --embeddings
    image_bytes_from: dict[str, int]  # "table" / "source": where the images were read
    files: dict[str, int]  # name relative to the export URI -> bytes

    @property
    def bytes(self) -> int:
        return sum(self.files.values())


class ExportManifest(_Frozen):
    """Everything an export is: what it was made from and which files it holds."""

    format: Literal["vlpipe-export/1"] = FORMAT
    export_format: Format
    table_uri: str
    table_version: int
    run_dates: tuple[dt.date, ...]  # the partitions that had rows to export
    order: str = ORDER
    options: dict
    samples: int
    bytes: int
    shards: tuple[ExportedShard, ...]
    created_at: dt.datetime
    seconds: float
    vlpipe_version: str


def stats(manifest: ExportManifest, started_at: dt.datetime) -> dict:
    """``_stats.json``: the totals, img2dataset's overall stats file for this layout."""
    shards = manifest.shards
    embedding_rows = [s.embedding_rows for s in shards]
    return {
        "format": manifest.export_format,
        "samples": manifest.samples,
        "shards": len(shards),
        "bytes": manifest.bytes,
        "rows_per_shard": [s.samples for s in shards],
        "images": sum(s.images for s in shards),
        "without_image": manifest.samples - sum(s.images for s in shards),
        "image_bytes_from": {k: sum(s.image_bytes_from.get(k, 0) for s in shards) for k in ("table", "source")},
        "embedding_rows": None if None in embedding_rows else sum(embedding_rows),
        "table_uri": manifest.table_uri,
        "table_version": manifest.table_version,
        "run_dates": [d.isoformat() for d in manifest.run_dates],
        "all_rows": manifest.options["all_rows"],
        "start_time": started_at.isoformat(),
        "end_time": manifest.created_at.isoformat(),
        "duration_s": manifest.seconds,
    }


def clear_manifest(where: Location) -> None:
    """First of all: from here until the new manifest, the URI holds no export a reader may use."""
    try:
        where.filesystem.delete_file(_path(where, MANIFEST))
    except FileNotFoundError:
        pass


def remove_stale(where: Location, keep: set[str]) -> list[str]:
    """Remove the files an earlier export left that this one did not write; returns their names."""
    stale = []
    for folder, pattern in _OURS.items():
        base = _path(where, folder) if folder else where.path.rstrip("/")
        for info in where.filesystem.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
            name = f"{folder}/{info.base_name}" if folder else info.base_name
            if info.type == pafs.FileType.File and pattern.fullmatch(info.base_name) and name not in keep:
                where.filesystem.delete_file(info.path)
                stale.append(name)
    return stale


def publish(where: Location, manifest: ExportManifest, totals: dict) -> None:
    """``_stats.json``, then the manifest: the moment the export becomes visible."""
    write_bytes(where, STATS, (json.dumps(totals, indent=2) + "\n").encode())
    text = (manifest.model_dump_json(indent=2) + "\n").encode()
    if isinstance(where.filesystem, pafs.LocalFileSystem):
        staging = f".{MANIFEST}.tmp"
        write_bytes(where, staging, text)
        where.filesystem.move(_path(where, staging), _path(where, MANIFEST))  # rename: atomic on one filesystem
    else:
        write_bytes(where, MANIFEST, text)  # one PUT: all or nothing


def read_manifest(where: Location) -> ExportManifest | None:
    try:
        with where.filesystem.open_input_stream(_path(where, MANIFEST)) as source:
            return ExportManifest.model_validate_json(source.read())
    except FileNotFoundError:
        return None


def write_bytes(where: Location, name: str, data: bytes) -> int:
    with open_output(where, name) as out:
        out.write(data)
    return len(data)


def open_output(where: Location, name: str):
    """A write stream for ``name`` below ``where`` (on S3 a multipart upload: nothing is visible until it closes)."""
    path = _path(where, name)
    if isinstance(where.filesystem, pafs.LocalFileSystem):
        where.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    return where.filesystem.open_output_stream(path)


def _path(where: Location, name: str) -> str:
    return f"{where.path.rstrip('/')}/{name}"
