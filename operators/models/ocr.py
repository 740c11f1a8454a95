"""Text in the image: PP-OCRv4 detection and recognition (RapidOCR on ONNX Runtime, weights in its wheel).

Screenshots, memes, watermarked stock photos and product shots are what LAION- and DataComp-style
recipes drop or caption differently. The stage reads the lines of text and writes how much of the
image they cover (``text_area_fraction``, the union of their boxes), how many there are and what they
say (``ocr_text``, capped).

Its pixels are the image fitted into a square keeping its aspect ratio and padded (``PixelSpec``'s
``longest_edge``): a squashed line of text reads worse. The fraction is of the image's own area, not
of the padding. Licence: RapidOCR and the PP-OCR models are Apache-2.0.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from operators import schema as col
from operators.image.decode import PixelSpec, fitted_size
from operators.models.extras import onnx_threads, require
from operators.resources import Resources
from operators.stage import Stage
from operators.tensors import pixel_rows

EXTRA = "ocr"


class OcrConfig(BaseModel):
    """How the text in each image is read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The square the image is fitted into, and the detector's working size (PP-OCRv4's default 736 px):
    # its cost grows with the square of it.
    image_size: int = Field(736, ge=64, le=4096)
    min_text_score: float = Field(0.5, ge=0.0, le=1.0)  # lines read with less confidence are left out
    # Shorter lines are left out: in a photo a lone glyph is mostly a shape read as one (a cup's rim as "O").
    min_line_chars: int = Field(2, ge=1)
    max_text_chars: int = Field(256, ge=0, le=100_000)
    resources: Resources = Resources(num_cpus=1, num_gpus=0, batch_size=16)

    @property
    def geometry(self) -> PixelSpec:
        return PixelSpec(longest_edge=self.image_size, resample=3)


def ocr_stage(config: OcrConfig, pixels_column: str, geometry: str) -> Stage:
    threads = onnx_threads(config.resources)
    return Stage(
        name="ocr",
        kind="actor",
        config_key="ocr",
        resources=config.resources,
        reads=(pixels_column, col.IMAGE_WIDTH, col.IMAGE_HEIGHT),
        adds=(col.TEXT_AREA_FRACTION, col.TEXT_BOXES, col.OCR_TEXT),
        build=partial(ReadText, config, pixels_column),
        details=(
            f"input {geometry}",
            "PP-OCRv4 detection + recognition (RapidOCR, ONNX Runtime; Apache-2.0)",
            f"lines of {config.min_line_chars}+ characters read with confidence >= {config.min_text_score:g}; "
            f"ocr_text cut to {config.max_text_chars} chars",
            f"{threads} ONNX Runtime thread(s) (resources.num_cpus)",
        ),
    )


class ReadText:
    """Append ``text_area_fraction``, ``text_boxes`` and ``ocr_text``; nulls for rows without an image."""

    def __init__(self, config: OcrConfig, pixels_column: str = col.OCR_PIXELS):
        rapidocr = require("rapidocr_onnxruntime", EXTRA, "ocr")
        threads = onnx_threads(config.resources)
        # The detector works at the stage's size (RapidOCR's default would scale every image to 736 px).
        self.engine = rapidocr.RapidOCR(
            intra_op_num_threads=threads,
            inter_op_num_threads=1,
            text_score=config.min_text_score,
            det_limit_side_len=config.image_size,
        )
        self.config = config
        self.pixels_column = pixels_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels = batch.column(self.pixels_column).combine_chunks()
        valid = pc.is_valid(pixels).to_numpy(zero_copy_only=False)
        rows = pixel_rows(pixels, self.config.geometry.out_size)
        widths, heights = (batch.column(name).to_pylist() for name in (col.IMAGE_WIDTH, col.IMAGE_HEIGHT))
        fraction, boxes, text = [None] * batch.num_rows, [None] * batch.num_rows, [None] * batch.num_rows
        for i in np.flatnonzero(valid):
            size = fitted_size(widths[i], heights[i], self.config.image_size)
            fraction[i], boxes[i], text[i] = self.read(rows[i], size)
        return (
            batch.append_column(col.TEXT_AREA_FRACTION, pa.array(fraction, pa.float32()))
            .append_column(col.TEXT_BOXES, pa.array(boxes, pa.int32()))
            .append_column(col.OCR_TEXT, pa.array(text, pa.string()))
        )

    def read(self, rgb: np.ndarray, size: tuple[int, int]) -> tuple[float, int, str]:
        """(area fraction, lines, text) for one (H, W, 3) RGB square whose image fills ``size`` (width, height)."""
        # RapidOCR takes an array as BGR (OpenCV's order); PIL images and files it converts itself.
        lines, _ = self.engine(np.ascontiguousarray(rgb[:, :, ::-1]))
        lines = [line for line in lines or [] if len(line[1].strip()) >= self.config.min_line_chars]
        text = " ".join(line[1] for line in lines)[: self.config.max_text_chars]
        return text_area_fraction([line[0] for line in lines], size), len(lines), text


def text_area_fraction(boxes: list, size: tuple[int, int]) -> float:
    """The share of a ``size`` (width, height) image that the union of the quadrilateral ``boxes`` covers."""
    if not boxes:
        return 0.0
    import cv2

    width, height = size
    mask = np.zeros((height, width), np.uint8)
    for box in boxes:  # one by one: fillPoly with several polygons leaves their overlaps empty (even-odd)
        cv2.fillPoly(mask, [np.round(np.asarray(box, np.float32)).astype(np.int32)], 1)
    return float(mask.sum()) / (width * height)
