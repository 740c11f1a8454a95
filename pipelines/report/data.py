"""What the run report shows, read from the run-record table and the output table.

The run record gives the counts and the run's config, validated again with the config
model (so the report uses the run's own column names, thresholds and decode limits);
the run's rows are read at the table version the run committed, so a later re-run of
the date does not change an old report, and the previous run's rows the same way for
comparison. Nothing here renders: that is ``pipelines.report.html``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.decisions.filter import FilterConfig
from operators.storage import StorageOptions
from pipelines.config import PipelineConfig, validate_config
from pipelines.input.images import ImageSource
from pipelines.report.duplicates import PAIRS_PER_METHOD, Duplicates, duplicate_pairs
from pipelines.report.thumbnails import add_thumbnails
from pipelines.table.read import delta_dataset
from pipelines.table.records import read_run_records

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 24
_ROW_COLUMNS = (
    col.KEY,
    col.CAPTION,
    col.SOURCE_SHARD,
    col.STATUS,
    col.ERROR,
    col.CLIP_SCORE,
    col.CAPTION_GENERATED,
    col.CLIP_SCORE_GENERATED,
    col.CAPTION_BEST,
    col.CAPTION_SOURCE,
    col.CLIP_SCORE_BEST,
    col.ITM_SCORE,
    col.AESTHETIC_SCORE,
    col.NSFW_SCORE,
    col.TAG_SCORES,
    col.CAPTION_LANGUAGE,
    col.CLASSIFIER_SCORES,
    col.ANSWER,
    col.ANSWER_YES_PROB,
    col.KEEP,
    col.REJECT_REASON,
    col.DUPLICATE_OF,
)
_HISTOGRAMS = (
    col.CLIP_SCORE,
    col.CLIP_SCORE_BEST,
    col.ITM_SCORE,
    col.AESTHETIC_SCORE,
    col.NSFW_SCORE,
    col.ANSWER_YES_PROB,
    "caption_length",
    "caption_generated_length",
)
TAG_PREFIX = "tag:"  # a histogram of one zero-shot tag's score: "tag:<name>"
CLASSIFIER_PREFIX = "classifier:"  # of one classifier score: "classifier:<name>"


@dataclass
class Histogram:
    """Counts of one value per bin, for this run and the previous one, over the same edges."""

    name: str
    label: str
    edges: list[float]
    counts: list[int]
    previous_counts: list[int] | None = None
    threshold: float | None = None


@dataclass
class ReportData:
    """Everything the page shows; ``run["config_json"]`` is the config as recorded (secrets masked)."""

    run: dict
    previous: dict | None
    config: PipelineConfig
    histograms: list[Histogram]
    kept: list[dict]
    rejected: list[dict]
    stats: list[dict] = field(default_factory=list)
    caption_sources: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    duplicates: Duplicates | None = None  # None: the run marked no row as a duplicate


def collect(runs_uri: str, storage: StorageOptions, run_id: str | None = None, *, samples: int = 12) -> ReportData:
    """Read what the report of ``run_id`` (default: the latest run) shows from the run records at ``runs_uri``.

    ``storage`` reaches the run records, the output and the input shards; the stored
    config's own storage section is never used (its secrets are masked).
    """
    records = read_run_records(runs_uri, storage).to_pylist()
    index = _run_index(records, run_id, runs_uri)
    run = records[index]
    log.debug("report of run %s: %d run records, table version %s", run["run_id"], len(records), run["table_version"])
    config = stored_config(run)
    notes: list[str] = []
    names = (
        *_HISTOGRAMS,
        *(f"{TAG_PREFIX}{tag}" for tag in config.tags),
        *(f"{CLASSIFIER_PREFIX}{name}" for name in (config.classifier.scores if config.classifier else ())),
    )
    this = _scan_run(run, storage, notes, samples, names, pairs=PAIRS_PER_METHOD)
    # The same table's run before this one that committed: its histograms are drawn behind this run's.
    earlier = (
        r for r in reversed(records[:index]) if r["output_uri"] == run["output_uri"] and r["table_version"] is not None
    )
    previous = next(earlier, None)
    before = _scan_run(previous, storage, notes, 0, names) if previous else None
    if config.output.kept_only:
        notes.append("output.kept_only is set: rejected rows are counted but not in the table, so none are shown")
    kept, rejected = this.sample.result()
    duplicates = _duplicates(run, this, storage, notes)
    pair_rows = [r for p in (duplicates.pairs if duplicates else []) for r in (p.row, p.of) if r is not None]
    add_thumbnails([*kept, *rejected, *pair_rows], ImageSource.of(config), config.decode, storage)
    scans = [(label, scan) for label, scan in (("this run", this), ("previous run", before)) if scan is not None]
    return ReportData(
        run=run,
        previous=previous,
        config=config,
        histograms=histograms(this, before, config.filter),
        kept=kept,
        rejected=rejected,
        stats=[_stats(label, scan, config.filter) for label, scan in scans],
        caption_sources=dict(this.caption_sources),
        notes=notes,
        duplicates=duplicates,
    )


def _run_index(records: list[dict], run_id: str | None, runs_uri: str) -> int:
    """Where ``run_id`` (default: the latest run) is among the run records."""
    if not records:
        raise LookupError(f"no runs recorded at {runs_uri}")
    if run_id is None:
        return len(records) - 1
    # The latest record of the run: a resumed run's id also has the record of the attempt it took over.
    index = next((i for i in reversed(range(len(records))) if records[i]["run_id"] == run_id), None)
    if index is None:
        raise LookupError(f"run {run_id} is not in the run records at {runs_uri}")
    return index


def _duplicates(run: dict, scan: RunScan, storage: StorageOptions, notes: list[str]) -> Duplicates | None:
    """Counts per method from the run record, and the sampled pairs read back from the table."""
    reasons = json.loads(run["rejected_by_reason"] or "{}")
    counts = {method: reasons[method] for method in col.DUPLICATE_REASONS if reasons.get(method)}
    if not counts:
        return None
    chosen = [row for method in counts for row in sorted(scan.duplicates.group(method), key=lambda r: r[col.KEY])]
    try:
        pairs = duplicate_pairs(run, chosen, storage)
    except Exception as err:  # e.g. that version was vacuumed away: the counts still stand
        notes.append(f"duplicate pairs of run {run['run_id']} are not readable: {err}")
        pairs = []
    # Without the rows (kept_only, or an unreadable table) only the run record's counts are known.
    other = {method: scan.other_dates.get(method, 0) for method in counts} if scan.duplicates.counts else None
    return Duplicates(counts=counts, other_dates=other, pairs=pairs)


def stored_config(run: dict) -> PipelineConfig:
    """The run's config as recorded, validated again; a ``ConfigError`` if this vlpipe cannot read it.

    The recorded storage section is dropped: its secrets are masked (``**********``),
    so it does not round-trip, and the caller's storage options are used instead.
    """
    raw = json.loads(run["config_json"] or "{}")
    raw.pop("storage", None)
    return validate_config(raw, source=f"config recorded with run {run['run_id']}")


class Sampler:
    """Up to ``n`` kept and ``n`` rejected rows, the same ones whatever the row order; rejected ones spread
    over reasons.

    Rows are ranked by a hash of their key, and only the ``n`` best-ranked per reason are kept
    while the rows stream past, so the run's size does not matter.
    """

    def __init__(self, n: int):
        self.n = n
        self.best: dict[str | None, list[tuple[bytes, dict]]] = defaultdict(list)  # None: the kept rows
        self.counts: dict[str | None, int] = defaultdict(int)

    def add(self, rows: pa.Table) -> None:
        keys, keep, reasons = (rows.column(c).to_pylist() for c in (col.KEY, col.KEEP, col.REJECT_REASON))
        for i, (key, kept, reason) in enumerate(zip(keys, keep, reasons)):
            group = None if kept else reason or "unknown"
            self.counts[group] += 1
            rank = hashlib.sha256(key.encode()).digest()
            best = self.best[group]
            if len(best) < self.n or rank < best[-1][0]:
                best.append((rank, rows.slice(i, 1).to_pylist()[0]))
                best.sort(key=lambda pair: pair[0])
                del best[self.n :]

    def group(self, name: str | None) -> list[dict]:
        """The sampled rows of one reject reason (None: the kept rows), best-ranked first."""
        return [row for _, row in self.best.get(name, [])]

    def result(self) -> tuple[list[dict], list[dict]]:
        kept = [row for _, row in self.best.get(None, [])]
        queues = [
            [row for _, row in best]
            for reason, best in sorted(
                ((r, b) for r, b in self.best.items() if r is not None), key=lambda rb: (-self.counts[rb[0]], rb[0])
            )
        ]
        rejected: list[dict] = []
        while len(rejected) < self.n and any(queues):
            for queue in queues:
                if queue and len(rejected) < self.n:
                    rejected.append(queue.pop(0))
        return kept, rejected


@dataclass
class RunScan:
    """What the report needs from one run's rows, gathered batch by batch."""

    sample: Sampler
    duplicates: Sampler = field(default_factory=lambda: Sampler(0))  # the duplicate rows, a few per method
    other_dates: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # duplicates of another run_date
    values: dict[str, np.ndarray] = field(default_factory=dict)
    rows: int = 0
    kept: int = 0
    caption_sources: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def sample_rows(rows: pa.Table, n: int) -> tuple[list[dict], list[dict]]:
    """The gallery's kept and rejected rows of ``rows`` (see ``Sampler``)."""
    sampler = Sampler(n)
    sampler.add(rows)
    return sampler.result()


def histograms(rows: RunScan, previous: RunScan | None, filter_config: FilterConfig) -> list[Histogram]:
    """Score and caption-length histograms, with the configured thresholds and the previous run on the same bins."""
    out = []
    for name, label, threshold in _histogram_specs(rows, filter_config):
        values = rows.values.get(name, np.zeros(0))
        before = previous.values.get(name) if previous is not None else None
        if values.size:
            out.append(_histogram(name, label, threshold, values, before))
    return out


def _histogram_specs(rows: RunScan, config: FilterConfig) -> list[tuple[str, str, float | None]]:
    """(column, label, threshold) of each histogram the report may draw, in its order."""
    best = config.caption == "best"
    maps = [
        (name, f"tag {name.removeprefix(TAG_PREFIX)}", _map_threshold(config.tags, name.removeprefix(TAG_PREFIX)))
        for name in rows.values
        if name.startswith(TAG_PREFIX)
    ]
    maps += [
        (
            name,
            f"classifier {name.removeprefix(CLASSIFIER_PREFIX)}",
            _map_threshold(config.classifier_scores, name.removeprefix(CLASSIFIER_PREFIX)),
        )
        for name in rows.values
        if name.startswith(CLASSIFIER_PREFIX)
    ]
    return [
        (col.CLIP_SCORE, "clip_score (original caption)", None if best else config.min_clip_score),
        (col.CLIP_SCORE_BEST, "clip_score_best (better caption)", config.min_clip_score if best else None),
        (col.ITM_SCORE, "itm_score", config.min_itm_score),
        (col.AESTHETIC_SCORE, "aesthetic_score", config.min_aesthetic_score),
        (col.NSFW_SCORE, "nsfw_score", config.max_nsfw_score),
        *maps,
        (col.ANSWER_YES_PROB, "answer_yes_prob", config.min_answer_yes_prob),
        ("caption_length", "caption length (characters)", None),
        ("caption_generated_length", "generated caption length (characters)", None),
    ]


def _histogram(
    name: str, label: str, threshold: float | None, values: np.ndarray, before: np.ndarray | None
) -> Histogram:
    """One histogram on bins that hold this run's values, the previous run's and the threshold."""
    combined = np.concatenate([values, before if before is not None else [], [] if threshold is None else [threshold]])
    lo, hi = combined.min(), combined.max()
    if name.endswith("_length"):  # whole characters per bin, so no bin is empty by construction
        step = max(1, int(np.ceil((hi - lo + 1) / HISTOGRAM_BINS)))
        edges = np.arange(lo, hi + step + 1, step, dtype=np.float64)
    else:
        edges = np.histogram_bin_edges(combined, bins=HISTOGRAM_BINS, range=(lo, hi))
    return Histogram(
        name=name,
        label=label,
        edges=edges.tolist(),
        counts=np.histogram(values, bins=edges)[0].tolist(),
        previous_counts=None if before is None else np.histogram(before, bins=edges)[0].tolist(),
        threshold=threshold,
    )


def _map_threshold(thresholds, name: str) -> float | None:
    """The bound to mark for a tag or classifier score: its minimum, else its maximum."""
    bounds = thresholds.get(name)
    if bounds is None:
        return None
    return bounds.min if bounds.min is not None else bounds.max


def histogram_values(rows: pa.Table, name: str) -> np.ndarray:
    """The non-null values one histogram counts, as float64."""
    for prefix, column in ((TAG_PREFIX, col.TAG_SCORES), (CLASSIFIER_PREFIX, col.CLASSIFIER_SCORES)):
        if name.startswith(prefix):
            if column not in rows.column_names:
                return np.zeros(0)
            scores = pc.map_lookup(rows.column(column), pa.scalar(name.removeprefix(prefix)), "first")
            return pc.drop_null(scores).to_numpy().astype(np.float64)
    if name.endswith("_length"):
        column = col.CAPTION if name == "caption_length" else col.CAPTION_GENERATED
        if column not in rows.column_names:
            return np.zeros(0)
        lengths = pc.utf8_length(rows.column(column))
        return pc.drop_null(lengths).to_numpy().astype(np.float64)
    if name not in rows.column_names:
        return np.zeros(0)
    return pc.drop_null(rows.column(name)).to_numpy().astype(np.float64)


def _scan_run(
    run: dict,
    storage: StorageOptions,
    notes: list[str],
    samples: int,
    names: tuple[str, ...] = _HISTOGRAMS,
    *,
    pairs: int = 0,
) -> RunScan:
    """Stream the run's rows (no embeddings) at the table version it committed; ``names``: the histograms,
    ``pairs``: duplicates to sample per method."""
    scan = RunScan(Sampler(samples), duplicates=Sampler(pairs))
    values: dict[str, list[np.ndarray]] = {name: [] for name in names}
    if run["table_version"] is None:
        notes.append(f"run {run['run_id']} committed no rows")
    else:
        try:
            dataset = delta_dataset(run["output_uri"], storage, version=run["table_version"])
            # Only the partition is pushed down: deltalake gives columns without file statistics a
            # `col >= null` guarantee, so a pushed-down run_id predicate would skip every file.
            partition = pc.field(col.RUN_DATE) == pa.scalar(run["run_date"], pa.date32())
            columns = [c for c in (*_ROW_COLUMNS, col.RUN_ID) if c in dataset.schema.names]
            for batch in dataset.to_batches(columns=columns, filter=partition):
                rows = pa.Table.from_batches([batch])
                rows = rows.filter(pc.equal(rows.column(col.RUN_ID), run["run_id"])).drop_columns([col.RUN_ID])
                _add_rows(scan, values, rows)
                _add_duplicates(scan, rows, run["run_date"])
        except Exception as err:  # e.g. that version was vacuumed away
            notes.append(f"rows of run {run['run_id']} (table version {run['table_version']}) are not readable: {err}")
    scan.values = {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in values.items()}
    return scan


def _add_rows(scan: RunScan, values: dict[str, list[np.ndarray]], rows: pa.Table) -> None:
    scan.rows += rows.num_rows
    scan.kept += pc.sum(rows.column(col.KEEP)).as_py() or 0
    for name in values:
        values[name].append(histogram_values(rows, name))
    if col.CAPTION_SOURCE in rows.column_names:
        for entry in pc.value_counts(pc.drop_null(rows.column(col.CAPTION_SOURCE))).to_pylist():
            scan.caption_sources[entry["values"]] += entry["counts"]
    if scan.sample.n:
        scan.sample.add(rows)


def _add_duplicates(scan: RunScan, rows: pa.Table, run_date) -> None:
    """Count the batch's duplicates of other partitions' rows, and sample them when pairs are wanted."""
    if col.DUPLICATE_OF not in rows.column_names:  # a table written before dedup existed
        return
    of = rows.column(col.DUPLICATE_OF)
    pointed = pc.and_(pc.is_valid(pc.struct_field(of, col.KEY)), pc.is_valid(pc.struct_field(of, col.RUN_DATE)))
    found = rows.filter(pc.and_(pc.is_in(rows.column(col.REJECT_REASON), pa.array(col.DUPLICATE_REASONS)), pointed))
    if found.num_rows == 0:
        return
    # History is every other partition: a backfilled date is deduplicated against later dates too.
    other = pc.not_equal(
        pc.struct_field(found.column(col.DUPLICATE_OF), col.RUN_DATE), pa.scalar(run_date, pa.date32())
    )
    for entry in pc.value_counts(found.filter(other).column(col.REJECT_REASON)).to_pylist():
        scan.other_dates[entry["values"]] += entry["counts"]
    if scan.duplicates.n:
        scan.duplicates.add(found)


def _stats(label: str, scan: RunScan, filter_config: FilterConfig) -> dict:
    """Kept rate and score percentiles of one run."""
    column = filter_config.clip_score_column
    values = scan.values[column]
    entry = {
        "label": label,
        "rows": scan.rows,
        "kept_rate": scan.kept / scan.rows if scan.rows else None,
        "score_column": column,
        "mean": float(values.mean()) if values.size else None,
    }
    entry.update({f"p{q}": (float(np.percentile(values, q)) if values.size else None) for q in (10, 50, 90)})
    return entry
