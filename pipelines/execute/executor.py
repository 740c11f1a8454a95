"""One executor interface, one pass loop.

An executor runs a pass's steps over a source's rows, spills a first pass to staging for a
whole-run stage, hands back the last pass's rows, and runs the work that a whole-run stage
asks of it (``operators.stage.Tasks``). ``pipelines.execute.local`` runs everything in this
process; ``pipelines.execute.ray`` maps it onto Ray Data. The loop below is the same for both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from operators.stage import Stage, Tasks
from operators.storage import Location
from pipelines.execute.batches import Head
from pipelines.execute.source import Source
from pipelines.execute.staging import STAGING_DIR, Decided, decide, remove_staging
from pipelines.execute.steps import Pass, Step


class Executor(Tasks, Protocol):
    """Runs passes of steps; a stream is whatever the executor chains steps on (an iterator, a dataset)."""

    def stream(self, steps: tuple[Step, ...], source: Source, head: Head, reads_inside: bool) -> object:
        """The source's rows through ``steps``, lazily; ``head`` runs before the first step."""

    def spill(self, stream: object, aggregate: Stage, staging: Location, head: Head) -> list[dict]:
        """Run ``stream`` into staging files for ``aggregate``: a ``{"path", "partial"}`` row per batch."""

    def rows(self, stream: object) -> Iterator[dict]:
        """Run ``stream`` and hand back its rows (the writer's summaries)."""

    def describe(self, run_pass: Pass) -> list[str]:
        """How each step of ``run_pass`` runs, as ``vlpipe plan`` prints it."""

    def close(self) -> None:
        """Release what the executor started (threads)."""


@dataclass
class Execution:
    """The result of ``execute``: the whole-run decisions (made first) and the last pass's rows."""

    decided: list[Decided]
    rows: Iterator[dict]


def execute(executor: Executor, run_passes: list[Pass], source: Source, table: Location, run_id: str) -> Execution:
    """Run every pass that ends in a whole-run stage, then stream the last pass's rows.

    The staging files live below the table until the last row is out, or the run fails.
    """
    staging = table.child(f"{STAGING_DIR}/{run_id}")
    decided: list[Decided] = []
    head: Head = ()
    try:
        for run_pass in run_passes[:-1]:
            # Two whole-run stages in a row (dedup, then the top fraction): the pass between them
            # has no step, so the first one's decision runs inside the second one's spill.
            stream = executor.stream(run_pass.steps, source, head if run_pass.steps else (), run_pass.reads_inside)
            staging.filesystem.create_dir(staging.path, recursive=True)
            spilled = executor.spill(stream, run_pass.aggregate, staging, () if run_pass.steps else head)
            source, head, outcome = decide(run_pass.aggregate, spilled, staging, executor)
            decided.append(outcome)
        last = run_passes[-1]
        stream = executor.stream(last.steps, source, head, last.reads_inside)
    except BaseException:
        _finish(executor, staging)
        raise
    return Execution(decided, _streamed(executor, stream, staging))


def _streamed(executor: Executor, stream: object, staging: Location) -> Iterator[dict]:
    try:
        yield from executor.rows(stream)
    finally:
        _finish(executor, staging)


def _finish(executor: Executor, staging: Location) -> None:
    try:
        executor.close()
    finally:
        remove_staging(staging)
