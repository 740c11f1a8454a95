"""The stage contract: what every step of a plan declares about itself.

A stage names the columns it reads and adds, the resources one worker needs and
how it runs. The plan checks every declaration against the stages before it
before Ray starts, and the runner checks at run time that each batch really
gained the declared columns, so a declaration cannot drift from the code.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import pyarrow as pa

from operators.refs import ModelRef
from operators.resources import Resources
from operators.storage import Location

StageKind = Literal["source", "task", "actor", "io", "fused", "aggregate"]
"""How a stage runs:

- ``source``: reads the input (Ray's read tasks); it has no operator.
- ``task``: CPU work in stateless Ray tasks (decoding).
- ``actor``: a model, loaded once per actor in a pool.
- ``io``: storage I/O (the writer): waits on storage, not on a CPU, so it takes no CPU slot
  and its pool is capped instead. Declared, never inferred from ``resources.num_cpus``.
- ``fused``: a cheap per-row step that runs inside the step before it, never as
  tasks of its own: small tasks that each need a CPU starve behind the heavy ones.
- ``aggregate``: needs the whole run before it can decide a row (a cut-off over
  all scores); its operator is an ``Aggregate``.
"""


class StageFailed(Exception):
    """An operator's verdict that the stage itself has failed, whatever its rows (a server that is down).

    Rows are not isolated from it (``pipelines.execute.batches.run_model``): the run fails with this message.
    """


class Operator(Protocol):
    def __call__(self, batch: pa.Table) -> pa.Table: ...


class Aggregate(Protocol):
    """A whole-run decision, made in three steps that never hold the run in memory."""

    def partial(self, batch: pa.Table) -> pa.Table:
        """A small summary of one batch (e.g. its scores)."""

    def combine(self, partials: list[pa.Table], staged: Staged) -> object:
        """The run's state from every batch's summary (e.g. a cut-off); ``staged`` are the run's rows,
        for a decision that needs more than a summary (dedup reads columns of them back on Ray).

        A state with a ``commit_metadata`` dict adds it to the run's commit (e.g. which centroids it used).
        """

    def apply(self, batch: pa.Table, state: object) -> pa.Table:
        """Decide one batch with the run's state."""


class Tasks(Protocol):
    """What a whole-run stage may ask of the executor that runs it (never which executor it is)."""

    def run_task(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` as one task where the executor runs its work; its return value."""

    def read_parquet(self, paths: list[str], filesystem, columns: list[str], *, include_paths: bool = False):
        """These Parquet files' rows as a Ray Data dataset, for a decision that shuffles them."""

    def shuffling(self) -> AbstractContextManager:
        """Around the shuffles of the datasets made inside: the executor's cheapest shuffle for them."""


@dataclass(frozen=True)
class Staged:
    """The first pass's rows, in staging files, each row with its ``schema.ROW_ID``."""

    paths: list[str]
    location: Location
    tasks: Tasks  # the executor: where a decision that needs more than the partials runs its work
    rows: int = 0  # in all the files


@dataclass(frozen=True)
class Stage:
    """One step of a plan.

    ``build`` makes the operator where it runs (a model loads in its actor, never
    on the driver); ``model`` and ``details`` are what ``vlpipe plan`` prints.
    ``optional`` lists columns the stage reads when present (a later stage's
    columns that a run without that stage writes as nulls).
    """

    name: str
    kind: StageKind
    reads: tuple[str, ...]
    adds: tuple[str, ...]
    resources: Resources | None = None
    build: Callable[[], Operator | Aggregate] | None = None
    model: ModelRef | None = None
    details: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    config_key: str | None = None  # where its resources are set, for error messages
