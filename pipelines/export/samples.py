"""A row as a WebDataset sample: its member names, its image's extension, its text and its JSON.

WebDataset's key of a member is its name up to the first dot of the last path part, and
a "/" makes directories; a table key is any string. So a sample's name is its key
percent-encoded (every byte outside ``A-Z a-z 0-9 - _`` becomes ``%XX``: ``a.b/c`` is
``a%2Eb%2Fc``), and a key that repeats in one export (two crawls' ``000000000``) gets
``~1``, ``~2``, ... on its second, third, ... sample in export order; the empty key is
``~0``. ``key_of`` reverses it; the sample's ``.json`` keeps the key as it is.
"""

from __future__ import annotations

import datetime as dt
import math
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col

# File signatures: the extension that tells WebDataset's decoders (and people) what the bytes are.
_SIGNATURES = (
    (0, b"\xff\xd8\xff", "jpg"),
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (0, b"BM", "bmp"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
)
_FTYP_BRANDS = {b"avif": "avif", b"avis": "avif", b"heic": "heic", b"heix": "heic", b"mif1": "heic"}
UNKNOWN_EXT = "bin"


def sample_name(key: str, occurrence: int = 0) -> str:
    """The name of the ``occurrence``-th sample (from 0) with ``key`` in an export."""
    encoded = quote(key, safe="-_").replace(".", "%2E").replace("~", "%7E")
    if occurrence or not encoded:
        return f"{encoded}~{occurrence}"
    return encoded


def key_of(name: str) -> str:
    """The key of the sample named ``name``: ``sample_name``'s inverse."""
    return unquote(name.split("~", 1)[0])


def occurrences(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """For each row, how many rows before it have the same key (0 for a key's first row)."""
    ids = pc.dictionary_encode(keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys)
    codes = ids.indices.to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    grouped = codes[order]
    first = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    starts = np.repeat(first, np.diff(np.r_[first, len(grouped)]))
    out = np.empty(len(codes), np.int64)
    out[order] = np.arange(len(codes)) - starts
    return out


def image_ext(data: bytes) -> str:
    """The extension of an encoded image from its first bytes; ``bin`` for what no signature matches."""
    for offset, magic, ext in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(data[8:12], UNKNOWN_EXT)
    return UNKNOWN_EXT


def caption_text(row: dict) -> str:
    """The ``.txt``: the selected caption where one was selected, else the original."""
    best = row.get(col.CAPTION_BEST)
    return best if best is not None else (row.get(col.CAPTION) or "")


def json_row(row: dict) -> dict:
    """A row's scalar columns as JSON values: dates as ISO strings, maps as objects, NaN and inf as null."""
    return {name: _plain(value) for name, value in row.items()}


def scalar_fields(schema: pa.Schema) -> list[pa.Field]:
    """The columns every sample carries: all but the embeddings and binary ones (images go in their own file)."""
    return [f for f in schema if f.name not in (col.IMAGE_EMBEDDING, col.TEXT_EMBEDDING) and not _bulky(f.type)]


def _bulky(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        return True
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    return is_list and pa.types.is_floating(kind.value_type)


def _plain(value):
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        if value and all(isinstance(item, tuple) and len(item) == 2 for item in value):  # an Arrow map
            return {str(k): _plain(v) for k, v in value}
        return [_plain(item) for item in value]
    return value
