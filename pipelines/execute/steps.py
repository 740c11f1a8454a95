"""How a plan's stages group into steps and passes: decided here, once, for every executor.

- Consecutive stages become one step: each ``task``, ``actor`` or ``io`` stage anchors a step,
  and ``fused`` stages run inside the step before them (or the one after, when nothing is
  before). A cheap per-row step as tasks of its own needs a CPU per task and starves behind
  read, decode and the models.
- An ``aggregate`` stage splits the run in two passes: the first writes its rows to staging
  files (never held in memory) and returns each batch's partial; the executor's caller
  combines them; the second reads the staged files back and decides.
- Internal columns (``_...``) are dropped right after their last reader; ``SOURCE_ROW`` stays
  to the staging write, which records with it which input rows are done.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from operators import schema as col
from operators.resources import Resources
from operators.stage import Stage
from pipelines.errors import PlanError

ANCHORS = ("task", "actor", "io")


@dataclass(frozen=True)
class Step:
    """Stages that run together on one batch: one anchor plus the fused ones."""

    stages: tuple[Stage, ...]
    drop: tuple[str, ...] = ()

    @property
    def anchor(self) -> Stage:
        """The one stage that says how the step runs (``passes`` never makes a step without one)."""
        return next(s for s in self.stages if s.kind in ANCHORS)

    @property
    def kind(self) -> str:
        """``task`` (CPU work), ``actor`` (a model loaded once per worker) or ``io`` (storage)."""
        return self.anchor.kind

    @property
    def name(self) -> str:
        """CamelCase of the anchor's name: what progress bars and stats show."""
        return "".join(part.capitalize() for part in re.split(r"[_\W]+", self.anchor.name))

    @property
    def resources(self) -> Resources:
        return self.anchor.resources


@dataclass(frozen=True)
class Pass:
    """Steps run on one stream of rows, ending in an aggregate (or, for the last pass, not)."""

    steps: tuple[Step, ...]
    aggregate: Stage | None = None
    spill_rows: int = 1024  # rows per staged file, where the pass ends in an aggregate

    @property
    def reads_inside(self) -> bool:
        """Whether the pass's files are read inside its first step's tasks rather than by a step of their own.

        A CPU-bound first step (decoding) reads its own files: a read step runs ~25x faster than
        decoding, and on Ray its blocks of raw bytes queued in the object store up to Ray Data's
        budget (3.5 GB of 5.3 at a million rows), each also copied through the store once more.
        """
        return bool(self.steps) and self.steps[0].kind == "task"


def passes(stages: list[Stage], *, spill_rows: int = 1024) -> list[Pass]:
    """Group the stages after the source into steps, and the steps into passes (``spill_rows``
    rows per file where a pass ends in an aggregate)."""
    drops = _drops(stages)
    result: list[Pass] = []
    members: list[list[tuple[int, Stage]]] = []  # one list per step
    pending: list[tuple[int, Stage]] = []  # fused stages waiting for a step to join

    def close(aggregate: Stage | None) -> None:
        if pending:
            raise PlanError(f"stage {pending[0][1].name!r} is fused but has no step to run in")
        result.append(Pass(tuple(_step(m, drops) for m in members), aggregate, spill_rows))

    for index, stage in enumerate(stages):
        if stage.kind == "source":
            continue
        if stage.kind == "aggregate":
            close(stage)
            members = []
        elif stage.kind == "fused" and members:
            members[-1].append((index, stage))
        elif stage.kind == "fused":
            pending.append((index, stage))
        else:
            members.append([*pending, (index, stage)])
            pending = []
    close(None)
    return result


def _step(members: list[tuple[int, Stage]], drops: dict[int, tuple[str, ...]]) -> Step:
    return Step(tuple(s for _, s in members), tuple(c for i, _ in members for c in drops.get(i, ())))


def _drops(stages: list[Stage]) -> dict[int, tuple[str, ...]]:
    """Stage index -> the internal columns to drop after it: their last reader (or their producer)."""
    last: dict[str, int] = {}
    for index, stage in enumerate(stages):
        for name in stage.adds:
            if name.startswith("_"):
                last.setdefault(name, index)
        for name in stage.reads:
            if name in last:
                last[name] = index
    last.pop(col.SOURCE_ROW, None)
    out: dict[int, list[str]] = {}
    for name, index in last.items():
        out.setdefault(index, []).append(name)
    return {i: tuple(names) for i, names in out.items()}
