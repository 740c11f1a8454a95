"""The original image bytes of some rows, read back from the input shard they came from.

One function, so every reader of source shards (the export today) goes through the
same column mapping and the same errors; a new input format adds its branch here.
"""

from __future__ import annotations

from collections.abc import Collection

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from operators.storage import Location
from pipelines.config import InputColumns
from pipelines.errors import NoInputError


class MissingSourceError(NoInputError):
    """A source shard, or rows of it, that an export needs are gone."""


def source_images(shard: Location, columns: InputColumns, keys: Collection[str]) -> dict[str, bytes | None]:
    """Encoded image per key of the rows of ``shard`` whose key is in ``keys`` (None where the row has none).

    Only the key and image columns are read, under the names the run that wrote the rows
    was configured with; the key is compared as a string, as the pipeline stored it.
    """
    try:
        dataset = pads.dataset(shard.path, filesystem=shard.filesystem, format="parquet")
    except FileNotFoundError:
        raise MissingSourceError(f"source shard {shard.uri} is gone: {len(keys)} row(s) need their image from it; "
                                 "restore it, or export a table written with output.include_image_bytes") from None
    absent = [name for name in (columns.key, columns.image) if name not in dataset.schema.names]
    if absent:
        raise MissingSourceError(f"source shard {shard.uri} has no column {', '.join(map(repr, absent))}: it is not "
                                 "the shard the rows were read from")
    key = pc.field(columns.key)
    if not pa.types.is_string(dataset.schema.field(columns.key).type):
        key = key.cast(pa.string())
    table = dataset.to_table(columns={"key": key, "image": pc.field(columns.image)}, filter=key.isin(list(keys)))
    images = table.column("image")
    if pa.types.is_struct(images.type):  # Hugging Face image struct {bytes, path}
        images = pc.struct_field(images, "bytes")
    found = dict(zip(table.column("key").to_pylist(), images.to_pylist()))
    missing = [k for k in keys if k not in found]
    if missing:
        raise MissingSourceError(f"source shard {shard.uri} lacks {len(missing)} of the {len(keys)} key(s) the "
                                 f"export needs from it (e.g. {missing[0]!r}): it changed since the run read it")
    return found
