"""One batch through a step's operators: the same code on every executor."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from operators.models.load import ModelLoadError
from operators.stage import Stage
from pipelines import hooks
from pipelines.errors import Interrupted, PlanError
from pipelines.execute.steps import Step

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
            batch = operator(batch)
            missing = [c for c in stage.adds if c not in batch.column_names]
            if missing:
                raise PlanError(f"stage {stage.name!r} declares column(s) {', '.join(missing)} but did not add them")
        return batch.drop_columns([c for c in self.step.drop if c in batch.column_names])


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
