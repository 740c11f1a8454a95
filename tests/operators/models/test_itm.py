"""ItmScorer on small Arrow tables, without Ray, against the plain transformers ITM forward."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from operators import schema as col
from operators.image.decode import DecodeConfig, DecodeImages
from operators.models.itm import ItmConfig, ItmScorer
from operators.refs import ModelRef
from operators.storage import StorageOptions
from tests.images import encode, noise
from tests.processors import reference_processor


@pytest.fixture(scope="module")
def scorer(tiny_blip_itm_dir) -> ItmScorer:
    return ItmScorer(ItmConfig(model=ModelRef(source=str(tiny_blip_itm_dir))), StorageOptions())


def score(scorer: ItmScorer, images: list[bytes], captions) -> list[float | None]:
    table = pa.table(
        {
            col.KEY: [str(i) for i in range(len(images))],
            col.CAPTION: pa.array(captions, pa.string()),
            col.IMAGE: pa.array(images, pa.binary()),
        }
    )
    decoded = DecodeImages(DecodeConfig(jpeg_draft=False), scorer.geometry)(table)
    decoded = decoded.rename_columns([col.ITM_PIXELS if c == col.PIXELS else c for c in decoded.column_names])
    return scorer(decoded).column(col.ITM_SCORE).to_pylist()


def reference(model_dir, images, captions) -> np.ndarray:
    from transformers import BlipForImageTextRetrieval

    processor = reference_processor(model_dir)
    model = BlipForImageTextRetrieval.from_pretrained(model_dir).eval()
    inputs = processor(images=images, text=captions, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**inputs, use_itm_head=True).itm_score
    return torch.softmax(logits, dim=-1)[:, 1].numpy()


def test_itm_score_matches_plain_transformers(scorer, tiny_blip_itm_dir):
    images = [noise((60 + 11 * i, 40 + 9 * i), seed=i) for i in range(4)]
    captions = ["a photo of a red circle", "a blue square", "a green star on a wall", "一只猫坐在垫子上"]
    got = score(scorer, [encode(im, "PNG") for im in images], captions)
    # Same fp32 weights and identical uint8 pixels; only the folded normalisation reorders rounding.
    np.testing.assert_allclose(got, reference(tiny_blip_itm_dir, images, captions), atol=1e-5)


def test_missing_image_or_caption_gives_null_and_long_captions_are_truncated(scorer):
    image = encode(noise())
    got = score(scorer, [image, b"", image, image, image], ["a red circle", "a red circle", "", None, "red " * 30_000])
    assert [v is None for v in got] == [False, True, True, True, False]
    assert all(0.0 <= v <= 1.0 for v in (got[0], got[4]))
