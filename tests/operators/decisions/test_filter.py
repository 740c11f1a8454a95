"""ScoreFilter decisions and reasons."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from operators import schema as col
from operators.decisions.filter import FilterConfig, ScoreFilter, TopFraction, top_fraction_threshold


def table(status, captions, scores) -> pa.Table:
    return pa.table(
        {
            col.STATUS: status,
            col.CAPTION: pa.array(captions, pa.string()),
            col.CLIP_SCORE: pa.array(scores, pa.float32()),
        }
    )


def test_first_failing_check_names_the_reason_and_nothing_is_dropped():
    batch = table(
        [col.DECODE_ERROR, col.OK, col.OK, col.OK, col.OK],
        ["fine", "  ", None, "fine", "fine"],
        [None, 0.9, None, 0.1, 0.3],
    )
    out = ScoreFilter(FilterConfig(min_clip_score=0.2))(batch)
    assert out.num_rows == 5
    assert out.column(col.KEEP).to_pylist() == [False, False, False, False, True]
    assert out.column(col.REJECT_REASON).to_pylist() == [
        col.DECODE_ERROR,
        col.EMPTY_CAPTION,
        col.EMPTY_CAPTION,
        col.LOW_CLIP_SCORE,
        None,
    ]


def test_without_thresholds_only_bad_rows_are_rejected():
    out = ScoreFilter(FilterConfig())(table([col.OK, col.MISSING_IMAGE], ["a", "b"], [-0.9, None]))
    assert out.column(col.REJECT_REASON).to_pylist() == [None, col.MISSING_IMAGE]


def test_top_fraction_cut_off_keeps_ties_and_has_its_own_reason():
    scores = np.array([0.1, 0.5, 0.5, 0.3, np.nan], dtype=np.float32)
    threshold = top_fraction_threshold(scores, 0.5)
    assert threshold == pytest.approx(0.5)
    cut = TopFraction(0.5, col.CLIP_SCORE)
    batch = ScoreFilter(FilterConfig())(table([col.OK] * 4, ["a"] * 4, scores[:4].tolist()))
    out = cut.apply(batch, threshold)
    assert out.column(col.KEEP).to_pylist() == [False, True, True, False]
    assert out.column(col.REJECT_REASON).to_pylist()[0] == col.BELOW_TOP_FRACTION


def test_top_fraction_cut_off_is_combined_from_every_batch_and_keeps_earlier_reasons():
    cut = TopFraction(0.25, col.CLIP_SCORE)
    batches = [
        ScoreFilter(FilterConfig(min_clip_score=0.0))(table([col.OK] * 4, ["a"] * 4, scores))
        for scores in ([0.9, 0.1, -0.5, None], [0.8, 0.7, 0.2, 0.3])
    ]
    threshold = cut.combine([cut.partial(b) for b in batches])
    assert threshold == pytest.approx(0.8)  # the top quarter of the 7 scored rows: ceil(1.75) = 2 rows
    decided = [cut.apply(b, threshold).column(col.REJECT_REASON).to_pylist() for b in batches]
    assert decided[0] == [None, col.BELOW_TOP_FRACTION, col.LOW_CLIP_SCORE, col.LOW_CLIP_SCORE]
    assert decided[1] == [None, col.BELOW_TOP_FRACTION, col.BELOW_TOP_FRACTION, col.BELOW_TOP_FRACTION]


def test_thresholds_are_checked_when_the_config_is_built():
    with pytest.raises(ValidationError, match="min_clip_score"):
        FilterConfig(min_clip_score=3)
    with pytest.raises(ValidationError, match="keep_top_fraction"):
        FilterConfig(keep_top_fraction=0)


def test_filtering_on_the_best_caption_uses_its_score_and_text():
    batch = pa.table(
        {
            col.STATUS: [col.OK, col.OK, col.OK],
            col.CAPTION: pa.array(["", "a cat", "a dog"], pa.string()),
            col.CLIP_SCORE: pa.array([None, 0.1, 0.1], pa.float32()),
            col.CAPTION_BEST: pa.array(["a red star", "a cat", None], pa.string()),
            col.CLIP_SCORE_BEST: pa.array([0.4, 0.1, None], pa.float32()),
        }
    )
    on_original = ScoreFilter(FilterConfig(min_clip_score=0.3))(batch)
    assert on_original.column(col.REJECT_REASON).to_pylist() == [
        col.EMPTY_CAPTION,
        col.LOW_CLIP_SCORE,
        col.LOW_CLIP_SCORE,
    ]
    on_best = ScoreFilter(FilterConfig(min_clip_score=0.3, caption="best"))(batch)
    assert on_best.column(col.REJECT_REASON).to_pylist() == [None, col.LOW_CLIP_SCORE, col.EMPTY_CAPTION]


def test_itm_threshold_is_an_addition_to_the_clip_threshold_with_its_own_reason():
    batch = table([col.OK] * 3, ["a", "b", "c"], [0.1, 0.5, 0.5]).append_column(
        col.ITM_SCORE, pa.array([0.9, 0.2, None], pa.float32())
    )
    out = ScoreFilter(FilterConfig(min_clip_score=0.3, min_itm_score=0.5))(batch)
    assert out.column(col.REJECT_REASON).to_pylist() == [col.LOW_CLIP_SCORE, col.LOW_ITM_SCORE, col.LOW_ITM_SCORE]
    itm_only = ScoreFilter(FilterConfig(min_itm_score=0.5))(batch)
    assert itm_only.column(col.KEEP).to_pylist() == [True, False, False]


def quality_table() -> pa.Table:
    """One row failing each new check, in the order the filter checks them, and one row passing all."""
    rows = [  # width, height, caption, language, embedding, aesthetic, nsfw, tags
        (100, 300, "a red circle on grey", "en", [0.6, 0.8], 6.0, 0.1, {"red": 0.9}),
        (700, 220, "a red circle on grey", "en", [0.6, 0.8], 6.0, 0.1, {"red": 0.9}),
        (300, 300, "red", "en", [0.6, 0.8], 6.0, 0.1, {"red": 0.9}),
        (300, 300, "a red o", "en", [0.6, 0.8], 6.0, 0.1, {"red": 0.9}),
        (300, 300, "ein roter Kreis", "de", [0.6, 0.8], 6.0, 0.1, {"red": 0.9}),
        (300, 300, "🎉 🎉 🎉 🎉 🎉", None, [0.6, 0.8], 6.0, 0.1, {"red": 0.9}),
        (300, 300, "a red circle on grey", "en", [float("nan"), 0.8], None, None, None),
        (300, 300, "a red circle on grey", "en", [0.6, 0.8], 4.0, 0.1, {"red": 0.9}),
        (300, 300, "a red circle on grey", "en", [0.6, 0.8], 6.0, 0.7, {"red": 0.9}),
        (300, 300, "a red circle on grey", "en", [0.6, 0.8], 6.0, None, {"red": 0.9}),
        (300, 300, "a red circle on grey", "en", [0.6, 0.8], 6.0, 0.1, {"red": 0.2}),
        (300, 300, "a red circle on grey", "en", [0.6, 0.8], 6.0, 0.1, {"red": 0.99}),
        (300, 300, "a red circle on grey", "en", [0.6, 0.8], 6.0, 0.1, {"red": 0.9}),
    ]
    names = (
        col.IMAGE_WIDTH,
        col.IMAGE_HEIGHT,
        col.CAPTION,
        col.CAPTION_LANGUAGE,
        col.IMAGE_EMBEDDING,
        col.AESTHETIC_SCORE,
        col.NSFW_SCORE,
        col.TAG_SCORES,
    )
    types = (
        pa.int32(),
        pa.int32(),
        pa.string(),
        pa.string(),
        col.EMBEDDING_TYPE,
        pa.float32(),
        pa.float32(),
        col.TAG_SCORES_TYPE,
    )
    columns = {
        name: pa.array([r[i] if i != 7 or r[i] is None else list(r[i].items()) for r in rows], type_)
        for i, (name, type_) in enumerate(zip(names, types))
    }
    return pa.table(
        {col.STATUS: [col.OK] * len(rows), col.CLIP_SCORE: pa.array([0.5] * len(rows), pa.float32()), **columns}
    )


def test_basic_and_score_filters_each_name_their_own_reason_in_the_documented_order():
    config = FilterConfig(
        min_image_side=200,
        max_aspect_ratio=3.0,
        min_caption_words=3,
        min_caption_chars=8,
        caption_languages=("en",),
        min_clip_score=0.2,
        min_aesthetic_score=5.0,
        max_nsfw_score=0.5,
        tags={"red": {"min": 0.5, "max": 0.95}},
    )
    reasons = ScoreFilter(config)(quality_table()).column(col.REJECT_REASON).to_pylist()
    assert reasons == [
        col.IMAGE_TOO_SMALL,
        col.EXTREME_ASPECT_RATIO,
        col.CAPTION_TOO_FEW_WORDS,
        col.CAPTION_TOO_SHORT,
        col.WRONG_LANGUAGE,
        col.WRONG_LANGUAGE,
        col.INVALID_EMBEDDING,
        col.LOW_AESTHETIC_SCORE,
        col.HIGH_NSFW_SCORE,
        col.HIGH_NSFW_SCORE,
        col.LOW_TAG_SCORE,
        col.HIGH_TAG_SCORE,
        None,
    ]
    # The order the filter checks in is the order schema documents (image status reasons first).
    order = [r for r in col.FILTER_REASONS if r in reasons]
    assert order == sorted(set(reasons) - {None}, key=reasons.index)


def test_without_the_new_thresholds_only_a_non_finite_embedding_is_rejected():
    reasons = ScoreFilter(FilterConfig())(quality_table()).column(col.REJECT_REASON).to_pylist()
    assert reasons == [None] * 6 + [col.INVALID_EMBEDDING] + [None] * 6


def test_a_tag_threshold_needs_a_bound():
    with pytest.raises(ValidationError, match="set min, max or both"):
        FilterConfig(tags={"red": {}})
    with pytest.raises(ValidationError, match="unknown ISO 639-1"):
        FilterConfig(caption_languages=("english",))


def test_classifier_score_bounds_come_after_the_tag_bounds_with_their_own_reasons():
    batch = (
        quality_table()
        .slice(9, 4)
        .append_column(
            col.CLASSIFIER_SCORES,
            pa.array(
                [[("watermark", 0.1)], [("watermark", 0.1)], [("watermark", 0.9)], None], col.CLASSIFIER_SCORES_TYPE
            ),
        )
    )
    config = FilterConfig(tags={"red": {"min": 0.5}}, classifier_scores={"watermark": {"max": 0.5}})
    assert ScoreFilter(config)(batch).column(col.REJECT_REASON).to_pylist() == [
        None,
        col.LOW_TAG_SCORE,
        col.HIGH_CLASSIFIER_SCORE,
        col.HIGH_CLASSIFIER_SCORE,
    ]


def test_a_low_or_missing_answer_yes_prob_is_rejected_after_the_classifier_bounds():
    rows = pa.concat_tables([quality_table().slice(9, 4), quality_table().slice(12, 1)])
    batch = rows.append_column(
        col.CLASSIFIER_SCORES,
        pa.array([[("watermark", p)] for p in (0.1, 0.1, 0.9, 0.1, 0.1)], col.CLASSIFIER_SCORES_TYPE),
    ).append_column(col.ANSWER_YES_PROB, pa.array([0.6, 0.1, 0.1, 0.3, None], pa.float32()))
    config = FilterConfig(
        tags={"red": {"min": 0.5}}, classifier_scores={"watermark": {"max": 0.5}}, min_answer_yes_prob=0.5
    )
    reasons = ScoreFilter(config)(batch).column(col.REJECT_REASON).to_pylist()
    assert reasons == [
        None,
        col.LOW_TAG_SCORE,
        col.HIGH_CLASSIFIER_SCORE,
        col.LOW_ANSWER_YES_PROB,
        col.LOW_ANSWER_YES_PROB,
    ]
    assert [r for r in col.FILTER_REASONS if r in reasons] == [
        col.LOW_TAG_SCORE,
        col.HIGH_CLASSIFIER_SCORE,
        col.LOW_ANSWER_YES_PROB,
    ]


def test_open_nsfw_follows_the_head_and_the_text_area_comes_with_the_image_checks():
    batch = pa.table(
        {
            col.STATUS: [col.OK] * 6,
            col.CAPTION: ["a photo of a cat"] * 6,
            col.CLIP_SCORE: pa.array([0.3, 0.3, 0.3, 0.3, 0.0, 0.3], pa.float32()),
            col.NSFW_SCORE: pa.array([0.9, 0.1, 0.1, 0.1, 0.1, 0.1], pa.float32()),
            col.IMAGE_NSFW_SCORE: pa.array([0.9, 0.9, 0.1, 0.1, 0.1, None], pa.float32()),
            col.TEXT_AREA_FRACTION: pa.array([0.1, 0.1, 0.5, 0.1, 0.9, 0.0], pa.float32()),
        }
    )
    config = FilterConfig(min_clip_score=0.2, max_nsfw_score=0.5, max_image_nsfw_score=0.5, max_text_area_fraction=0.3)
    reasons = ScoreFilter(config)(batch).column(col.REJECT_REASON).to_pylist()
    # Text is judged with the image, before any score (row 5's CLIP score fails too); a null score fails.
    assert reasons == [
        col.HIGH_NSFW_SCORE,
        col.HIGH_IMAGE_NSFW_SCORE,
        col.TOO_MUCH_TEXT,
        None,
        col.TOO_MUCH_TEXT,
        col.HIGH_IMAGE_NSFW_SCORE,
    ]
