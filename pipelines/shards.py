"""Find the input shards under a URI prefix, directory or glob."""

from __future__ import annotations

import datetime as dt
import fnmatch
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from operators.storage import StorageOptions, filesystem_for

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Shard:
    """One input file, with what identifies its content version."""

    uri: str
    path: str
    size: int
    mtime: dt.datetime | None


def list_shards(uri: str, storage: StorageOptions) -> tuple[pafs.FileSystem, list[Shard]]:
    """The Parquet shards ``uri`` names, sorted by path."""
    fs, path = filesystem_for(uri, storage)
    scheme = urlparse(uri).scheme
    prefix = f"{scheme}://" if scheme in ("s3", "s3a", "gs", "gcs") else ""
    pattern = None
    if any(c in path for c in _GLOB_CHARS):
        first = min(path.index(c) for c in _GLOB_CHARS if c in path)
        pattern, path = path, path[:first].rsplit("/", 1)[0]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File and pattern is None:
        infos = [info]
    elif info.type == pafs.FileType.NotFound:
        infos = []
    else:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.is_file]
        infos = [i for i in infos if _is_data_file(i.path, path, pattern)]
    shards = [Shard(prefix + i.path, i.path, i.size, i.mtime) for i in infos]
    return fs, sorted(shards, key=lambda s: s.path)


def _is_data_file(path: str, root: str, pattern: str | None) -> bool:
    relative = path[len(root) :].strip("/").split("/")
    # Markers and hidden files below the root (_SUCCESS, .crc, _delta_log) are not shards.
    if any(part.startswith(("_", ".")) for part in relative):
        return False
    name = relative[-1]
    if pattern is not None:
        return fnmatch.fnmatchcase(path, pattern)
    return name.endswith(".parquet")
