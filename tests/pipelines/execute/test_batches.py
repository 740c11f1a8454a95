"""A model stage's bad rows: found by halving the batch, rejected as model_error, the rest scored."""

from __future__ import annotations

import pyarrow as pa
import pytest

from operators import schema as col
from operators.stage import Stage
from pipelines.execute.batches import run_model

STAGE = Stage(name="clip", kind="actor", reads=(col.KEY,), adds=(col.CLIP_SCORE,))


def batch(n: int, failed: dict[int, str] | None = None) -> pa.Table:
    failed = failed or {}
    return pa.table(
        {
            col.KEY: [f"k{i}" for i in range(n)],
            col.STATUS: [col.DECODE_ERROR if i in failed else col.OK for i in range(n)],
            col.ERROR: [failed.get(i) for i in range(n)],
        }
    )


class Model:
    """Scores each row 0.5, raises on any batch holding one of ``bad``; counts its calls."""

    def __init__(self, bad: set[str]):
        self.bad, self.calls = bad, 0

    def __call__(self, rows: pa.Table) -> pa.Table:
        self.calls += 1
        keys = rows.column(col.KEY).to_pylist()
        if self.bad & set(keys):
            raise ValueError(f"token sequence too long for {sorted(self.bad & set(keys))}")
        return rows.append_column(col.CLIP_SCORE, pa.array([0.5] * rows.num_rows, pa.float32()))


def test_a_row_that_makes_the_model_raise_is_a_model_error_row_and_the_others_are_scored():
    model = Model({"k5"})
    out = run_model(STAGE, model, batch(8, failed={2: "cannot identify image"}))
    assert out.column(col.KEY).to_pylist() == [f"k{i}" for i in range(8)]  # every row, in its order
    rows = out.to_pylist()
    assert rows[5][col.STATUS] == col.MODEL_ERROR and rows[5][col.CLIP_SCORE] is None
    assert rows[5][col.ERROR] == "clip: ValueError: token sequence too long for ['k5']"
    assert rows[2][col.STATUS] == col.DECODE_ERROR and rows[2][col.ERROR] == "cannot identify image"
    assert [r[col.CLIP_SCORE] for i, r in enumerate(rows) if i != 5] == [0.5] * 7
    assert out.schema.field(col.CLIP_SCORE).type == pa.float32()
    assert model.calls <= 2 * 8 - 1  # halving: fewer than two calls per row


def test_a_one_row_batch_that_raises_is_a_model_error_row():
    model = Model({"k0"})
    out = run_model(STAGE, model, batch(1))
    assert model.calls == 1
    assert out.column(col.STATUS).to_pylist() == [col.MODEL_ERROR]
    assert out.schema.field(col.CLIP_SCORE).type == pa.float32()  # the output schema's type, not null


def test_a_stage_that_raises_on_every_row_fails_after_a_bounded_number_of_calls():
    model = Model({f"k{i}" for i in range(16)})
    with pytest.raises(ValueError, match="token sequence too long"):
        run_model(STAGE, model, batch(16))
    assert model.calls == 2 * 16 - 1  # the whole batch, then each half down to each row, once


def test_a_batch_that_scores_calls_the_model_once():
    model = Model(set())
    assert run_model(STAGE, model, batch(8)).column(col.CLIP_SCORE).to_pylist() == [0.5] * 8
    assert model.calls == 1
