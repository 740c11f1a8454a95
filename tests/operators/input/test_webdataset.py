"""Tar samples to rows (operators.input.webdataset), without Ray: grouping, statuses, json fields."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest

from operators import schema as col
from operators.input.webdataset import (
    WDS_CAPTION,
    WDS_IMAGE,
    WDS_KEY,
    WebDatasetConfig,
    read_tar,
    split_member_name,
)
from tests.images import encode, noise
from tests.tars import tar_bytes

JPG, PNG = encode(noise(seed=1), "JPEG"), encode(noise(seed=2))


def rows(members, config=WebDatasetConfig(), extra=pa.schema([])) -> list[dict]:
    tables = list(read_tar(io.BytesIO(tar_bytes(members)), config, extra))
    return pa.concat_tables(tables).to_pylist() if tables else []


@pytest.mark.parametrize(
    "name, expected",
    [
        ("000001.jpg", ("000001", "jpg")),
        ("a/b/000001.seg.PNG", ("a/b/000001", "seg.png")),
        ("noext", ("noext", "")),
    ],
)
def test_member_names_split_like_webdataset(name, expected):
    assert split_member_name(name) == expected


def test_members_of_one_key_far_apart_still_make_one_row():
    """Adjacency-based readers split such a sample into two rows with half a sample each."""
    out = rows([("a.jpg", JPG), ("b.jpg", PNG), ("b.txt", "a bee"), ("a.txt", "an ay")])
    assert [(r[WDS_KEY], r[WDS_CAPTION], r[WDS_IMAGE]) for r in out] == [("a", "an ay", JPG), ("b", "a bee", PNG)]
    assert all(r[col.INPUT_STATUS] is None for r in out)


def test_a_sample_without_image_or_caption_is_a_row_with_a_reason():
    out = rows([("a.txt", "no picture"), ("a.json", {"x": 1}), ("b.png", PNG), ("c.cls", "3"), ("c.mp4", b"\0")])
    by_key = {r[WDS_KEY]: r for r in out}
    assert set(by_key) == {"a", "b", "c"}
    assert by_key["a"][col.INPUT_STATUS] == col.MISSING_IMAGE and "it has: json, txt" in by_key["a"][col.INPUT_ERROR]
    assert by_key["b"][WDS_CAPTION] is None and by_key["b"][col.INPUT_STATUS] is None  # the filter rejects it
    assert by_key["c"][col.INPUT_STATUS] == col.MISSING_IMAGE and "cls, mp4" in by_key["c"][col.INPUT_ERROR]


def test_two_images_for_one_key_are_never_silently_merged():
    out = rows([("a.jpg", JPG), ("a.txt", "first"), ("a.jpg", PNG), ("b.jpg", JPG), ("b.png", PNG)])
    assert [r[col.INPUT_STATUS] for r in out] == [col.INVALID_SAMPLE, col.INVALID_SAMPLE]
    assert "2 'a.jpg' members" in out[0][col.INPUT_ERROR] and "jpg, png" in out[1][col.INPUT_ERROR]
    assert out[0][WDS_IMAGE] is None


def test_caption_and_extra_columns_from_the_json_member():
    config = WebDatasetConfig(caption_field="caption")
    extra = pa.schema([("url", pa.string()), ("width", pa.int64()), ("tags", pa.string())])
    out = rows(
        [
            ("a.jpg", JPG),
            ("a.json", {"caption": "from json", "url": "http://x/a", "width": 7, "tags": [1]}),
            ("b.jpg", PNG),
            ("b.json", {"caption": 5, "width": "wide"}),
            ("c.jpg", JPG),
            ("c.json", b"{not json"),
        ],
        config,
        extra,
    )
    assert [r[WDS_CAPTION] for r in out] == ["from json", "5", None]
    assert [r["url"] for r in out] == ["http://x/a", None, None]
    assert [r["width"] for r in out] == [7, None, None]  # a value of another type is null, not a failed shard
    assert out[0]["tags"] == "[1]"


def test_invalid_utf8_captions_are_replaced_not_fatal():
    out = rows([("a.jpg", JPG), ("a.txt", b"caf\xe9")])
    assert out[0][WDS_CAPTION] == "caf\ufffd"


def test_directories_and_hidden_files_are_not_samples():
    out = rows([("sub/a.jpg", JPG), ("sub/._a.jpg", b"resource fork"), ("sub/a.txt", "x")])
    assert [r[WDS_KEY] for r in out] == ["sub/a"]


def test_real_webdataset_writer_output_reads_back(tmp_path):
    import webdataset as wds

    path = tmp_path / "shard.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(5):
            sink.write({"__key__": f"{i:05d}", "jpg": JPG, "txt": f"caption {i}", "json": {"n": i}})
    with open(path, "rb") as stream:
        out = pa.concat_tables(read_tar(stream, WebDatasetConfig(), pa.schema([("n", pa.int64())]))).to_pylist()
    assert [(r[WDS_KEY], r[WDS_CAPTION], r["n"]) for r in out] == [(f"{i:05d}", f"caption {i}", i) for i in range(5)]
    assert all(r[WDS_IMAGE] == JPG for r in out)
