"""WebDataset tar shards: the cheap check before a run, and the read inside it.

The check reads two small ranges per shard, never the whole tar: the first member's
header (a tar at all?) and the last kilobyte (tar ends in two zero blocks, which an
interrupted upload or copy lacks). A shard that fails is set aside like a Parquet shard
with a bad footer: the run goes on without it and is recorded as partial.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators.input.webdataset import (
    WDS_CAPTION,
    WDS_IMAGE,
    WDS_KEY,
    WebDatasetConfig,
    json_field_type,
    read_tar,
    split_member_name,
)
from pipelines.errors import PlanError
from pipelines.input.shards import _FOOTER_THREADS, Shard, ShardCheck

log = logging.getLogger(__name__)

_BLOCK = tarfile.BLOCKSIZE
_SCHEMA_SAMPLES = 64  # json members looked at for the extra columns' types


def check_tar_shards(
    fs: pafs.FileSystem, shards: list[Shard], config: WebDatasetConfig, extra: tuple[str, ...]
) -> ShardCheck:
    """Set aside the tars a run cannot read; the schema has the extra (json) fields' types."""
    with ThreadPoolExecutor(min(_FOOTER_THREADS, max(1, len(shards)))) as pool:
        problems = list(pool.map(lambda shard: _tar_problem(fs, shard), shards))
    good = [shard for shard, problem in zip(shards, problems) if problem is None]
    failed = [{"uri": shard.uri, "error": problem} for shard, problem in zip(shards, problems) if problem]
    for bad in failed:
        log.warning("skipping input shard %s: %s", bad["uri"], bad["error"])
    schema = tar_schema(fs, good[0], config, extra) if good else None
    return ShardCheck(good, failed, schema)


def _tar_problem(fs: pafs.FileSystem, shard: Shard) -> str | None:
    """Why the tar cannot be read, from its first header and its end; None when it looks whole."""
    try:
        with fs.open_input_file(shard.path) as f:
            size = f.size()
            if size == 0:
                return "the shard is empty (an unfinished write?)"
            if size % _BLOCK:
                return f"truncated tar: {size} bytes is not a whole number of {_BLOCK}-byte blocks"
            head = f.read_at(_BLOCK, 0)
            tail = f.read_at(2 * _BLOCK, size - 2 * _BLOCK) if size >= 3 * _BLOCK else b""
    except OSError as err:
        return f"cannot read the tar: {type(err).__name__}: {' '.join(str(err).split())}"
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as err:
        return f"not a tar file: {err}"
    if tail.count(0) != len(tail) or not tail:
        return "truncated tar: no end-of-archive marker (an interrupted upload or copy?)"
    return None


def tar_schema(fs: pafs.FileSystem, shard: Shard, config: WebDatasetConfig, extra: tuple[str, ...]) -> pa.Schema:
    """The columns the tar reader emits; each extra field typed by its first value in the shard's json members."""
    types: dict[str, pa.DataType] = {}
    if extra:
        for fields in _json_members(fs, shard, config):
            for name in extra:
                if name not in types and fields.get(name) is not None:
                    types[name] = json_field_type(fields[name])
            if len(types) == len(extra):
                break
        missing = [name for name in extra if name not in types]
        if missing:
            raise PlanError(
                f"input.extra_columns {', '.join(map(repr, missing))}: no such field in the "
                f".{config.json_extension} members of {shard.uri} (first {_SCHEMA_SAMPLES} looked at)"
            )
    fields = [pa.field(WDS_KEY, pa.string()), pa.field(WDS_CAPTION, pa.string()), pa.field(WDS_IMAGE, pa.binary())]
    return pa.schema(fields + [pa.field(name, types[name]) for name in extra])


def _json_members(fs: pafs.FileSystem, shard: Shard, config: WebDatasetConfig) -> Iterator[dict]:
    seen = 0
    with fs.open_input_stream(shard.path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile() or split_member_name(member.name)[1] != config.json_extension:
                continue
            try:
                value = json.loads(tar.extractfile(member).read())
            except ValueError:
                continue
            if isinstance(value, dict):
                yield value
            seen += 1
            if seen >= _SCHEMA_SAMPLES:
                return


def _sidecar(fs: pafs.FileSystem, tar_path: str) -> pa.Table | None:
    """img2dataset's metadata Parquet beside a tar (``00000.parquet`` for ``00000.tar``), if there is one."""
    path = tar_path.removesuffix(".tar") + ".parquet"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    schema = pq.read_schema(path, filesystem=fs)
    wanted = [name for name in schema.names if name not in ("jpg", "png", "webp", "exif")]
    return pq.read_table(path, filesystem=fs, columns=wanted)


def tar_blocks(fs: pafs.FileSystem, config: WebDatasetConfig, schema: pa.Schema, path: str) -> Iterator[pa.Table]:
    """One tar shard's samples as rows (``execute.read_files`` runs it in a task per shard)."""
    extra = pa.schema([f for f in schema if f.name not in (WDS_KEY, WDS_CAPTION, WDS_IMAGE)])
    with fs.open_input_stream(path) as stream:
        yield from read_tar(stream, config, extra, partial(_sidecar, fs, path))
