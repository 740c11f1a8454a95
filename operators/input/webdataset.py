"""WebDataset tar shards as rows: members grouped by sample key, wherever they sit in the tar.

A sample's key is the member's path up to the first dot of its file name, its
extension the rest (WebDataset's rule: ``a/b.seg.png`` is key ``a/b``, extension
``seg.png``). Readers that group only *adjacent* members (WebDataset's own, Ray's
``read_webdataset``) split a sample whose members are apart into two rows, or merge
two samples; here the whole shard is grouped first, so member order never matters.
That holds one shard's bytes in memory, as reading a single-row-group Parquet shard does.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from typing import IO

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from operators import schema as col

# The columns the tar reader emits, in the shape of a Parquet shard's (``operators.input.prepare`` renames them).
WDS_KEY = "__key__"
WDS_CAPTION = "__caption__"
WDS_IMAGE = "__image__"
TAR_BATCH_ROWS = 256  # rows per emitted table: small blocks downstream, whatever the shard's size


class WebDatasetConfig(BaseModel):
    """Which members of a sample are its image and caption."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_extensions: tuple[str, ...] = Field(("jpg", "jpeg", "png", "webp"), min_length=1)
    caption_extension: str = "txt"
    # Take the caption from this field of the json member instead of a caption member.
    caption_field: str | None = None
    json_extension: str = "json"
    # img2dataset writes a NNNNN.parquet of every sample beside NNNNN.tar, failed downloads included
    # (the tar has only the successes): those become download_failed rows, so every URL is counted.
    failed_downloads_from_sidecar: bool = True


def split_member_name(name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member, by WebDataset's rule."""
    directory, base = posixpath.split(name)
    stem, dot, extension = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, extension.lower() if dot else ""


def group_samples(tar: tarfile.TarFile) -> dict[str, dict[str, list[bytes]]]:
    """Key -> extension -> member payloads, in the order keys first appear; non-file members skipped."""
    samples: dict[str, dict[str, list[bytes]]] = {}
    for member in tar:
        if not member.isfile():
            continue
        if posixpath.basename(member.name).startswith("."):
            continue  # hidden files (macOS "._x" resource forks) are not samples
        key, extension = split_member_name(member.name)
        data = tar.extractfile(member).read()
        samples.setdefault(key, {}).setdefault(extension, []).append(data)
    return samples


def read_tar(
    stream: IO[bytes], config: WebDatasetConfig, extra: pa.Schema, sidecar: Callable[[], pa.Table | None] = lambda: None
) -> Iterator[pa.Table]:
    """A tar shard's samples as tables of at most ``TAR_BATCH_ROWS`` rows.

    Columns: ``WDS_KEY``, ``WDS_CAPTION``, ``WDS_IMAGE``, the ``extra`` fields (read from each
    sample's json member), and ``INPUT_STATUS``/``INPUT_ERROR`` for a sample that is not one
    image with its caption. A sample without an image is a row (``missing_image``), never skipped.
    """
    with tarfile.open(fileobj=stream, mode="r|") as tar:  # a stream: the shard is read once, in order
        samples = group_samples(tar)
    rows = [sample_row(key, members, config, extra) for key, members in samples.items()]
    metadata = sidecar() if config.failed_downloads_from_sidecar else None
    if metadata is not None:
        rows += failed_download_rows(metadata, set(samples), config, extra)
    for start in range(0, len(rows), TAR_BATCH_ROWS):
        yield rows_table(rows[start : start + TAR_BATCH_ROWS], extra)


def sample_row(key: str, members: dict[str, list[bytes]], config: WebDatasetConfig, extra: pa.Schema) -> dict:
    """One sample's row; what makes it unusable goes into its input status, not an exception."""
    row = {WDS_KEY: key, WDS_CAPTION: None, WDS_IMAGE: None, col.INPUT_STATUS: None, col.INPUT_ERROR: None}
    fields = _json_fields(members.get(config.json_extension))
    row.update({name: fields.get(name) for name in extra.names})
    if config.caption_field is not None:
        caption = fields.get(config.caption_field)
        row[WDS_CAPTION] = caption if caption is None or isinstance(caption, str) else str(caption)
    elif config.caption_extension in members:
        row[WDS_CAPTION] = members[config.caption_extension][0]
    images = [ext for ext in config.image_extensions if ext in members]
    repeated = [ext for ext in images if len(members[ext]) > 1]
    if repeated:  # two tars' samples concatenated, or a writer bug: which one is this row's is unknowable
        problem = f"the tar has {len(members[repeated[0]])} '{key}.{repeated[0]}' members"
    elif len(images) > 1:
        problem = f"sample {key!r} has {len(images)} image members ({', '.join(images)})"
    else:
        problem = None
    if problem:
        row[col.INPUT_STATUS], row[col.INPUT_ERROR] = col.INVALID_SAMPLE, problem
    elif images:
        row[WDS_IMAGE] = members[images[0]][0]
    else:
        found = ", ".join(sorted(members)) or "none"
        row[col.INPUT_STATUS] = col.MISSING_IMAGE
        row[col.INPUT_ERROR] = f"no {'/'.join(config.image_extensions)} member in the sample (it has: {found})"
    return row


def failed_download_rows(sidecar: pa.Table, seen: set[str], config: WebDatasetConfig, extra: pa.Schema) -> list[dict]:
    """Rows for the sidecar's samples that img2dataset could not download (absent from the tar)."""
    names = sidecar.column_names
    if "key" not in names or "status" not in names:
        return []
    rows = []
    for sample in sidecar.to_pylist():
        if sample["status"] == "success" or sample["key"] in seen:
            continue
        caption = sample.get(config.caption_field or "caption")
        rows.append(
            {
                WDS_KEY: str(sample["key"]),
                WDS_CAPTION: caption if isinstance(caption, str) else None,
                WDS_IMAGE: None,
                **{name: sample.get(name) for name in extra.names},
                col.INPUT_STATUS: col.DOWNLOAD_FAILED,
                col.INPUT_ERROR: f"status={sample['status']}: {sample.get('error_message') or ''}",
            }
        )
    return rows


def _json_fields(payloads: list[bytes] | None) -> dict:
    """The sample's json member as a dict; an unreadable one contributes no fields."""
    try:
        value = json.loads(payloads[0]) if payloads else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def rows_table(rows: list[dict], extra: pa.Schema) -> pa.Table:
    """Rows as a table whose types never depend on the values (every block of a run concatenates)."""
    captions = [c.decode("utf-8", "replace") if isinstance(c, bytes) else c for c in (r[WDS_CAPTION] for r in rows)]
    columns = {
        WDS_KEY: pa.array([r[WDS_KEY] for r in rows], pa.string()),
        WDS_CAPTION: pa.array(captions, pa.string()),
        WDS_IMAGE: pa.array([r[WDS_IMAGE] for r in rows], pa.binary()),
    }
    for field in extra:
        columns[field.name] = pa.array([_fit(r[field.name], field.type) for r in rows], field.type)
    columns[col.INPUT_STATUS] = pa.array([r[col.INPUT_STATUS] for r in rows], pa.string())
    columns[col.INPUT_ERROR] = pa.array([r[col.INPUT_ERROR] for r in rows], pa.string())
    return pa.table(columns)


def json_field_type(value) -> pa.DataType:
    """The column type of a json field, from one sample's value (objects and lists become JSON text)."""
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    return pa.string()


def _fit(value, type_: pa.DataType):
    """A json value as ``type_``; null where another sample's value has another type."""
    if value is None:
        return None
    if pa.types.is_string(type_):
        return value if isinstance(value, str) else json.dumps(value)
    if pa.types.is_boolean(type_):
        return value if isinstance(value, bool) else None
    if pa.types.is_integer(type_):
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
