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

from operators.stage import Tasks
from operators.storage import Location
from pipelines.errors import PlanError
from pipelines.execute.batches import Head
from pipelines.execute.progress import Progress
from pipelines.execute.source import Source, parquet_source
from pipelines.execute.staging import Decided, decide
from pipelines.execute.steps import Pass, Step


class Executor(Tasks, Protocol):
    """Runs passes of steps; a stream is whatever the executor chains steps on (an iterator, a dataset)."""

    def stream(self, steps: tuple[Step, ...], source: Source, head: Head, reads_inside: bool) -> object:
        """The source's rows through ``steps``, lazily; ``head`` runs before the first step."""

    def spill(self, stream: object, run_pass: Pass, staging: Location, head: Head) -> Iterator[dict]:
        """Run ``stream`` into staging files of ``run_pass.spill_rows`` rows, with the partials of
        ``run_pass.aggregate``: a ``{"path", "partial", "rows"}`` row per file, as each is written."""

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


def execute(executor: Executor, run_passes: list[Pass], source: Source, progress: Progress) -> Execution:
    """Run every pass but the last into staging, then stream the last pass's rows.

    The first pass stages into ``progress.rows`` (its spill, or the ``stage_rows`` step on the
    way to the writer) and reads only what ``progress`` does not have yet (``source`` is
    already without it); the staged files stay until the caller has committed (or, when the
    run stops, for the next attempt).
    """
    decided: list[Decided] = []
    head: Head = ()
    try:
        for index, run_pass in enumerate(run_passes[:-1]):
            # Two whole-run stages in a row (dedup, then the top fraction): the pass between them
            # has no step, so the first one's decision runs inside the second one's spill.
            stream = executor.stream(run_pass.steps, source, head if run_pass.steps else (), run_pass.reads_inside)
            target = progress.rows if index == 0 else progress.work.child(f"pass-{index + 1}")
            target.filesystem.create_dir(target.path, recursive=True)
            spill = executor.spill(stream, run_pass, target, () if run_pass.steps else head)
            spilled = [*(progress.staged if index == 0 else ()), *spill]
            source, head, outcome = decide(run_pass.aggregate, spilled, progress.work, executor)
            decided.append(outcome)
        last = run_passes[-1]
        streams = [executor.stream(last.steps, source, head, last.reads_inside)]
        if len(run_passes) == 1 and progress.staged:
            streams.append(_write_staged(executor, last, progress))
    except BaseException:
        executor.close()
        raise
    return Execution(decided, _streamed(executor, streams))


def _write_staged(executor: Executor, run_pass: Pass, progress: Progress) -> object:
    """The write of what an earlier attempt staged (a run without whole-run stages stages its rows
    on their way to the writer): those rows go to the writer as they were staged."""
    write = run_pass.steps[-1]
    if write.anchor.name != "write":
        raise PlanError(f"a run's last step is the write, not {write.name}")
    staged = parquet_source([row["path"] for row in progress.staged], progress.rows.filesystem)
    return executor.stream((write,), staged, (), False)


def _streamed(executor: Executor, streams: list[object]) -> Iterator[dict]:
    try:
        for stream in streams:
            yield from executor.rows(stream)
    finally:
        executor.close()
