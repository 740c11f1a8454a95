"""Image-text matching probability from a BLIP ITM head: a second opinion next to CLIP.

CLIP compares two independent embeddings; the ITM head attends across image and
text, so it catches mismatches in details (colours, counts) that CLIP misses.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from operators import schema as col
from operators.models.load import ModelOperator, Precision
from operators.refs import ModelRef
from operators.resources import Resources
from operators.stage import Stage
from operators.storage import StorageOptions
from operators.tensors import pixel_rows


class ItmConfig(BaseModel):
    """The ITM model, and which caption it judges."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelRef
    text: Literal["caption", "caption_best"] = "caption"
    max_text_tokens: int | None = Field(None, ge=1)
    precision: Precision = "auto"
    resources: Resources = Resources(num_cpus=1, num_gpus=None, batch_size=64)


def itm_stage(config: ItmConfig, storage: StorageOptions, *, pixels_column: str, geometry: str) -> Stage:
    """The ITM stage's contract."""
    return Stage(
        name="itm",
        kind="actor",
        config_key="itm",
        resources=config.resources,
        model=config.model,
        reads=(pixels_column, config.text),
        adds=(col.ITM_SCORE,),
        build=partial(ItmScorer, config, storage, pixels_column),
        details=(f"input {geometry}", f"judges {config.text}", f"precision {config.precision}"),
    )


class ItmScorer(ModelOperator):
    """Append ``itm_score``: P(match) from the ITM head, null without an image or a caption."""

    def __init__(self, config: ItmConfig, storage: StorageOptions, pixels_column: str = col.ITM_PIXELS):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, BlipForImageTextRetrieval

        super().__init__(config.model, config.precision, storage, BlipForImageTextRetrieval)
        self.pixels_column = pixels_column
        self.text_column = config.text
        self.tokenizer = self.preprocessor(AutoTokenizer)
        self.pixel_input(self.preprocessor(AutoImageProcessor))
        self.max_text_tokens = config.max_text_tokens or self.model.config.text_config.max_position_embeddings
        self._torch = torch

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        pixels = batch.column(self.pixels_column).combine_chunks()
        texts = batch.column(self.text_column).to_pylist()
        scorable = pc.is_valid(pixels).to_numpy(zero_copy_only=False) & np.array(
            [bool(t and t.strip()) for t in texts], dtype=bool
        )
        scores = np.full(n, np.nan, dtype=np.float32)
        if scorable.any():
            rows = pixel_rows(pixels, self.geometry.out_size)[scorable]
            scores[scorable] = self.score(rows, [t for t, ok in zip(texts, scorable) if ok])
        return batch.append_column(col.ITM_SCORE, pa.array(scores, pa.float32(), mask=~scorable))

    def score(self, rows: np.ndarray, texts: list[str]) -> np.ndarray:
        """P(match) for each (image, text) pair; long texts are truncated to the model's context."""
        torch = self._torch
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            out = self.model(
                input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"],
                pixel_values=self.to_device(rows),
                use_itm_head=True,
            )
            # Softmax in fp32: in bf16 probabilities near 0 or 1 lose their resolution.
            return torch.softmax(out.itm_score.float(), dim=-1)[:, 1].cpu().numpy()
