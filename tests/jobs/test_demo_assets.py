"""The demo's sample data and tiny model are what the demo's summary claims they are."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.demo import DEMO_TRAIN_STEPS
from jobs.demo_assets import build_tiny_clip, write_sample_shards
from tests.operators.test_clip import reference_scores


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
        with pytest.raises(Exception):
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


@pytest.mark.slow
def test_trained_tiny_clip_tells_matched_from_mismatched(tmp_path, demo_models):
    """The demo's threshold only means something if training separates the planted mismatches."""
    model_dir = demo_models["tiny-clip"]
    paths = write_sample_shards(tmp_path / "shards", num_shards=1, rows_per_shard=40, seed=11)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    skip = set(manifest["broken_keys"]) | set(manifest["empty_caption_keys"])
    rows = [r for r in pq.read_table(paths[0]).to_pylist() if r["key"] not in skip]
    images = [Image.open(io.BytesIO(r["jpg"])).convert("RGB") for r in rows]
    scores = reference_scores(model_dir, images, [r["caption"] for r in rows])
    mismatched = np.array([r["key"] in set(manifest["mismatched_keys"]) for r in rows])

    assert np.median(scores[~mismatched]) > np.median(scores[mismatched]) + 0.4
    # A cached build with the same recipe is reused, not retrained.
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_clip(model_dir, train_steps=DEMO_TRAIN_STEPS) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
