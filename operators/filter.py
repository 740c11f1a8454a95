"""Turn scores into ``keep`` and ``reject_reason``; never drop a row here."""

from __future__ import annotations

from functools import partial
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pydantic import BaseModel, ConfigDict, Field

from operators import schema as col
from operators.stage import Stage


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

    @property
    def caption_column(self) -> str:
        return col.CAPTION_BEST if self.caption == "best" else col.CAPTION

    @property
    def clip_score_column(self) -> str:
        return col.CLIP_SCORE_BEST if self.caption == "best" else col.CLIP_SCORE


def filter_stage(config: FilterConfig) -> Stage:
    """The filter's contract: it reads the caption and every score it has a threshold for."""
    thresholds = [f"{name} >= {value:g}" for name, value in (
        (config.clip_score_column, config.min_clip_score), (col.ITM_SCORE, config.min_itm_score)) if value is not None]
    return Stage(
        name="filter", kind="fused", build=partial(ScoreFilter, config),
        reads=ScoreFilter(config).input_columns, adds=(col.KEEP, col.REJECT_REASON),
        details=(f"caption {config.caption_column}", *(thresholds or ["no score threshold"])),
    )


def top_fraction_stage(config: FilterConfig) -> Stage:
    """The whole-run cut-off's contract (only when ``keep_top_fraction`` is set)."""
    return Stage(
        name="top_fraction", kind="aggregate", build=partial(TopFraction, config.keep_top_fraction, config.clip_score_column),
        reads=(config.clip_score_column, col.KEEP, col.REJECT_REASON), adds=(),
        details=(f"keep the best {config.keep_top_fraction:g} of rows by {config.clip_score_column}",
                 "exact cut-off from every score (4 bytes a row to the driver)"),
    )


class ScoreFilter:
    """Decide each row: the first failing check names its ``reject_reason``.

    Order: image status, then empty caption, then ``min_clip_score``, then
    ``min_itm_score``. The top-fraction cut-off comes after, from ``TopFraction``.
    """

    def __init__(self, config: FilterConfig):
        self.config = config
        self.input_columns = (col.STATUS, config.caption_column, config.clip_score_column) + (
            (col.ITM_SCORE,) if config.min_itm_score is not None else ()
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        status = np.array(batch.column(col.STATUS).to_pylist(), dtype=object)
        reason = np.where(status == col.OK, None, status).astype(object)
        caption = pc.utf8_trim_whitespace(batch.column(self.config.caption_column).cast(pa.string()))
        empty = pc.fill_null(pc.equal(pc.utf8_length(caption), 0), True).to_numpy(zero_copy_only=False)
        reason[(reason == None) & empty] = col.EMPTY_CAPTION  # noqa: E711 (elementwise)
        for threshold, score_column, why in (
            (self.config.min_clip_score, self.config.clip_score_column, col.LOW_CLIP_SCORE),
            (self.config.min_itm_score, col.ITM_SCORE, col.LOW_ITM_SCORE),
        ):
            if threshold is not None:
                reason[(reason == None) & ~(_scores(batch, score_column) >= threshold)] = why  # noqa: E711
        return _with_decision(batch, reason)


class TopFraction:
    """Reject the kept rows that score below the run's top-fraction cut-off (``below_top_fraction``).

    The cut-off is over every scorable row of the run, rejected or not, as
    ``top_fraction_threshold`` defines it; rows already rejected keep their reason.
    """

    def __init__(self, fraction: float, score_column: str):
        self.fraction = fraction
        self.score_column = score_column

    def partial(self, batch: pa.Table) -> pa.Table:
        scores = batch.column(self.score_column).drop_null()
        return pa.table({"score": scores.cast(pa.float32())})

    def combine(self, partials: list[pa.Table]) -> float | None:
        scores = [p.column("score") for p in partials if p.num_rows]
        values = pa.chunked_array(scores, pa.float32()).to_numpy() if scores else np.zeros(0, np.float32)
        return top_fraction_threshold(values, self.fraction)

    def apply(self, batch: pa.Table, threshold: float | None) -> pa.Table:
        if threshold is None:
            return batch
        reason = np.array(batch.column(col.REJECT_REASON).to_pylist(), dtype=object)
        reason[(reason == None) & ~(_scores(batch, self.score_column) >= threshold)] = col.BELOW_TOP_FRACTION  # noqa: E711
        return _with_decision(batch.drop_columns([col.KEEP, col.REJECT_REASON]), reason)


def _scores(batch: pa.Table, name: str) -> np.ndarray:
    """A score column as floats; null is NaN, which fails every threshold."""
    return pc.fill_null(batch.column(name), np.nan).to_numpy(zero_copy_only=False)


def _with_decision(batch: pa.Table, reason: np.ndarray) -> pa.Table:
    keep = np.array([r is None for r in reason], dtype=bool)
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
