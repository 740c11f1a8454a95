"""One batch through a step's operators: the same code on every executor.

A model stage that raises on a batch is run again on its halves until the rows that raise are
found: those rows leave the stage with ``status`` ``model_error`` and the exception in ``error``
(the filter rejects them with that reason), and the others are scored as usual. A batch of two
rows or more in which every row raises is the stage failing, not a row: the run fails with the
stage's error, after at most two calls per row.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.models.load import ModelLoadError
from operators.stage import Stage, StageFailed
from pipelines import hooks
from pipelines.errors import Interrupted, PlanError
from pipelines.execute.steps import Step

log = logging.getLogger(__name__)

Head = tuple[Callable[[pa.Table], pa.Table], ...]
"""Operators run before a step's own: the decision of the whole-run stage just before."""


@dataclass
class StepRun:
    """One step over one batch, checking each stage's declared columns as it goes."""

    step: Step
    head: Head
    operators: list

    @classmethod
    def build(cls, step: Step, head: Head = ()) -> StepRun:
        """Build the step's operators here (a model loads in the worker that runs it, never on the driver)."""
        return cls(step, head, [_build(stage) for stage in step.stages])

    def __call__(self, batch: pa.Table) -> pa.Table:
        for operator in self.head:
            batch = operator(batch)
        for stage, operator in zip(self.step.stages, self.operators):
            hooks.reach(f"batch:{stage.name}")
            batch = (
                run_model(stage, _with_row_hooks(stage, operator), batch) if stage.kind == "actor" else operator(batch)
            )
            missing = [c for c in stage.adds if c not in batch.column_names]
            if missing:
                raise PlanError(f"stage {stage.name!r} declares column(s) {', '.join(missing)} but did not add them")
        return batch.drop_columns([c for c in self.step.drop if c in batch.column_names])


Call = Callable[[pa.Table], pa.Table]


def run_model(stage: Stage, call: Call, batch: pa.Table) -> pa.Table:
    """``call`` (a model stage's operator) over ``batch``; the rows that make it raise become ``model_error`` rows."""
    try:
        return call(batch)
    except (Interrupted, StageFailed):
        raise
    except Exception as err:
        first = err
    parts = [_Failed(batch, first)] if batch.num_rows == 1 else _halves(call, batch)
    failed = [part for part in parts if isinstance(part, _Failed)]
    if batch.num_rows > 1 and len(failed) == len(parts):
        raise first  # every row raises: the stage, not a row, is what fails (a lost device, a bug)
    rows = sum(part.rows.num_rows for part in failed)
    log.warning(
        "stage %s: %d of %d row(s) raised (%s); rejected as %s",
        stage.name,
        rows,
        batch.num_rows,
        _message(stage, failed[0].error),
        col.MODEL_ERROR,
    )
    tables = [part.table(stage) if isinstance(part, _Failed) else part for part in parts]
    return pa.concat_tables(tables, promote_options="default")


def _halves(call: Call, batch: pa.Table) -> list:
    """The outputs of ``batch``'s halves in row order, a half that raises halved again, down to single rows:
    at most 2n - 1 calls in all for n rows."""
    parts: list = []
    for half in (batch.slice(0, batch.num_rows // 2), batch.slice(batch.num_rows // 2)):
        try:
            parts.append(call(half))
        except (Interrupted, StageFailed):
            raise
        except Exception as err:
            parts += [_Failed(half, err)] if half.num_rows == 1 else _halves(call, half)
    return parts


@dataclass(frozen=True)
class _Failed:
    """One row that made a model stage raise, and the exception."""

    rows: pa.Table
    error: Exception

    def table(self, stage: Stage) -> pa.Table:
        """The row with the stage's columns null, ``status`` ``model_error`` and the exception in ``error``."""
        rows, n = self.rows, self.rows.num_rows
        for name in stage.adds:
            if name not in rows.column_names:
                rows = rows.append_column(name, pa.nulls(n, _OUTPUT_TYPES.get(name, pa.null())))
        ok = pc.equal(rows.column(col.STATUS), col.OK)
        status = pc.if_else(ok, col.MODEL_ERROR, rows.column(col.STATUS))
        error = pc.if_else(ok, _message(stage, self.error), rows.column(col.ERROR))
        rows = rows.set_column(rows.column_names.index(col.STATUS), col.STATUS, status)
        return rows.set_column(rows.column_names.index(col.ERROR), col.ERROR, error)


_OUTPUT_TYPES = {field.name: field.type for field in col.output_schema(include_image_bytes=True)}


def _message(stage: Stage, error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{stage.name}: {type(error).__name__}: {text[:400]}"


def _with_row_hooks(stage: Stage, operator: Call) -> Call:
    """With a hook installed (tests), ``row:<stage>:<key>`` is reached for every row before the model runs."""
    if not hooks.active():
        return operator

    def call(batch: pa.Table) -> pa.Table:
        for key in batch.column(col.KEY).to_pylist():
            hooks.reach(f"row:{stage.name}:{key}")
        return operator(batch)

    return call


def _build(stage: Stage):
    try:
        return stage.build()
    except Exception as err:
        if stage.kind != "actor" or isinstance(err, Interrupted):  # a run stopped while its model loads (in process)
            raise
        # Ray fails the run on the first actor that dies in its constructor (no restart loop);
        # this puts the model's own error in the last line of the message the user sees.
        name = getattr(stage.build, "func", stage.build).__name__
        raise ModelLoadError(f"{name} could not load its model: {type(err).__name__}: {err}") from err


def quiet_idle_threads() -> None:
    """Make the model's idle OpenMP threads sleep, not spin, in this process (before torch loads).

    A model shares the node's cores with decoding; torch's OpenMP threads otherwise busy-wait
    between operations. With the tiny CLIP at 10k rows the CLIP actor burnt 11.8 CPU-s spinning
    for 3.0 CPU-s of work, taken from the decode tasks beside it. A value the user set is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def rebatch(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of ``tables`` in tables of exactly ``rows`` rows (the last may hold fewer), as Ray
    Data's ``map_batches(batch_size=rows)`` hands them to a step."""
    held: list[pa.Table] = []
    count = 0
    for table in tables:
        while table.num_rows:
            take = min(rows - count, table.num_rows)
            held.append(table.slice(0, take))
            count += take
            table = table.slice(take)
            if count == rows:
                yield _concat(held)
                held, count = [], 0
    if count:
        yield _concat(held)


def _concat(tables: list[pa.Table]) -> pa.Table:
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
