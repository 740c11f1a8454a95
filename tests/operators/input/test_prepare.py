"""PrepareInput without Ray: renamed pass-through columns, img2dataset's download status, image references."""

from __future__ import annotations

import pyarrow as pa

from operators import schema as col
from operators.input.prepare import SHARD_PATH, ColumnMapping, PrepareInput

I2D = pa.table(
    {
        "key": ["0", "1", "2"],
        "caption": ["a", "b", "c"],
        "jpg": [b"\xff\xd8", None, None],
        "status": ["success", "failed_to_download", "success"],
        "error_message": [None, "HTTP Error 404", None],
        "url": ["u0", "u1", "u2"],
        SHARD_PATH: ["s.parquet"] * 3,
    }
)


def test_extra_columns_are_renamed_on_the_way_in():
    mapping = ColumnMapping("key", "caption", "jpg", extra=(("status", "download_status"), ("url", "url")))
    out = PrepareInput(mapping, "file://")(I2D)
    assert out.column("download_status").to_pylist() == I2D.column("status").to_pylist()
    assert out.column("url").to_pylist() == ["u0", "u1", "u2"]
    assert "status" not in out.column_names  # vlpipe's own status is decode's to add


def test_failed_downloads_get_their_own_status_and_the_downloader_error():
    mapping = ColumnMapping("key", "caption", "jpg").for_schema(I2D.schema, "status", "error_message")
    out = PrepareInput(mapping, "")(I2D)
    assert out.column(col.INPUT_STATUS).to_pylist() == [None, col.DOWNLOAD_FAILED, None]
    assert out.column(col.INPUT_ERROR).to_pylist()[1] == "status=failed_to_download: HTTP Error 404"
    # A "success" without bytes is left to decode: it is a missing image, whatever the downloader said.


def test_a_status_column_is_not_trusted_over_image_bytes():
    """Another crawler's `status` (say an HTTP code) must not reject rows that have their image."""
    table = I2D.set_column(I2D.schema.get_field_index("status"), "status", pa.array(["200", "200", "404"]))
    table = table.set_column(table.schema.get_field_index("jpg"), "jpg", pa.array([b"x", b"y", None]))
    mapping = ColumnMapping("key", "caption", "jpg").for_schema(table.schema, "status", "error_message")
    assert PrepareInput(mapping, "")(table).column(col.INPUT_STATUS).to_pylist() == [None, None, col.DOWNLOAD_FAILED]


def test_references_and_path_only_image_structs_are_fetched():
    uris = ColumnMapping("key", "caption", None, image_uri="url").for_schema(I2D.schema, None, "")
    out = PrepareInput(uris, "")(I2D)
    assert uris.fetch and out.column(col.IMAGE_URI).to_pylist() == ["u0", "u1", "u2"]
    assert out.column(col.IMAGE).null_count == 3

    struct = pa.array(
        [{"bytes": b"x", "path": "a.jpg"}, {"bytes": None, "path": "b.jpg"}, None],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = I2D.set_column(I2D.schema.get_field_index("jpg"), "jpg", struct)
    hf = ColumnMapping("key", "caption", "jpg").for_schema(table.schema, None, "")
    out = PrepareInput(hf, "")(table)
    assert hf.fetch and out.column(col.IMAGE).to_pylist() == [b"x", None, None]
    assert out.column(col.IMAGE_URI).to_pylist() == [None, "b.jpg", None]  # bytes win; a null struct has nothing
