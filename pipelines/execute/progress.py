"""A run's progress: what a run that stopped before its commit leaves, and how the next one finds it.

A resumable run stages its first pass's rows below the table (``pipelines.execute.staging``),
under ``_vlpipe_staging/<run id>/``:

- ``run.json``: what the run computes, for which inputs: its run date, its config hash and
  every input shard's size and modification time (``RunKey``).
- ``rows/``: the staged files. Each holds its rows' places in the input shards (``SOURCE_ROW``)
  and its partial for the whole-run stages, so the files alone say what is done; a file is
  progress once it is whole (a file cut short by a kill has no footer and is done again).
- ``work/``: the later passes' files and the whole-run decisions, redone on a resume.

The next run of the same key takes the run's id and staged rows over and only reads the other
input rows; a run of another config or of changed inputs for the same date removes the old
progress, and says so. Nothing here is kept once the run has committed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators import schema as col
from operators.storage import Location
from pipelines.execute.owner import Heartbeat, Owner, still_running
from pipelines.execute.staging import STAGING_DIR, remove_staging, staged_partial

log = logging.getLogger(__name__)

HEADER = "run.json"
RUNNING, STOPPED = "running", "stopped"
Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class RunKey:
    """What a run computes, on what: progress is reused only by a run with the same key."""

    run_date: dt.date
    config_hash: str
    shards: tuple[tuple[str, int, str], ...]  # (uri, size, mtime), sorted

    @classmethod
    def of(cls, run_date: dt.date, config_hash: str, shards: list[dict]) -> RunKey:
        return cls(run_date, config_hash, tuple(sorted((s["uri"], s["size"], str(s["mtime"])) for s in shards)))

    def to_json(self, run_id: str, state: str = STOPPED) -> str:
        """The run's ``run.json``: its id and key, and whether it runs (with this process as its owner)."""
        return json.dumps(
            {"run_id": run_id, "run_date": self.run_date.isoformat(), "config_hash": self.config_hash,
             "shards": [list(s) for s in self.shards], "state": state,
             "owner": Owner.this_process().to_dict()}
        )  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> RunKey:
        shards = tuple((uri, int(size), mtime) for uri, size, mtime in data["shards"])
        return cls(dt.date.fromisoformat(data["run_date"]), data["config_hash"], shards)


@dataclass
class Progress:
    """One run's staging area, and what an earlier attempt of the run left in it."""

    staging: Location
    run_id: str
    staged: list[dict] = field(default_factory=list)  # the earlier attempt's spill rows: path, partial, rows
    done: dict[str, Ranges] = field(default_factory=dict)  # input shard URI -> the row ranges staged
    key: RunKey | None = None
    heartbeat: Heartbeat | None = None

    @property
    def rows(self) -> Location:
        return self.staging.child("rows")

    @property
    def work(self) -> Location:
        return self.staging.child("work")

    @property
    def rows_done(self) -> int:
        return sum(r["rows"] for r in self.staged)

    def start(self, key: RunKey) -> None:
        """Claim the staging area as running (a fresh run's, or the attempt before's), clearing that attempt's work."""
        fs = self.staging.filesystem
        remove_staging(self.work)
        fs.create_dir(self.rows.path, recursive=True)
        fs.create_dir(self.work.path, recursive=True)
        self.key = key
        self._write_header(RUNNING)
        self.heartbeat = Heartbeat(self.staging)

    def stop(self) -> None:
        """The run stopped without its commit: its progress is the next attempt's to take over at once."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self._write_header(STOPPED)

    def remove(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        remove_staging(self.staging)

    def _write_header(self, state: str) -> None:
        with self.staging.filesystem.open_output_stream(f"{self.staging.path}/{HEADER}") as out:
            out.write(self.key.to_json(self.run_id, state).encode())


def staging_of(table: Location, run_id: str) -> Location:
    return table.child(f"{STAGING_DIR}/{run_id}")


def find_progress(table: Location, key: RunKey, committed: Callable[[str], bool], fresh: bool) -> Progress | None:
    """The progress a run with ``key`` resumes, if an earlier attempt left any.

    Progress of the same date under another key is removed (the config or the inputs changed),
    as is progress of a run that ``committed`` (it stopped before cleaning up) and, when
    ``fresh``, any progress of the date. A run still running keeps its progress
    (``pipelines.execute.owner``), and other dates' progress is left to their runs.
    """
    found = None
    for run_id, header, other, staging in _staged_runs(table):
        if other.run_date != key.run_date:
            continue
        if still_running(header, staging):
            log.info("run %s of this date is still running: its progress is left to it", run_id)
            continue
        if other != key:
            log.info("not resuming run %s: %s changed since; its progress is removed", run_id, _changed(other, key))
        elif fresh:
            log.info("discarding the progress of run %s (--fresh)", run_id)
        elif found is None and not committed(run_id):
            found = Progress(staging, run_id)
            continue
        remove_staging(staging)
    if found is not None:
        found.staged, found.done = read_staged(found.rows)
    return found


def _changed(old: RunKey, new: RunKey) -> str:
    if old.config_hash != new.config_hash:
        return f"the config (hash {old.config_hash} -> {new.config_hash})"
    before, now = {s[0]: s for s in old.shards}, {s[0]: s for s in new.shards}
    changed = sorted(uri for uri in before.keys() | now.keys() if before.get(uri) != now.get(uri))
    return f"the input shards ({len(changed)}: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''})"


def _staged_runs(table: Location) -> Iterator[tuple[str, dict, RunKey, Location]]:
    """Every run with progress below ``table``: id, ``run.json``, key, staging area (unreadable ones skipped)."""
    fs, root = table.filesystem, f"{table.path}/{STAGING_DIR}"
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as err:
        log.warning("could not list the staging area %s: %s", root, err)
        return
    for entry in sorted(entries, key=lambda e: e.path):
        if entry.type != pafs.FileType.Directory:
            continue
        try:
            with fs.open_input_stream(f"{entry.path}/{HEADER}") as source:
                header = json.loads(source.read().decode())
            key = RunKey.from_json(header)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a whole-run stage's staging from before resumable runs, or one cut short at its start
        yield header["run_id"], header, key, table.child(f"{STAGING_DIR}/{entry.base_name}")


def read_staged(rows: Location) -> tuple[list[dict], dict[str, Ranges]]:
    """The whole staged files below ``rows`` as spill rows, and the input rows they cover.

    A file that cannot be read (cut short by a kill) or that holds a row another file already
    has (a write Ray retried after a worker died) is removed: its rows are done again.
    """
    fs = rows.filesystem
    paths = sorted(e.path for e in fs.get_file_info(pafs.FileSelector(rows.path, allow_not_found=True)) if e.is_file)
    with ThreadPoolExecutor(16) as pool:
        read = list(pool.map(lambda path: _read_one(fs, path), paths))
    staged, seen = [], {}
    for path, found in zip(paths, read):
        if found is None or _overlaps(seen, found[1]):
            _delete(fs, path)
            continue
        for uri, places in found[1].items():
            seen.setdefault(uri, set()).update(places.tolist())
        staged.append({"path": path, "partial": found[0], "rows": sum(len(p) for p in found[1].values())})
    done = {uri: _ranges(np.fromiter(places, np.int64, len(places))) for uri, places in seen.items()}
    return staged, done


def _overlaps(seen: dict[str, set[int]], found: dict[str, np.ndarray]) -> bool:
    return any(not seen.get(uri, set()).isdisjoint(places.tolist()) for uri, places in found.items())


def _read_one(fs: pafs.FileSystem, path: str) -> tuple[bytes, dict[str, np.ndarray]] | None:
    try:
        with fs.open_input_file(path) as source:
            file = pq.ParquetFile(source)
            table = file.read(columns=[col.SOURCE_SHARD, col.SOURCE_ROW])
            partial = staged_partial(file.schema_arrow)
    except (OSError, ValueError, KeyError) as err:  # no footer (cut short), or no SOURCE_ROW
        log.info("staged file %s is not whole (%s): its rows are done again", path, err)
        return None
    by_shard: dict[str, np.ndarray] = {}
    uris = table.column(col.SOURCE_SHARD).to_numpy(zero_copy_only=False)
    places = table.column(col.SOURCE_ROW).to_numpy()
    for uri in np.unique(uris):
        by_shard[str(uri)] = places[uris == uri]
    return partial, by_shard


def _ranges(places: np.ndarray) -> Ranges:
    """Sorted row numbers as ``[start, stop)`` ranges: a resumed shard's done rows in a few numbers."""
    places = np.unique(places)
    if not len(places):
        return ()
    breaks = np.flatnonzero(np.diff(places) != 1) + 1
    starts, ends = places[np.r_[0, breaks]], places[np.r_[breaks - 1, len(places) - 1]] + 1
    return tuple((int(a), int(b)) for a, b in zip(starts, ends))


def _delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except OSError as err:
        log.warning("could not remove %s: %s", path, err)


def resumable(table: Location) -> list[dict]:
    """The runs below ``table`` that a run would resume (``vlpipe runs``): id, date and rows staged."""
    found = []
    for run_id, header, key, staging in _staged_runs(table):
        staged = staged_rows(staging.child("rows"))
        found.append(
            {
                "run_id": run_id,
                "run_date": key.run_date,
                "rows": staged,
                "shards": len(key.shards),
                "state": header["state"],
            }
        )
    return found


def staged_rows(rows: Location) -> int:
    """Rows staged below ``rows``, from the whole files' footers alone."""
    fs = rows.filesystem
    total = 0
    for entry in fs.get_file_info(pafs.FileSelector(rows.path, allow_not_found=True)):
        if not entry.is_file:
            continue
        try:
            with fs.open_input_file(entry.path) as source:
                total += pq.ParquetFile(source).metadata.num_rows
        except (OSError, ValueError):
            continue
    return total
