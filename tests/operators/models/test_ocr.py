"""OCR on real photographs (scikit-image's) and rendered text, against RapidOCR's own Python API."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageFont
from skimage import data

from operators import schema as col
from operators.image.decode import DecodeConfig, DecodeImages, fitted_size
from operators.models.ocr import OcrConfig, ReadText, text_area_fraction
from tests.images import encode

# skimage.data.page(), as printed: the words the stage must read.
PAGE = (
    "Region-based segmentation Let us first determine markers of the coins and the background. These markers "
    "are pixels that we can label unambiguously as either object or background. Here, histogram of grey values: "
    ">>> markers = np.zeros_like(coins)"
)
RENDERED = {"sale": "SUMMER SALE\n50% OFF everything", "sign": "Welcome to the\nMountain Trail Cafe"}


def rendered(text: str, size=(800, 300), font_size=52) -> Image.Image:
    """Dark text on a light card, in Pillow's bundled FreeType font."""
    image = Image.new("RGB", size, (250, 248, 240))
    ImageDraw.Draw(image).multiline_text(
        (20, 30), text, fill=(20, 20, 30), font=ImageFont.load_default(size=font_size), spacing=12
    )
    return image


def photos() -> dict[str, Image.Image]:
    images = {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("page", "chelsea", "coffee")}
    images["astronaut"] = Image.fromarray(data.astronaut())
    return images | {name: rendered(text) for name, text in RENDERED.items()}


@pytest.fixture(scope="module")
def read():
    """The OCR operator, and its output over the photographs and rendered cards (decoded as a run decodes)."""
    config = OcrConfig()
    operator = ReadText(config)
    images = photos()
    table = pa.table({col.KEY: list(images), col.IMAGE: pa.array([encode(im) for im in images.values()], pa.binary())})
    decoded = DecodeImages(DecodeConfig(jpeg_draft=False), config.geometry)(table)
    decoded = decoded.rename_columns([col.OCR_PIXELS if c == col.PIXELS else c for c in decoded.column_names])
    return operator, decoded, {r[col.KEY]: r for r in operator(decoded).to_pylist()}


def cer(got: str, expected: str) -> float:
    """Character error rate: Levenshtein distance over the expected length, spaces ignored."""
    a, b = got.replace(" ", ""), expected.replace(" ", "")
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1] / len(b)


def test_the_text_of_a_printed_page_and_of_rendered_cards_is_read(read):
    _, _, out = read
    page = out["page"]
    assert cer(page[col.OCR_TEXT], PAGE) < 0.05 and page[col.TEXT_BOXES] >= 5
    assert 0.3 < page[col.TEXT_AREA_FRACTION] < 0.6
    for name, text in RENDERED.items():
        assert cer(out[name][col.OCR_TEXT], text.replace("\n", " ")) < 0.05 and out[name][col.TEXT_BOXES] == 2
        assert 0.1 < out[name][col.TEXT_AREA_FRACTION] < 0.3


def test_photographs_without_text_have_none(read):
    _, _, out = read
    for name in ("chelsea", "coffee", "astronaut"):
        assert out[name][col.TEXT_AREA_FRACTION] < 0.01, (name, out[name])


def test_the_stage_equals_rapidocr_on_the_same_pixels(read):
    """RapidOCR's own API on the image the stage saw (the fitted square as a PIL image, which it converts
    to BGR itself), then the same line rule; the area from an independent rasterisation (PIL's)."""
    from rapidocr_onnxruntime import RapidOCR

    _, decoded, out = read
    engine = RapidOCR()
    pixels = decoded.column(col.OCR_PIXELS).to_pylist()
    for i, key in enumerate(decoded.column(col.KEY).to_pylist()):
        square = np.frombuffer(pixels[i], np.uint8).reshape(736, 736, 3)
        lines = [line for line in engine(Image.fromarray(square))[0] or [] if len(line[1].strip()) >= 2]
        assert out[key][col.OCR_TEXT] == " ".join(line[1] for line in lines)
        assert out[key][col.TEXT_BOXES] == len(lines)
        size = fitted_size(*[decoded.column(c)[i].as_py() for c in (col.IMAGE_WIDTH, col.IMAGE_HEIGHT)], 736)
        mask = Image.new("1", size)
        for box in (line[0] for line in lines):
            ImageDraw.Draw(mask).polygon([tuple(np.round(p).astype(int).tolist()) for p in box], fill=1)
        expected = np.asarray(mask).mean()
        assert out[key][col.TEXT_AREA_FRACTION] == pytest.approx(expected, abs=0.01)


def test_rows_without_an_image_get_nulls_and_the_text_is_capped():
    config = OcrConfig(max_text_chars=12)
    table = pa.table({col.KEY: ["a", "b"], col.IMAGE: pa.array([encode(rendered(RENDERED["sign"])), b"nope"])})
    decoded = DecodeImages(DecodeConfig(), config.geometry)(table)
    out = ReadText(config, col.PIXELS)(decoded).to_pylist()
    assert out[0][col.OCR_TEXT] == "Welcome to t" and out[1][col.TEXT_AREA_FRACTION] is None
    assert out[1][col.TEXT_BOXES] is None and out[1][col.OCR_TEXT] is None


def test_the_area_is_the_union_of_the_boxes_within_the_image():
    square = [[0, 0], [10, 0], [10, 10], [0, 10]]
    assert text_area_fraction([square, square], (20, 20)) == pytest.approx(11 * 11 / 400)  # overlap counted once
    assert text_area_fraction([[[15, 5], [40, 5], [40, 9], [15, 9]]], (20, 10)) == pytest.approx(5 * 5 / 200)
    assert text_area_fraction([], (20, 10)) == 0.0
