"""The demo's trained tiny CLIP separates the planted mismatches, and a cached build is reused."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.demo import build_tiny_clip, write_sample_shards
from jobs.demo.run import DEMO_TRAIN_STEPS
from tests.operators.models.test_clip import reference_scores


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
