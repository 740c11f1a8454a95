"""Caption selection: keep the better-scoring of the original and the generated caption.

A policy on top of the CLIP scores, not part of embedding: a cheap per-row step
that runs fused into the step before it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.stage import Stage


def select_caption_stage() -> Stage:
    """The caption-selection stage's contract."""
    return Stage(
        name="select_caption",
        kind="fused",
        build=SelectCaption,
        reads=(col.CAPTION, col.CAPTION_GENERATED, col.CLIP_SCORE, col.CLIP_SCORE_GENERATED),
        adds=(col.CAPTION_BEST, col.CAPTION_SOURCE, col.CLIP_SCORE_BEST),
    )


class SelectCaption:
    """Append ``caption_best``, ``caption_source`` and ``clip_score_best``.

    The generated caption wins only by scoring strictly higher, or when the
    original has no score; rows where neither scored get nulls.
    """

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores = _scores(batch, col.CLIP_SCORE)
        generated_scores = _scores(batch, col.CLIP_SCORE_GENERATED)
        scored, generated_scored = ~np.isnan(scores), ~np.isnan(generated_scores)
        use_generated = generated_scored & (~scored | (generated_scores > scores))
        any_scored = scored | generated_scored
        best = pc.if_else(pa.array(use_generated), batch.column(col.CAPTION_GENERATED), batch.column(col.CAPTION))
        source = np.where(use_generated, col.SOURCE_GENERATED, col.SOURCE_ORIGINAL)
        return (
            batch.append_column(col.CAPTION_BEST, _masked(best, any_scored))
            .append_column(col.CAPTION_SOURCE, pa.array(source.tolist(), pa.string(), mask=~any_scored))
            .append_column(
                col.CLIP_SCORE_BEST,
                pa.array(np.where(use_generated, generated_scores, scores), pa.float32(), mask=~any_scored),
            )
        )


def _scores(batch: pa.Table, name: str) -> np.ndarray:
    return pc.fill_null(batch.column(name), np.nan).to_numpy(zero_copy_only=False).astype(np.float32)


def _masked(values: pa.ChunkedArray | pa.Array, valid: np.ndarray) -> pa.Array:
    """``values`` with nulls where not ``valid``."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return pc.if_else(pa.array(valid), values, pa.nulls(len(values), values.type))
