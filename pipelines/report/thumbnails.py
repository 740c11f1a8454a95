"""The report's thumbnails: small JPEG data URIs of sampled rows, read back from the input shards.

Only the sampled rows' images are read (``pipelines.input.images``), under the column
names and the decode limits of the run's own (stored) config.
"""

from __future__ import annotations

import base64
import io
import logging
from collections import defaultdict

from PIL import Image, ImageOps

from operators import schema as col
from operators.image.decode import DecodeConfig
from operators.storage import Location, StorageOptions
from pipelines.input.images import ImageSource, find_source_images

log = logging.getLogger(__name__)

THUMBNAIL_PX = 96


def add_thumbnails(samples: list[dict], source: ImageSource, decode: DecodeConfig, storage: StorageOptions) -> None:
    """Set ``thumbnail`` on each sample: None where the row had no decodable image or it cannot be read."""
    # A row can be sampled twice (a duplicate pair's row is also in the gallery, or is the row two duplicates point at).
    wanted: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        sample["thumbnail"] = None
        if sample[col.STATUS] == col.OK and sample[col.SOURCE_SHARD]:
            wanted[sample[col.SOURCE_SHARD]][sample[col.KEY]].append(sample)
    for shard, by_key in wanted.items():
        try:
            images = find_source_images(Location.resolve(shard, storage), source, list(by_key), storage).items()
        except Exception as err:
            log.warning("report: cannot read thumbnails from %s: %s", shard, err)
            continue
        for key, data in images:
            uri = thumbnail(data, formats=list(decode.formats), max_pixels=decode.max_pixels)
            for sample in by_key[key]:
                sample["thumbnail"] = uri


def thumbnail(
    data: bytes | None, *, formats: list[str] | None, max_pixels: int, size: int = THUMBNAIL_PX
) -> str | None:
    """A small JPEG data URI of an encoded image, or None when it cannot be decoded."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            if image.width * image.height > max_pixels:
                return None
            image.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at a fraction of the size
            upright = ImageOps.exif_transpose(image)
            if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
                rgba = upright.convert("RGBA")
                rgb = Image.new("RGB", rgba.size, "white")
                rgb.paste(rgba, mask=rgba.getchannel("A"))
            else:
                rgb = upright.convert("RGB")
            rgb.thumbnail((size, size))
            buffer = io.BytesIO()
            rgb.save(buffer, "JPEG", quality=80)
    except Exception:  # untrusted bytes: anything Pillow refuses gets the placeholder
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
