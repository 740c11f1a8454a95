"""Find the input shards under a URI prefix, directory or glob."""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators.input.prepare import ColumnMapping
from operators.storage import Location
from pipelines.errors import ConfigError, UnreachableError

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Shard:
    """One input file, with what identifies its content version."""

    uri: str
    path: str
    size: int
    mtime: dt.datetime | None


PARQUET, WEBDATASET = "parquet", "webdataset"
SHARD_EXTENSIONS = (".parquet", ".tar")


def list_shards(location: Location) -> list[Shard]:
    """The Parquet and tar shards ``location`` names, sorted by path (``choose_format`` picks one kind)."""
    try:
        return _list(location)
    except OSError as err:  # S3 and local errors alike: unreachable, no credentials, access denied
        raise UnreachableError(f"cannot list input {location.uri}: {_cause(err)}") from err


def _cause(err: OSError) -> str:
    """The useful part of a storage error: pyarrow prefixes its own context."""
    return " ".join(str(err).split())


def _list(location: Location) -> list[Shard]:
    fs, path, uri = location.filesystem, location.path, location.uri
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
    return sorted(shards, key=lambda s: s.path)


def _is_data_file(path: str, root: str, pattern: str | None) -> bool:
    relative = path[len(root) :].strip("/").split("/")
    # Markers and hidden files below the root (_SUCCESS, .crc, _delta_log) are not shards.
    if any(part.startswith(("_", ".")) for part in relative):
        return False
    name = relative[-1]
    if pattern is not None:
        return fnmatch.fnmatchcase(path, pattern)
    return name.endswith(SHARD_EXTENSIONS)


def choose_format(shards: list[Shard], configured: str | None) -> tuple[str, list[Shard]]:
    """The input format (configured, else from the extensions) and the shards of that format.

    img2dataset's WebDataset output puts a metadata ``NNNNN.parquet`` beside each ``NNNNN.tar``:
    those are not shards of their own.
    """
    tars = [s for s in shards if s.path.endswith(".tar")]
    others = [s for s in shards if not s.path.endswith(".tar")]
    if configured == WEBDATASET or (configured is None and tars):
        stems = {s.path.removesuffix(".tar") for s in tars}
        unpaired = [s for s in others if s.path.removesuffix(".parquet") not in stems]
        if configured is None and unpaired:
            raise ConfigError(
                f"input.uri has both tar shards ({len(tars)}) and Parquet shards ({len(unpaired)}, e.g. "
                f"{unpaired[0].uri}): set input.format to parquet or webdataset, or narrow the glob"
            )
        return WEBDATASET, tars
    return PARQUET, others


@dataclass(frozen=True)
class ShardCheck:
    """The shards a run can read, the ones it cannot (``{uri, error}``), and the common schema."""

    good: list[Shard]
    failed: list[dict]
    schema: pa.Schema | None
    rows: int | None = None  # in the good shards, from their footers (None where unknown: tar shards)
    shard_rows: dict[str, int] = field(default_factory=dict)  # per good shard's URI, where the footers say


# Footer reads are one small ranged GET each, so a wide pool hides object-store latency.
_FOOTER_THREADS = 32


def check_shards(fs: pafs.FileSystem, shards: list[Shard], columns: ColumnMapping) -> ShardCheck:
    """Read every shard's Parquet footer (in parallel) and set aside the ones a run would choke on.

    A shard fails when its footer cannot be read (corrupt, truncated, unreadable),
    it has no rows, a configured column is missing or has a type vlpipe cannot
    read, or a column's type differs from the one most shards have (schema drift:
    Ray cannot concatenate such blocks, so one drifted shard would fail the run).
    """
    names = list(columns.read)

    def types(shard: Shard) -> tuple[tuple[str, ...], int] | str:
        footer = _read_footer(fs, shard, columns)
        # Only the read columns' types are kept: a million full schemas would not fit the driver.
        return footer if isinstance(footer, str) else (tuple(str(footer[0].field(n).type) for n in names), footer[1])

    with ThreadPoolExecutor(min(_FOOTER_THREADS, max(1, len(shards)))) as pool:
        found = list(pool.map(types, shards))
    usual = [Counter(t[0][i] for t in found if isinstance(t, tuple)).most_common(1) for i in range(len(names))]
    good, failed, shard_rows = [], [], {}
    for shard, read in zip(shards, found):
        if isinstance(read, str):
            failed.append({"uri": shard.uri, "error": read})
            continue
        footer, count = read
        drift = [
            f"column {name!r} is {type_} here but {usual[i][0][0]} in {usual[i][0][1]} other shard(s)"
            for i, (name, type_) in enumerate(zip(names, footer))
            if type_ != usual[i][0][0]
        ]
        if drift:
            failed.append({"uri": shard.uri, "error": "schema drift: " + "; ".join(drift)})
        else:
            good.append(shard)
            shard_rows[shard.uri] = count
    for bad in failed:
        log.warning("skipping input shard %s: %s", bad["uri"], bad["error"])
    schema = pq.read_schema(good[0].path, filesystem=fs) if good else None
    return ShardCheck(good, failed, schema, sum(shard_rows.values()), shard_rows)


def _read_footer(fs: pafs.FileSystem, shard: Shard, columns: ColumnMapping) -> tuple[pa.Schema, int] | str:
    """The shard's schema and row count, or why it cannot be processed."""
    try:
        with fs.open_input_file(shard.path) as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
    except (OSError, ValueError, pa.ArrowException) as err:  # ArrowInvalid is a ValueError; S3 errors are OSErrors
        return f"cannot read the Parquet footer: {type(err).__name__}: {err}"
    if meta.num_rows == 0:
        return "the shard has no rows (an empty or unfinished write?)"
    missing = [n for n in columns.read if n not in schema.names]
    if missing:
        return f"missing column(s) {', '.join(map(repr, missing))} (columns: {', '.join(schema.names)})"
    for name, allowed, what in (
        (columns.key, _is_key, "a string or integer"),
        (columns.caption, _is_text, "a string or binary"),
        (columns.image, _is_image, "binary image bytes or an image struct {bytes, path}"),
        (columns.image_uri, _is_text, "a string of URIs or paths"),
    ):
        if name is not None and not allowed(schema.field(name).type):
            return f"column {name!r} is {schema.field(name).type}, expected {what}"
    return schema, meta.num_rows


def _is_key(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)


def _is_text(t: pa.DataType) -> bool:
    return any(
        check(t)
        for check in (
            pa.types.is_string,
            pa.types.is_large_string,
            pa.types.is_binary,
            pa.types.is_large_binary,
            pa.types.is_null,
        )
    )


def _is_image(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0 and _is_image(t.field("bytes").type)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t)
