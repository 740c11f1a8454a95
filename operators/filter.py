"""Turn scores into ``keep`` and ``reject_reason``; never drop a row here."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from operators import schema as col
from operators.resources import Resources


class FilterConfig(BaseModel):
    """Thresholds. ``keep_top_fraction`` keeps the best-scoring share of eligible rows.

    ``caption: best`` judges each row by ``caption_best`` and its CLIP score (the
    better of original and generated caption) instead of the original caption.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    caption: Literal["original", "best"] = "original"
    min_clip_score: float | None = Field(None, ge=-1.0, le=1.0)
    min_itm_score: float | None = Field(None, ge=0.0, le=1.0)
    keep_top_fraction: float | None = Field(None, gt=0.0, le=1.0)
    resources: Resources = Resources(num_cpus=0.25, num_gpus=0, batch_size=1024)

    @property
    def caption_column(self) -> str:
        return col.CAPTION_BEST if self.caption == "best" else col.CAPTION

    @property
    def clip_score_column(self) -> str:
        return col.CLIP_SCORE_BEST if self.caption == "best" else col.CLIP_SCORE


class ScoreFilter:
    """Decide each row: the first failing check names its ``reject_reason``.

    Order: image status, then empty caption, then ``min_clip_score``, then
    ``min_itm_score``, then the top-fraction cut-off (computed over the whole run
    by the pipeline and passed in).
    """

    output_columns = (col.KEEP, col.REJECT_REASON)

    def __init__(self, config: FilterConfig, top_fraction_threshold: float | None = None):
        self.config = config
        self.top_fraction_threshold = top_fraction_threshold
        self.input_columns = (col.STATUS, config.caption_column, config.clip_score_column) + (
            (col.ITM_SCORE,) if config.min_itm_score is not None else ()
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        status = np.array(batch.column(col.STATUS).to_pylist(), dtype=object)
        reason = np.where(status == col.OK, None, status).astype(object)
        caption = pc.utf8_trim_whitespace(batch.column(self.config.caption_column).cast(pa.string()))
        empty = pc.fill_null(pc.equal(pc.utf8_length(caption), 0), True).to_numpy(zero_copy_only=False)
        reason[(reason == None) & empty] = col.EMPTY_CAPTION  # noqa: E711 (elementwise)
        for threshold, score_column, why in (
            (self.config.min_clip_score, self.config.clip_score_column, col.LOW_CLIP_SCORE),
            (self.config.min_itm_score, col.ITM_SCORE, col.LOW_ITM_SCORE),
            (self.top_fraction_threshold, self.config.clip_score_column, col.BELOW_TOP_FRACTION),
        ):
            if threshold is not None:
                score = pc.fill_null(batch.column(score_column), np.nan).to_numpy(zero_copy_only=False)
                low = ~(score >= threshold)  # NaN scores fail too, but only reach here for rejected rows
                reason[(reason == None) & low] = why  # noqa: E711
        keep = np.array([r is None for r in reason], dtype=bool) if n else np.zeros(0, bool)
        return batch.append_column(col.KEEP, pa.array(keep, pa.bool_())).append_column(
            col.REJECT_REASON, pa.array(reason.tolist(), pa.string())
        )


def top_fraction_threshold(scores: np.ndarray, fraction: float) -> float | None:
    """The score at which the top ``fraction`` of rows starts (ties are kept)."""
    scores = scores[~np.isnan(scores)]
    if scores.size == 0:
        return None
    keep = max(1, int(np.ceil(fraction * scores.size)))
    return float(np.sort(scores)[::-1][keep - 1])
