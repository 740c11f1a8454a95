"""The demo's sample shards are img2dataset-style and hold the planted problems the demo's summary counts."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.demo import write_sample_shards


def test_sample_shards_are_img2dataset_style_with_planted_problems(tmp_path):
    paths = write_sample_shards(tmp_path, num_shards=2, rows_per_shard=20, broken_per_shard=2, seed=3)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    rows = [r for p in paths for r in pq.read_table(p).to_pylist()]

    assert [p.name for p in paths] == ["00000.parquet", "00001.parquet"]
    assert {"key", "caption", "jpg", "url", "width", "height"} <= set(rows[0])
    assert len({r["key"] for r in rows}) == 40
    assert len(manifest["broken_keys"]) == 4 and len(manifest["empty_caption_keys"]) == 2
    assert len(manifest["mismatched_keys"]) == 8

    by_key = {r["key"]: r for r in rows}
    for key in manifest["broken_keys"]:
        data = by_key[key]["jpg"]
        with pytest.raises(Exception):  # noqa: B017 (Pillow's error depends on how the bytes are broken)
            Image.open(io.BytesIO(data)).load()
    for key in manifest["empty_caption_keys"]:
        assert by_key[key]["caption"] == ""
    good = [r for r in rows if r["key"] not in set(manifest["broken_keys"])]
    for row in good:
        image = Image.open(io.BytesIO(row["jpg"]))
        assert image.format == "JPEG" and image.size == (row["width"], row["height"])


def test_sample_shards_are_reproducible(tmp_path):
    a = write_sample_shards(tmp_path / "a", num_shards=1, rows_per_shard=10, seed=5)
    b = write_sample_shards(tmp_path / "b", num_shards=1, rows_per_shard=10, seed=5)
    assert pq.read_table(a[0]).equals(pq.read_table(b[0]))
