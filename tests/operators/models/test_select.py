"""Caption selection on scores: a policy, tested without a model."""

from __future__ import annotations

import pyarrow as pa

from operators import schema as col
from operators.models.select import SelectCaption


def scored(originals, generated, scores, generated_scores) -> pa.Table:
    return pa.table(
        {
            col.CAPTION: pa.array(originals, pa.string()),
            col.CAPTION_GENERATED: pa.array(generated, pa.string()),
            col.CLIP_SCORE: pa.array(scores, pa.float32()),
            col.CLIP_SCORE_GENERATED: pa.array(generated_scores, pa.float32()),
        }
    )


def test_the_better_scoring_caption_wins_and_ties_keep_the_original():
    out = SelectCaption()(
        scored(
            ["a red circle", "a blue square", "", None, "a green star"],
            ["a red circle", "a yellow cross", "a purple diamond", "an orange star", None],
            [0.5, 0.2, None, None, 0.4],
            [0.5, 0.6, 0.3, 0.1, None],
        )
    ).to_pydict()
    assert out[col.CAPTION_SOURCE] == [
        col.SOURCE_ORIGINAL,
        col.SOURCE_GENERATED,
        col.SOURCE_GENERATED,
        col.SOURCE_GENERATED,
        col.SOURCE_ORIGINAL,
    ]
    assert out[col.CAPTION_BEST] == [
        "a red circle",
        "a yellow cross",
        "a purple diamond",
        "an orange star",
        "a green star",
    ]
    assert out[col.CLIP_SCORE_BEST] == pa.array([0.5, 0.6, 0.3, 0.1, 0.4], pa.float32()).to_pylist()


def test_rows_where_neither_caption_scored_have_no_best_caption():
    out = SelectCaption()(scored(["a red circle"], [None], [None], [None])).to_pylist()[0]
    assert out[col.CAPTION_BEST] is None and out[col.CAPTION_SOURCE] is None and out[col.CLIP_SCORE_BEST] is None


def test_a_lower_generated_score_keeps_the_original():
    out = SelectCaption()(scored(["a red circle"], ["a cat"], [0.7], [0.1])).to_pylist()[0]
    assert (out[col.CAPTION_BEST], out[col.CAPTION_SOURCE], out[col.CLIP_SCORE_BEST]) == (
        "a red circle",
        col.SOURCE_ORIGINAL,
        pa.scalar(0.7, pa.float32()).as_py(),
    )
