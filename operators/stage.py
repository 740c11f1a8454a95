"""The stage contract: what every step of a plan declares about itself.

A stage names the columns it reads and adds, the resources one worker needs and
how it runs. The plan checks every declaration against the stages before it
before Ray starts, and the runner checks at run time that each batch really
gained the declared columns, so a declaration cannot drift from the code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import pyarrow as pa

from operators.models import ModelRef
from operators.resources import Resources
from operators.storage import Location

StageKind = Literal["source", "task", "actor", "fused", "aggregate"]
"""How a stage runs:

- ``source``: reads the input (Ray's read tasks); it has no operator.
- ``task``: CPU work in stateless Ray tasks (decoding).
- ``actor``: a model, loaded once per actor in a pool.
- ``fused``: a cheap per-row step that runs inside the step before it, never as
  tasks of its own: small tasks that each need a CPU starve behind the heavy ones.
- ``aggregate``: needs the whole run before it can decide a row (a cut-off over
  all scores); its operator is an ``Aggregate``.
"""


class Operator(Protocol):
    def __call__(self, batch: pa.Table) -> pa.Table: ...


class Aggregate(Protocol):
    """A whole-run decision, made in three steps that never hold the run in memory."""

    def partial(self, batch: pa.Table) -> pa.Table:
        """A small summary of one batch (e.g. its scores)."""

    def combine(self, partials: list[pa.Table], staged: "Staged") -> object:
        """The run's state from every batch's summary (e.g. a cut-off); ``staged`` are the run's rows,
        for a decision that needs more than a summary (dedup reads columns of them back on Ray).

        A state with a ``commit_metadata`` dict adds it to the run's commit (e.g. which centroids it used).
        """

    def apply(self, batch: pa.Table, state: object) -> pa.Table:
        """Decide one batch with the run's state."""


@dataclass(frozen=True)
class Staged:
    """The first pass's rows, in staging files, each row with its ``schema.ROW_ID``."""

    paths: list[str]
    location: Location
    cluster: dict[str, float] | None  # None: the run has no Ray (``pipelines.in_process``)


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
