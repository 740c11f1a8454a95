"""ScoreFilter decisions and reasons."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from operators import schema as col
from operators.filter import FilterConfig, ScoreFilter, top_fraction_threshold


def table(status, captions, scores) -> pa.Table:
    return pa.table({col.STATUS: status, col.CAPTION: pa.array(captions, pa.string()),
                     col.CLIP_SCORE: pa.array(scores, pa.float32())})


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
        col.DECODE_ERROR, col.EMPTY_CAPTION, col.EMPTY_CAPTION, col.LOW_CLIP_SCORE, None]


def test_without_thresholds_only_bad_rows_are_rejected():
    out = ScoreFilter(FilterConfig())(table([col.OK, col.MISSING_IMAGE], ["a", "b"], [-0.9, None]))
    assert out.column(col.REJECT_REASON).to_pylist() == [None, col.MISSING_IMAGE]


def test_top_fraction_cut_off_keeps_ties_and_has_its_own_reason():
    scores = np.array([0.1, 0.5, 0.5, 0.3, np.nan], dtype=np.float32)
    threshold = top_fraction_threshold(scores, 0.5)
    assert threshold == pytest.approx(0.5)
    out = ScoreFilter(FilterConfig(keep_top_fraction=0.5), threshold)(
        table([col.OK] * 4, ["a"] * 4, scores[:4].tolist()))
    assert out.column(col.KEEP).to_pylist() == [False, True, True, False]
    assert out.column(col.REJECT_REASON).to_pylist()[0] == col.BELOW_TOP_FRACTION


def test_thresholds_are_checked_when_the_config_is_built():
    with pytest.raises(ValidationError, match="min_clip_score"):
        FilterConfig(min_clip_score=3)
    with pytest.raises(ValidationError, match="keep_top_fraction"):
        FilterConfig(keep_top_fraction=0)
