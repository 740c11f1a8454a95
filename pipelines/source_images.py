"""The original image bytes of given rows, read back from their input shard (report thumbnails, search pages).

Only the wanted keys' images are kept: from a Parquet shard only the key and image
columns are read (filter pushed down); a tar is streamed once; referenced images
(``input.columns.image_uri``) are fetched again like the run fetched them.
"""

from __future__ import annotations

import tarfile

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from operators.fetch import FetchConfig, FetchImages
from operators.storage import StorageOptions, filesystem_for
from operators.webdataset import WebDatasetConfig, split_member_name
from pipelines.config import InputColumns


def read_source_images(shard: str, keys: list[str], columns: InputColumns, storage: StorageOptions,
                       webdataset: WebDatasetConfig = WebDatasetConfig(),
                       fetch: FetchConfig = FetchConfig()) -> list[tuple[str, bytes | None]]:
    """(key, encoded image) of the rows of ``shard`` whose key is in ``keys``; a key not found is left out."""
    filesystem, path = filesystem_for(shard, storage)
    if path.endswith(".tar"):
        return _from_tar(filesystem, path, set(keys), webdataset)
    dataset = pads.dataset(path, filesystem=filesystem, format="parquet")
    key = pc.field(columns.key)
    if not pa.types.is_string(dataset.schema.field(columns.key).type):
        key = key.cast(pa.string())
    image = columns.image_uri or columns.image
    table = dataset.to_table(columns={"k": key, "image": pc.field(image)}, filter=key.isin(keys))
    found = table.column("k").to_pylist()
    if columns.image_uri:
        fetcher = FetchImages(fetch, storage)
        return [(k, fetcher.fetch(uri)[0] if uri else None) for k, uri in zip(found, table.column("image").to_pylist())]
    images = table.column("image")
    if pa.types.is_struct(images.type):  # Hugging Face image struct {bytes, path}
        images = pc.struct_field(images, "bytes")
    return list(zip(found, images.to_pylist()))


def _from_tar(filesystem, path: str, keys: set[str], config: WebDatasetConfig) -> list[tuple[str, bytes | None]]:
    found = []
    with filesystem.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            key, extension = split_member_name(member.name)
            if member.isfile() and key in keys and extension in config.image_extensions:
                found.append((key, tar.extractfile(member).read()))
    return found
