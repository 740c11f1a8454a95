"""The original image bytes of some rows, read back from the input shard they came from.

One function for every reader of source shards (the export, report thumbnails, search
pages), so all of them follow the run's own column mapping and raise the same errors.
Only the wanted keys' images are kept: from a Parquet shard only the key and image
columns are read (the filter pushed down); a tar is streamed once; referenced images
(``input.columns.image_uri``) are fetched again the way the run fetched them.
"""

from __future__ import annotations

import tarfile
from collections.abc import Collection

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from pydantic import BaseModel, ConfigDict

from operators.input.fetch import FetchConfig, FetchImages
from operators.input.webdataset import WebDatasetConfig, split_member_name
from operators.storage import Location, StorageOptions
from pipelines.config import InputColumns, PipelineConfig
from pipelines.errors import NoInputError


class MissingSourceError(NoInputError):
    """A source shard, or rows of it, that an export needs are gone."""


class ImageSource(BaseModel):
    """How one run's rows find their images in its input shards: from its recorded config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    columns: InputColumns = InputColumns()
    webdataset: WebDatasetConfig = WebDatasetConfig()
    fetch: FetchConfig = FetchConfig()

    @classmethod
    def of(cls, config: PipelineConfig) -> ImageSource:
        return cls(columns=config.input.columns, webdataset=config.input.webdataset, fetch=config.input.fetch)


def source_images(
    shard: Location, source: ImageSource, keys: Collection[str], storage: StorageOptions = StorageOptions()
) -> dict[str, bytes | None]:
    """Encoded image per key of the rows of ``shard`` whose key is in ``keys`` (None where the row has none).

    The key is compared as a string, as the pipeline stored it. Every key must be found.
    """
    found = find_source_images(shard, source, keys, storage)
    missing = [k for k in keys if k not in found]
    if missing:
        raise MissingSourceError(
            f"source shard {shard.uri} lacks {len(missing)} of the {len(keys)} key(s) needed "
            f"from it (e.g. {missing[0]!r}): it changed since the run read it"
        )
    return found


def find_source_images(
    shard: Location, source: ImageSource, keys: Collection[str], storage: StorageOptions = StorageOptions()
) -> dict[str, bytes | None]:
    """Like ``source_images``, leaving out the keys the shard does not have (for thumbnails)."""
    try:
        found = (
            _from_tar(shard, set(keys), source.webdataset)
            if shard.path.endswith(".tar")
            else _from_parquet(shard, source, keys, storage)
        )
    except FileNotFoundError:
        raise MissingSourceError(
            f"source shard {shard.uri} is gone: {len(keys)} row(s) need their image from it; "
            "restore it, or export a table written with output.include_image_bytes"
        ) from None
    return found


def _from_parquet(
    shard: Location, source: ImageSource, keys: Collection[str], storage: StorageOptions
) -> dict[str, bytes | None]:
    columns = source.columns
    dataset = pads.dataset(shard.path, filesystem=shard.filesystem, format="parquet")
    image = columns.image_uri or columns.image
    absent = [name for name in (columns.key, image) if name not in dataset.schema.names]
    if absent:
        raise MissingSourceError(
            f"source shard {shard.uri} has no column {', '.join(map(repr, absent))}: it is not "
            "the shard the rows were read from"
        )
    key = pc.field(columns.key)
    if not pa.types.is_string(dataset.schema.field(columns.key).type):
        key = key.cast(pa.string())
    table = dataset.to_table(columns={"key": key, "image": pc.field(image)}, filter=key.isin(list(keys)))
    found_keys, images = table.column("key").to_pylist(), table.column("image")
    if columns.image_uri:
        fetcher = FetchImages(source.fetch, storage)
        return {k: fetcher.fetch(uri)[0] if uri else None for k, uri in zip(found_keys, images.to_pylist())}
    if pa.types.is_struct(images.type):  # Hugging Face image struct {bytes, path}
        images = pc.struct_field(images, "bytes")
    return dict(zip(found_keys, images.to_pylist()))


def _from_tar(shard: Location, keys: set[str], config: WebDatasetConfig) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    with shard.filesystem.open_input_stream(shard.path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            key, extension = split_member_name(member.name)
            if member.isfile() and key in keys and extension in config.image_extensions:
                found[key] = tar.extractfile(member).read()
    return found
