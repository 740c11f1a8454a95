"""``make bench BENCH_ARGS=--dedup``: what dedup catches, what it wrongly marks, and what it costs.

- Quality: the planted-duplicate corpus (``tests/dedup_corpus.py``): night 1 holds the originals
  and look-alike distractors, night 2 every transformed copy. Each method runs alone (two nights,
  a fresh table) so its precision and recall are its own; then a threshold sweep from the same
  runs' ``image_phash`` and ``image_embedding`` columns shows what other thresholds would do.
- Cost: the same shards with and without dedup (all three methods) at each size; the dedup
  decision's seconds per 1k rows (the run's ``dedup_decision`` phase) and the driver's peak RSS.
- History: a small night against the big table: its decision time, and the bytes of the table's
  columns it reads (Parquet column-chunk sizes) against the table's size.
"""

from __future__ import annotations

import datetime as dt
import logging
import pathlib
import shutil
import threading
import time
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators import schema as col

D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
METHODS = ("exact", "near", "semantic")
NEAR_SWEEP = (0, 2, 4, 6, 8, 10, 12)
EPS_SWEEP = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def dedup_section(method: str, max_distance: int, eps: float) -> dict:
    return {
        "exact": {"exact": True},
        "near": {"near": {"max_distance": max_distance}},
        "semantic": {"semantic": {"eps": eps}},
    }[method]


def _config(inputs: pathlib.Path, output: pathlib.Path, clip_dir: pathlib.Path, run_date: dt.date, dedup: dict) -> dict:
    return {
        "input": {"uri": str(inputs.resolve()) + "/"},
        "clip": {"model": {"source": str(clip_dir)}},
        "output": {"uri": str(output.resolve()), "rows_per_file": 2000},
        "run_date": run_date.isoformat(),
        "report": {"enabled": False},
        "dedup": dedup,
    }


class _Timings(logging.Handler):
    """The run's phase timings, from the ``timings:`` line ``run_pipeline`` logs."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.timings: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.timings = dict(getattr(record, "timings", None) or self.timings)


def _run(raw: dict):
    """``run_pipeline``; the record and the run's phase timings."""
    from pipelines.config import validate_config
    from pipelines.run import run_pipeline

    capture, logger = _Timings(), logging.getLogger("pipelines.run")
    logger.addHandler(capture)
    try:
        record = run_pipeline(validate_config(raw, source="dedup benchmark config"))
    finally:
        logger.removeHandler(capture)
    return record, capture.timings


# ---------------------------------------------------------------- quality


def quality(work_dir: pathlib.Path, clip_dir: pathlib.Path, originals: int, max_distance: int, eps: float) -> dict:
    from deltalake import DeltaTable

    from tests.dedup_corpus import ORIGINAL, SIMILAR, planted_corpus, write_corpus_shards

    items = planted_corpus(originals, seed=1)
    night1 = [i for i in items if i.transform in (ORIGINAL, SIMILAR)]
    copies = [i for i in items if i.group is not None]
    root = work_dir / "dedup" / f"planted-{originals}"
    write_corpus_shards(night1, root / "night1")
    write_corpus_shards(copies, root / "night2")
    truth = {i.key: i for i in items}
    result: dict = {"originals": originals, "rows": len(items), "max_distance": max_distance, "eps": eps, "methods": {}}
    tables = {}
    for method in METHODS:
        output = root / f"table-{method}"
        shutil.rmtree(output, ignore_errors=True)
        for inputs, day in ((root / "night1", D1), (root / "night2", D2)):
            _run(_config(inputs, output, clip_dir, day, dedup_section(method, max_distance, eps)))  # record unused
        tables[method] = DeltaTable(str(output)).to_pyarrow_table()
        result["methods"][method] = _scores(tables[method], truth)
    result["sweep"] = _sweep(tables["near"], tables["semantic"], truth)
    return result


def _group(item) -> str:
    return item.group or item.key  # a distractor is its own group: marking it is a false positive


def _scores(table: pa.Table, truth: dict) -> dict:
    """Recall per transform (night 2's copies marked as duplicates of their group) and precision."""
    caught, total, marked, wrong = Counter(), Counter(), 0, 0
    for row in table.select([col.KEY, col.REJECT_REASON, col.DUPLICATE_OF]).to_pylist():
        item = truth[row[col.KEY]]
        is_dup = row[col.REJECT_REASON] in col.DUPLICATE_REASONS
        if item.group is not None:
            total[item.transform] += 1
        if not is_dup:
            continue
        marked += 1
        right = _group(truth[row[col.DUPLICATE_OF]["key"]]) == _group(item) and item.group is not None
        wrong += not right
        if right:
            caught[item.transform] += 1
    return {
        "recall": {t: round(caught[t] / total[t], 3) for t in sorted(total)},
        "marked": marked,
        "false_positives": wrong,
        "precision": round((marked - wrong) / marked, 3) if marked else None,
    }


def _sweep(near: pa.Table, semantic: pa.Table, truth: dict) -> dict:
    """Recall per transform and false positives at other thresholds, from the pipeline's own columns.

    A copy counts as caught at a threshold when it is within it of its original; a false
    positive is a row within it of a better-ranked row of another group (brute force: small corpus).
    """

    def closest(table: pa.Table, distance) -> tuple[dict, list[float]]:
        rows = table.filter(pc.equal(table[col.STATUS], col.OK)).to_pylist()
        by_key = {r[col.KEY]: r for r in rows}
        to_original = {k: distance(r, by_key[truth[k].group]) for k, r in by_key.items() if truth[k].group in by_key}
        others = []
        for key, row in by_key.items():
            group = _group(truth[key])
            others.append(min(distance(row, o) for k, o in by_key.items() if _group(truth[k]) != group))
        return to_original, others

    def hamming(a: dict, b: dict) -> float:
        return float(bin((a[col.IMAGE_PHASH] ^ b[col.IMAGE_PHASH]) & (2**64 - 1)).count("1"))

    def cosine_distance(a: dict, b: dict) -> float:
        return 1.0 - float(np.dot(a[col.IMAGE_EMBEDDING], b[col.IMAGE_EMBEDDING]))

    out = {}
    for name, table, distance, thresholds in (
        ("near", near, hamming, NEAR_SWEEP),
        ("semantic", semantic, cosine_distance, EPS_SWEEP),
    ):
        to_original, others = closest(table, distance)
        by_transform = defaultdict(list)
        for key, d in to_original.items():
            by_transform[truth[key].transform].append(d)
        out[name] = [
            {
                "threshold": t,
                "false_positive_rows": int(sum(d <= t for d in others)),
                "recall": {tr: round(float(np.mean(np.array(ds) <= t)), 3) for tr, ds in sorted(by_transform.items())},
            }
            for t in thresholds
        ]
    return out


# ---------------------------------------------------------------- cost and history


class DriverPeak:
    """Peak RSS of this process (the driver) while the block runs, sampled every 50 ms."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            with open("/proc/self/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            self.peak = max(self.peak, rss * 1024)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cost(work_dir: pathlib.Path, clip_dir: pathlib.Path, sizes: list[int], max_distance: int, eps: float) -> dict:
    from benchmarks.data import write_shards

    everything = {"exact": True, "near": {"max_distance": max_distance}, "semantic": {"eps": eps}}
    rows, last_table = [], None
    for n in sizes:
        shards = work_dir / "shards" / f"n{n}"
        write_shards(shards, n)
        entry = {"rows": n}
        for label, dedup in (("without", {}), ("with", everything)):
            output = work_dir / "dedup" / f"cost-{n}-{label}"
            shutil.rmtree(output, ignore_errors=True)
            with DriverPeak() as peak:
                start = time.perf_counter()
                record, timings = _run(_config(shards, output, clip_dir, D1, dedup))
                seconds = time.perf_counter() - start
            entry[label] = {
                "seconds": round(seconds, 2),
                "driver_peak_rss_mb": round(peak.peak / 2**20),
                "rows_kept": record.rows_kept,
                "rejected": dict(record.rejected_by_reason),
                "timings": timings,
            }
        entry["decision_s_per_1k_rows"] = round(entry["with"]["timings"]["dedup_decision"] * 1000 / n, 3)
        entry["run_s_per_1k_rows_added"] = round((entry["with"]["seconds"] - entry["without"]["seconds"]) * 1000 / n, 3)
        rows.append(entry)
        last_table = (work_dir / "dedup" / f"cost-{n}-with", n)
    if len(rows) > 1:
        rows[-1]["decision_per_row_vs_first"] = round(
            rows[-1]["decision_s_per_1k_rows"] / rows[0]["decision_s_per_1k_rows"], 3
        )
        # decision = fixed + per_row * rows, through the smallest and the largest size
        (n0, t0), (n1, t1) = [(r["rows"], r["with"]["timings"]["dedup_decision"]) for r in (rows[0], rows[-1])]
        per_1k = (t1 - t0) * 1000 / (n1 - n0)
        rows[-1]["decision_fit"] = {"fixed_s": round(t0 - per_1k * n0 / 1000, 2), "per_1k_rows_s": round(per_1k, 4)}
    return {"sizes": rows, "history": _history_night(work_dir, clip_dir, last_table, sizes[0], everything)}


def _history_night(
    work_dir: pathlib.Path, clip_dir: pathlib.Path, table: tuple[pathlib.Path, int], night_rows: int, dedup: dict
) -> dict:
    from benchmarks.data import write_shards

    output, table_rows = table
    night = work_dir / "dedup" / f"night-{night_rows}"
    write_shards(night, night_rows, seed=1)
    read = _bytes_read(output)
    start = time.perf_counter()
    record, timings = _run(_config(night, output, clip_dir, D2, dedup))
    return {
        "table_rows": table_rows,
        "night_rows": night_rows,
        "seconds": round(time.perf_counter() - start, 2),
        "decision_s": timings["dedup_decision"],
        "rejected": dict(record.rejected_by_reason),
        **read,
    }


def _bytes_read(output: pathlib.Path) -> dict:
    """Compressed bytes of the columns the history read projects, against the table's data files."""
    from deltalake import DeltaTable

    columns = {col.KEY, col.KEEP, col.SOURCE_SHARD, col.IMAGE_SHA256, col.IMAGE_PHASH, col.IMAGE_EMBEDDING}
    projected = total = 0
    for uri in DeltaTable(str(output)).file_uris():
        metadata = pq.ParquetFile(uri.removeprefix("file://")).metadata
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                total += chunk.total_compressed_size
                if chunk.path_in_schema.split(".")[0] in columns:
                    projected += chunk.total_compressed_size
    return {"history_bytes_read_mb": round(projected / 2**20, 1), "table_bytes_mb": round(total / 2**20, 1)}


def format_dedup(result: dict | None) -> list[str]:
    if not result:
        return []
    lines = _format_quality(result["quality"]) if result.get("quality") else []
    return lines + _format_cost(result.get("cost"))


def _format_quality(q: dict) -> list[str]:
    transforms = sorted(next(iter(q["methods"].values()))["recall"])
    lines = [
        "",
        f"dedup quality, planted corpus: {q['originals']} originals, {q['rows']} rows "
        f"(near max_distance {q['max_distance']}, semantic eps {q['eps']}); recall per transform:",
        f"  {'method':<9}" + "".join(f"{t:>13}" for t in transforms) + f"{'precision':>11}{'false pos':>10}",
    ]
    for method, s in q["methods"].items():
        lines.append(
            f"  {method:<9}"
            + "".join(f"{s['recall'][t]:>13.2f}" for t in transforms)
            + f"{s['precision'] if s['precision'] is not None else float('nan'):>11.3f}{s['false_positives']:>10}"
        )
    for name, label in (("near", "max_distance"), ("semantic", "eps")):
        lines.append(f"  sweep {name} ({label}: recall per transform, rows within it of another group)")
        for point in q["sweep"][name]:
            lines.append(
                f"    {point['threshold']:>6g}"
                + "".join(f"{point['recall'].get(t, 0):>13.2f}" for t in transforms)
                + f"{point['false_positive_rows']:>10}"
            )
    return lines


def _format_cost(c: dict | None) -> list[str]:
    lines = []
    if c:
        lines.append("dedup cost (exact + near + semantic, tiny CLIP), same shards with and without:")
        for s in c["sizes"]:
            lines.append(
                f"  {s['rows']:>7} rows: decision {s['decision_s_per_1k_rows']:.3f} s/1k rows, run "
                f"{s['without']['seconds']:.1f} -> {s['with']['seconds']:.1f} s "
                f"(+{s['run_s_per_1k_rows_added']:.3f} s/1k), driver peak RSS "
                f"{s['without']['driver_peak_rss_mb']} -> {s['with']['driver_peak_rss_mb']} MB"
                + (
                    f"  [x{s['decision_per_row_vs_first']:.2f} decision time/row]"
                    if "decision_per_row_vs_first" in s
                    else ""
                )
            )
        fit = c["sizes"][-1].get("decision_fit")
        if fit:
            lines.append(
                f"  decision time = {fit['fixed_s']:.1f} s fixed + {fit['per_1k_rows_s']:.3f} s per 1k rows "
                "(through the smallest and largest size)"
            )
        h = c["history"]
        lines.append(
            f"  a {h['night_rows']}-row night against the {h['table_rows']}-row table: run {h['seconds']:.1f} s, "
            f"decision {h['decision_s']:.2f} s; history columns read {h['history_bytes_read_mb']} MB of the "
            f"table's {h['table_bytes_mb']} MB (no image bytes)"
        )
    return lines
