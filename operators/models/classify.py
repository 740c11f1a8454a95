"""An image classifier (any ``AutoModelForImageClassification``: ViT, ConvNeXt, ...) on its own pixels.

Public watermark and NSFW classifiers are of this kind. The classifier gets its own
geometry from its processor, cut from the same decoded image as every other model's,
and writes the softmax probability of each configured label into ``classifier_scores``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators import schema as col
from operators.models.load import ModelLoadError, ModelOperator, Precision, model_config
from operators.refs import ModelRef
from operators.resources import Resources
from operators.stage import Stage
from operators.storage import StorageOptions
from operators.tensors import pixel_rows

_SCORE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class ClassifierConfig(BaseModel):
    """The classifier, and which of its labels become scores: ``scores: {watermark: "watermark"}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelRef
    scores: Mapping[str, str] = Field(min_length=1)
    precision: Precision = "auto"
    resources: Resources = Resources(num_cpus=1, num_gpus=None, batch_size=64)

    @field_validator("scores")
    @classmethod
    def _plain_names(cls, scores: Mapping[str, str]) -> Mapping[str, str]:
        bad = [name for name in scores if not _SCORE_NAME.match(name)]
        if bad:
            raise ValueError(f"score names may use letters, digits, '_', '.', '-' only: {', '.join(map(repr, bad))}")
        return scores


def check_labels(config: ClassifierConfig, id2label: Mapping) -> dict[str, int]:
    """Score name -> the label's index in the model's output; a ``ValueError`` listing the labels otherwise."""
    index = {str(label): int(i) for i, label in id2label.items()}
    unknown = {name: label for name, label in config.scores.items() if label not in index}
    if unknown:
        name, label = next(iter(unknown.items()))
        raise ValueError(
            f"classifier.scores.{name}: {config.model.source} has no label {label!r}; its labels are "
            f"{', '.join(sorted(index, key=index.get))}"
        )
    return {name: index[label] for name, label in config.scores.items()}


def check_classifier_labels(config: ClassifierConfig, storage: StorageOptions) -> None:
    """Before any work: every configured score names a label the classifier has (its config.json's id2label)."""
    try:
        raw = model_config(config.model, storage)
    except (OSError, ValueError, ModelLoadError) as err:
        raise ValueError(f"classifier.model: cannot read {config.model.source}/config.json: {err}") from None
    check_labels(config, raw.get("id2label") or {})


def classifier_stage(config: ClassifierConfig, storage: StorageOptions, *, pixels_column: str, geometry: str) -> Stage:
    """The classifier stage's contract."""
    scores = ", ".join(f"{name} = P({label})" for name, label in config.scores.items())
    return Stage(
        name="classifier",
        kind="actor",
        config_key="classifier",
        resources=config.resources,
        model=config.model,
        reads=(pixels_column,),
        adds=(col.CLASSIFIER_SCORES,),
        build=partial(ImageClassifier, config, storage, pixels_column),
        details=(f"input {geometry}", f"scores {scores}", f"precision {config.precision}"),
    )


class ImageClassifier(ModelOperator):
    """Append ``classifier_scores``: score name -> softmax probability of its label (null without an image)."""

    def __init__(self, config: ClassifierConfig, storage: StorageOptions, pixels_column: str = col.CLASSIFIER_PIXELS):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        super().__init__(config.model, config.precision, storage, AutoModelForImageClassification)
        self.labels = check_labels(config, self.model.config.id2label)
        self.pixels_column = pixels_column
        self.pixel_input(self.preprocessor(AutoImageProcessor))
        self._torch = torch

    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels = batch.column(self.pixels_column).combine_chunks()
        valid = pc.is_valid(pixels).to_numpy(zero_copy_only=False)
        probabilities = np.zeros((int(valid.sum()), len(self.labels)), np.float32)
        if valid.any():
            probabilities = self.probabilities(pixel_rows(pixels, self.geometry.out_size)[valid])
        k = len(self.labels)
        offsets = np.zeros(len(valid) + 1, np.int32)
        offsets[1:] = np.cumsum(valid.astype(np.int32) * k)
        keys = pa.array(list(self.labels) * int(valid.sum()), pa.string())
        scores = pa.MapArray.from_arrays(
            pa.array(offsets),
            keys,
            pa.array(probabilities.reshape(-1), pa.float32()),
            type=col.CLASSIFIER_SCORES_TYPE,
            mask=pa.array(~valid),
        )
        return batch.append_column(col.CLASSIFIER_SCORES, scores)

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        """(n, scores) softmax probabilities of the configured labels for (n, H, W, 3) uint8 images."""
        torch = self._torch
        with torch.inference_mode():
            logits = self.model(pixel_values=self.to_device(rows)).logits
            # Softmax in fp32: in bf16 probabilities near 0 or 1 lose their resolution.
            probabilities = torch.softmax(logits.float(), dim=-1)
        return probabilities[:, list(self.labels.values())].cpu().numpy()
