"""ImageClassifier on small Arrow tables, without Ray, against a plain transformers forward."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from operators import schema as col
from operators.image.decode import DecodeConfig, DecodeImages
from operators.models.classify import ClassifierConfig, ImageClassifier
from operators.refs import ModelRef
from operators.storage import StorageOptions
from tests.images import encode, noise
from tests.processors import reference_processor


def config(model_dir, **scores) -> ClassifierConfig:
    return ClassifierConfig(model=ModelRef(source=str(model_dir)), scores=scores or {"watermark": "watermark"})


def test_scores_match_a_plain_transformers_forward(tiny_vit_classifier_dir):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    classifier = ImageClassifier(config(tiny_vit_classifier_dir, watermark="watermark", text="text"), StorageOptions())
    images = [noise((50 + 9 * i, 40 + 4 * i), seed=i) for i in range(5)]
    table = pa.table(
        {
            col.KEY: [str(i) for i in range(6)],
            col.IMAGE: pa.array([encode(im, "PNG") for im in images] + [b"broken"], pa.binary()),
        }
    )
    decoded = DecodeImages(DecodeConfig(jpeg_draft=False), classifier.geometry)(table)
    out = classifier(
        decoded.rename_columns([c if c != col.PIXELS else col.CLASSIFIER_PIXELS for c in decoded.column_names])
    )
    rows = out.column(col.CLASSIFIER_SCORES)
    assert rows.type == col.CLASSIFIER_SCORES_TYPE and rows.to_pylist()[5] is None

    model = AutoModelForImageClassification.from_pretrained(tiny_vit_classifier_dir).eval()
    processor = reference_processor(tiny_vit_classifier_dir, AutoImageProcessor)
    with torch.inference_mode():
        probabilities = model(**processor(images=images, return_tensors="pt")).logits.softmax(-1).numpy()
    for name, index in (("watermark", 1), ("text", 2)):
        got = [dict(row)[name] for row in rows.to_pylist()[:5]]
        np.testing.assert_allclose(got, probabilities[:, index], atol=1e-5, rtol=0)


def test_the_classifier_uses_its_own_processor_geometry(tiny_vit_classifier_dir):
    classifier = ImageClassifier(config(tiny_vit_classifier_dir), StorageOptions())
    assert classifier.geometry.out_size == (24, 24) and classifier.geometry.resample == 2  # ViT: bilinear, no crop


def test_a_label_the_model_does_not_have_is_an_error_listing_its_labels(tiny_vit_classifier_dir):
    with pytest.raises(ValueError, match="has no label 'Watermark'; its labels are clean, watermark, text"):
        ImageClassifier(config(tiny_vit_classifier_dir, wm="Watermark"), StorageOptions())
