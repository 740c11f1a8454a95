"""Commit a run's data files (``pipelines.table.write``) to Delta Lake in one transaction.

Data files land under the table directory but are invisible until the commit
adds them to the log, so a run that dies before committing leaves the table as
it was (the orphans are removed by ``VACUUM``). Ray's own ``write_delta`` cannot
replace a single partition atomically, which idempotent re-runs need, nor remove
the rows a rewritten shard supersedes in the same commit (``pipelines.table.supersede``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Schema
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions

from operators import schema as col
from operators.storage import Location
from pipelines import hooks
from pipelines.errors import ConcurrentRunError
from pipelines.table.datafile import DataFile, table_files
from pipelines.table.supersede import Change, Supersede, Superseder
from pipelines.table.write import WriteSummary

log = logging.getLogger(__name__)


def table_version(table: Location) -> int | None:
    """The table's current version, or None before its first commit."""
    if not DeltaTable.is_deltatable(table.uri, storage_options=table.delta_options):
        return None
    return DeltaTable(table.uri, storage_options=table.delta_options).version()


@dataclass(frozen=True)
class Commit:
    """What a run's commit did to the table."""

    version: int
    rows_superseded: int = 0
    files_removed: int = 0  # files of other dates whose rows were all superseded
    files_rewritten: int = 0  # files of other dates rewritten without the superseded rows
    files_read: int = 0  # files whose source_shard column was read to find those


def commit_files(
    table: Location,
    schema: pa.Schema,
    summary: WriteSummary,
    run_date: dt.date,
    mode: str,
    metadata: dict[str, str],
    read_version: int | None,
    supersede: Supersede | None = None,
) -> Commit:
    """Add the written files to the table in one commit, with what they replace.

    ``overwrite_partition`` replaces the run date's partition (an idempotent re-run);
    ``append`` adds to it. ``supersede`` names the shards the run processed: the same
    commit removes the rows that earlier commits to other dates took from them
    (``pipelines.table.supersede``). ``read_version`` is the table version the run started
    from: if another run changed this date's partition since, the commit is refused
    (``ConcurrentRunError``) rather than mixing two runs' rows. Commits to other dates
    in the meantime are fine; the commit is planned again on top of them.
    """
    attempt = _Attempt.first(table, schema, summary, run_date, mode, metadata, read_version, supersede)
    run_id = attempt.superseder.run_id
    lost: OSError | None = None
    for _ in range(_COMMIT_ATTEMPTS):
        if lost is not None:
            # The commit request or its answer was lost (reset, timeout): delta-rs does not retry a
            # conditional put, so look whether it landed before trying again.
            landed = _committed_version(table.uri, table.delta_options, run_id)
            if landed is not None:
                return _result(landed, attempt.planned, attempt.superseder)
        try:
            first = not DeltaTable.is_deltatable(table.uri, storage_options=table.delta_options)
            done = attempt.create() if first else attempt.on_top()
        except OSError as err:
            lost = err
            continue
        if done is not None:
            return done
    if lost is not None:
        raise lost
    raise ConcurrentRunError(f"could not commit to {table.uri}: {_COMMIT_ATTEMPTS} attempts lost to concurrent commits")


@dataclass
class _Attempt:
    """One try at the commit: as the table's first, or on top of the table as it is now (None: try again)."""

    table: Location
    schema: pa.Schema
    run_date: dt.date
    mode: str
    read_version: int | None
    now_ms: int
    before: set[str]  # the table's files at read_version
    started_with: set[str]  # of those, the run date's partition
    adds: list[AddAction]
    properties: CommitProperties
    superseder: Superseder
    planned: list[Change] = field(default_factory=list)

    @classmethod
    def first(
        cls,
        table: Location,
        schema: pa.Schema,
        summary: WriteSummary,
        run_date: dt.date,
        mode: str,
        metadata: dict[str, str],
        read_version: int | None,
        supersede: Supersede | None,
    ) -> _Attempt:
        now_ms = int(time.time() * 1000)
        day = run_date.isoformat()
        before = _files_at(table.uri, table.delta_options, read_version)
        adds = [AddAction(f["path"], f["size"], {col.RUN_DATE: day}, now_ms, True, f["stats"]) for f in summary.files]
        return cls(
            table,
            schema,
            run_date,
            mode,
            read_version,
            now_ms,
            before={f.path for f in before},
            started_with={f.path for f in before if f.partition == day},
            adds=adds,
            # No blind retries inside delta-rs: it would rebase a commit onto a concurrent one it was planned without.
            properties=CommitProperties(custom_metadata=metadata, max_commit_retries=0),
            superseder=Superseder(table, supersede or Supersede(frozenset(), frozenset()), metadata["vlpipe.run_id"]),
        )

    def create(self) -> Commit | None:
        try:
            create_table_with_add_actions(
                self.table.uri,
                Schema.from_arrow(self.schema),
                self.adds,
                mode="append",
                partition_by=[col.RUN_DATE],
                storage_options=self.table.delta_options,
                commit_properties=self.properties,
            )
            return Commit(0)
        except DeltaError:
            if not DeltaTable.is_deltatable(self.table.uri, storage_options=self.table.delta_options):
                raise
            return None  # another run created the table first: check it like any concurrent commit

    def on_top(self) -> Commit | None:
        uri, options = self.table.uri, self.table.delta_options
        delta = DeltaTable(uri, storage_options=options)
        run_id = self.superseder.run_id
        try:
            if _add_missing_columns(delta, self.schema, run_id):
                return None  # look at the table again, with its new schema
            files = table_files(delta)
            own = _replaced_partition(
                files, self.run_date, self.mode, self.started_with, uri, (self.read_version, delta.version())
            )
            self.planned = self.superseder.changes(files, self.run_date.isoformat(), self.before)
            replaced = _replacing(own, self.planned, self.now_ms)
            hooks.reach("commit:planned")
            # Append mode: overwrite mode refuses explicit removes, so this commit states the
            # partition's removals itself, from the very version it is committed on top of.
            delta.create_write_transaction(
                self.adds + replaced,
                mode="append",
                schema=self.schema,
                partition_by=[col.RUN_DATE],
                commit_properties=self.properties,
            )
        except CommitFailedError:
            return None  # someone committed first; look again at what they changed
        return _result(_version_of(uri, options, run_id), self.planned, self.superseder)


_COMMIT_ATTEMPTS = 20


def _replaced_partition(
    files: list[DataFile],
    run_date: dt.date,
    mode: str,
    started_with: set[str],
    table_uri: str,
    versions: tuple[int | None, int],
) -> list[DataFile]:
    """The files of the run's date the commit removes: the whole partition if it is to be replaced.

    Refused if the partition is not the one the run started from: another run of this date
    committed meanwhile, and replacing its rows would mix or lose them.
    """
    if mode != "overwrite_partition":
        return []
    own = [f for f in files if f.partition == run_date.isoformat()]
    if {f.path for f in own} != started_with:
        raise ConcurrentRunError(
            f"another run committed run_date={run_date} to {table_uri} while this run was working "
            f"(table version {versions[0]} -> {versions[1]}); this run's files were not committed"
        )
    return own


def _replacing(own: list[DataFile], changes: list[Change], now_ms: int) -> list[AddAction | RemoveAction]:
    """Remove actions for the replaced partition and the superseded files, and add actions for their rewrites."""
    removed = [*own, *(c.file for c in changes)]
    actions: list[AddAction | RemoveAction] = [
        RemoveAction(f.path, True, now_ms, f.size, {col.RUN_DATE: f.partition}) for f in removed
    ]
    actions += [
        AddAction(c.rewrite.path, c.rewrite.size, {col.RUN_DATE: c.file.partition}, now_ms, True, c.rewrite.stats)
        for c in changes
        if c.rewrite is not None
    ]
    return actions


def _add_missing_columns(delta: DeltaTable, schema: pa.Schema, run_id: str) -> bool:
    """Add the run's columns the table lacks, in a commit of the schema alone; True if it did.

    An append keeps the table's schema as it is, so a new output column would be written
    into the files and never be visible. New columns are nullable: older files lack them.
    """
    have = {f.name for f in delta.schema().fields}
    missing = [pa.field(f.name, f.type, nullable=True) for f in schema if f.name not in have]
    if not missing:
        return False
    log.info("adding column(s) %s to %s", ", ".join(f.name for f in missing), delta.table_uri)
    delta.alter.add_columns(
        Schema.from_arrow(pa.schema(missing)).fields,
        # Not vlpipe.run_id: that marks the run's data commit, which _committed_version looks for.
        commit_properties=CommitProperties(
            custom_metadata={"vlpipe.operation": "add_columns", "vlpipe.for_run": run_id}, max_commit_retries=0
        ),
    )
    return True


def _result(version: int, changes: list[Change], superseder: Superseder) -> Commit:
    rewritten = sum(c.rewrite is not None for c in changes)
    result = Commit(
        version,
        rows_superseded=sum(c.rows_removed for c in changes),
        files_removed=len(changes) - rewritten,
        files_rewritten=rewritten,
        files_read=superseder.files_read,
    )
    if result.files_read or changes:
        log.info(
            "superseded %d earlier row(s) of %d shard(s) in %d other partition(s): read source_shard of "
            "%d file(s), removed %d, rewrote %d",
            result.rows_superseded,
            len(superseder.supersede.shards),
            len({c.file.partition for c in changes}),
            result.files_read,
            result.files_removed,
            rewritten,
        )
    return result


def _files_at(table_uri: str, options: dict, version: int | None) -> list[DataFile]:
    if version is None:
        return []
    return table_files(DeltaTable(table_uri, storage_options=options, version=version))


def _version_of(table_uri: str, options: dict, run_id: str) -> int:
    """The version this run's commit got (others may have committed right after it)."""
    version = _committed_version(table_uri, options, run_id)
    if version is None:
        raise RuntimeError(f"commit of run {run_id} not found in the history of {table_uri}")
    return version


def run_committed(table: Location, run_id: str) -> bool:
    """Whether ``run_id``'s commit is among the table's last 50."""
    return _committed_version(table.uri, table.delta_options, run_id) is not None


def _committed_version(table_uri: str, options: dict, run_id: str) -> int | None:
    if not DeltaTable.is_deltatable(table_uri, storage_options=options):
        return None
    for entry in DeltaTable(table_uri, storage_options=options).history(50):
        if entry.get("vlpipe.run_id") == run_id:
            return int(entry["version"])
    return None
