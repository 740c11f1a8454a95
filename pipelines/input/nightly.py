"""Nightly incremental runs: process only the shards no earlier date has processed.

A shard is identified by its URI plus size and modification time, so a shard that
is rewritten in place counts as new and is processed again. A date's partition is
always replaced whole, so a re-run of a date processes that date's shards again
together with anything new: no duplicates, and the same row set as the first time.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pyarrow as pa

from pipelines.input.shards import Shard

Fingerprint = tuple[str, int, int | None]


@dataclass(frozen=True)
class NightlyPlan:
    """What tonight's run of one date processes, and why."""

    run_date: dt.date
    shards: list[Shard]
    new: list[Shard]
    reason: str

    @property
    def nothing_to_do(self) -> bool:
        return not self.shards


def fingerprint(uri: str, size: int, mtime: dt.datetime | None) -> Fingerprint:
    if mtime is None:
        return uri, size, None
    if mtime.tzinfo is None:
        mtime = mtime.replace(tzinfo=dt.timezone.utc)
    return uri, size, int(mtime.timestamp() * 1_000_000)


def plan_nightly(
    shards: list[Shard], records: pa.Table, run_date: dt.date, config_hash: str, force: bool
) -> NightlyPlan:
    """Choose the shards for ``run_date`` from the listing and the run records."""
    done_elsewhere: set[Fingerprint] = set()
    latest_for_date = None
    for run in records.to_pylist():  # oldest first
        if run["status"] not in ("succeeded", "partial"):  # a partial run did its good shards
            continue
        failed = {s["uri"] for s in run["failed_shards"] or []}
        done = {
            fingerprint(s["uri"], s["size"], s["mtime"]) for s in run["input_shards"] or [] if s["uri"] not in failed
        }
        if run["run_date"] == run_date:
            latest_for_date = (run, done)
        else:
            done_elsewhere |= done
    ours = latest_for_date[1] if latest_for_date else set()
    current = {fingerprint(s.uri, s.size, s.mtime): s for s in shards}
    new = [s for fp, s in current.items() if fp not in done_elsewhere and fp not in ours]
    again = [s for fp, s in current.items() if fp in ours and fp not in done_elsewhere]
    if new:
        return NightlyPlan(run_date, again + new, new, f"{len(new)} new or changed shard(s)")
    if not again:
        return NightlyPlan(run_date, [], [], "nothing new: every shard has been processed by an earlier run")
    unchanged = latest_for_date[0]["config_hash"] == config_hash and len(again) == len(ours)
    if unchanged and not force:
        return NightlyPlan(
            run_date, [], [], f"{run_date} is up to date (run {latest_for_date[0]['run_id']}); --force recomputes it"
        )
    why = "forced" if unchanged else "the config or the date's shard set changed"
    return NightlyPlan(run_date, again, [], f"recomputing {run_date}: {why}")
