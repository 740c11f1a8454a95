"""The first step after reading: the configured input columns under vlpipe's names."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.image.decode import decode_captions
from operators.stage import Stage

SHARD_PATH = "path"  # the column Ray's reader adds with include_paths
DOWNLOAD_SUCCESS = "success"  # img2dataset's status of a downloaded image


@dataclass(frozen=True)
class ColumnMapping:
    """Which input columns hold the key, the caption and the image, and which pass through.

    ``image`` is None when images are fetched from ``image_uri``; ``fetch`` is set when some
    images are references (``image_uri``, or Hugging Face image structs that carry a ``path``).
    """

    key: str
    caption: str
    image: str | None
    extra: tuple[tuple[str, str], ...] = ()  # (input column, output column)
    image_uri: str | None = None
    download_status: tuple[str, str] | None = None  # (status column, error column), when the shards have them
    fetch: bool = False

    @property
    def read(self) -> tuple[str, ...]:
        """The only columns read from the shards (projection pushdown)."""
        optional = self.download_status or ()
        return tuple(
            dict.fromkeys(
                c
                for c in [
                    self.key,
                    self.caption,
                    self.image,
                    self.image_uri,
                    *(source for source, _ in self.extra),
                    *optional,
                ]
                if c
            )
        )

    @property
    def extra_names(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.extra)

    def for_schema(self, schema: pa.Schema | None, status: str | None, error: str) -> ColumnMapping:
        """The mapping once the shard schema is known: the download-status columns it has, whether to fetch."""
        names = schema.names if schema is not None else []
        has_status = status is not None and status in names and self.image is not None
        image_type = schema.field(self.image).type if self.image in names else None
        hf_paths = image_type is not None and pa.types.is_struct(image_type) and image_type.get_field_index("path") >= 0
        return replace(
            self,
            download_status=(status, error) if has_status and error in names else (status, "") if has_status else None,
            fetch=self.image_uri is not None or hf_paths,
        )


def check_extra_names(pairs: list[tuple[str, str]]) -> None:
    """Pass-through columns must not land on one of vlpipe's own columns, or on each other."""
    own = set(col.output_schema(include_image_bytes=True).names)
    seen: dict[str, str] = {}
    for source, name in pairs:
        if name in own:
            renamed = f"{source!r} -> {name!r}" if source != name else repr(name)
            raise ValueError(
                f"extra column {renamed} collides with vlpipe's output column {name!r} "
                f"({col.COLUMN_DOCS.get(name, 'see the output columns in the reference')}); "
                "rename it on the way in, e.g. "
                f"extra_columns: {{{source}: input_{name}}}"
            )
        if name.startswith("_"):
            raise ValueError(f"extra column {name!r}: names starting with '_' are vlpipe's internal columns")
        if name in seen:
            raise ValueError(f"extra columns {seen[name]!r} and {source!r} would both be written as {name!r}")
        seen[name] = source


def prepare_stage(columns: ColumnMapping, shard_prefix: str) -> Stage:
    """The prepare stage's contract; it runs fused into the decode tasks."""
    image = columns.image or f"(fetched from {columns.image_uri})"
    return Stage(
        name="prepare",
        kind="fused",
        build=partial(PrepareInput, columns, shard_prefix),
        reads=(*columns.read, SHARD_PATH),
        optional=(col.SOURCE_ROW,),
        adds=(
            col.KEY,
            col.CAPTION,
            col.SOURCE_SHARD,
            col.IMAGE,
            *columns.extra_names,
            col.INPUT_STATUS,
            col.INPUT_ERROR,
        )
        + ((col.IMAGE_URI,) if columns.fetch else ()),
        details=(f"key <- {columns.key}, caption <- {columns.caption}, image <- {image}",)
        + (
            (
                f"download status <- {columns.download_status[0]} (not {DOWNLOAD_SUCCESS!r} and no image: "
                f"{col.DOWNLOAD_FAILED})",
            )
            if columns.download_status
            else ()
        ),
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
        for source, name in self.columns.extra:
            out[name] = batch.column(source)
        if col.SOURCE_ROW in batch.column_names:  # kept to the end: the staged rows say which input rows they are
            out[col.SOURCE_ROW] = batch.column(col.SOURCE_ROW)
        image, uri = self._image(batch)
        out[col.IMAGE] = image
        out[col.INPUT_STATUS], out[col.INPUT_ERROR] = self._input_status(batch, image)
        if self.columns.fetch:
            out[col.IMAGE_URI] = uri
        return pa.table(out)

    def _image(self, batch: pa.Table) -> tuple[pa.ChunkedArray | pa.Array, pa.ChunkedArray | pa.Array | None]:
        """The encoded bytes, and where a row without them is to be fetched from."""
        n = batch.num_rows
        if self.columns.image is None:
            return pa.nulls(n, pa.binary()), batch.column(self.columns.image_uri).cast(pa.string())
        image = batch.column(self.columns.image)
        if not pa.types.is_struct(image.type):
            return image, pa.nulls(n, pa.string()) if self.columns.fetch else None
        data = pc.struct_field(image, "bytes")
        if not self.columns.fetch:
            return data, None
        paths = pc.struct_field(image, "path").cast(pa.string())
        return data, pc.if_else(pc.is_null(data), paths, pa.scalar(None, pa.string()))

    def _input_status(self, batch: pa.Table, image) -> tuple:
        """(status, error) per row that the input already marks as failed; null elsewhere."""
        if col.INPUT_STATUS in batch.column_names:  # the tar reader marks malformed samples itself
            return batch.column(col.INPUT_STATUS), batch.column(col.INPUT_ERROR)
        n = batch.num_rows
        if self.columns.download_status is None:
            return pa.nulls(n, pa.string()), pa.nulls(n, pa.string())
        status_name, error_name = self.columns.download_status
        status = batch.column(status_name).cast(pa.string())
        no_image = pc.or_kleene(pc.is_null(image), pc.equal(pc.binary_length(image), 0))
        failed = pc.and_(pc.fill_null(pc.not_equal(status, DOWNLOAD_SUCCESS), False), no_image)
        error = batch.column(error_name).cast(pa.string()) if error_name else pa.nulls(n, pa.string())
        described = pc.binary_join_element_wise(
            pa.scalar(f"{status_name}="), status, pa.scalar(": "), pc.fill_null(error, ""), ""
        )
        return (
            pc.if_else(failed, pa.scalar(col.DOWNLOAD_FAILED), pa.scalar(None, pa.string())),
            pc.if_else(failed, described, pa.scalar(None, pa.string())),
        )
